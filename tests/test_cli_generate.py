"""``python -m liveavatar generate`` on tiny models written in real file formats."""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import save_file

from media_probe import probe_media
from liveavatar_pack.liveavatar.demo_assets import synth_face, synth_speech
from liveavatar_pack.liveavatar.tiny import (
    save_tiny_tokenizer,
    tiny_audio_encoder,
    tiny_text_encoder,
    tiny_transformer,
    tiny_vae,
)
from liveavatar_pack.model_loaders.model_dir import find_model_files

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A ComfyUI-style models/ folder with tiny models (DiT as a sharded HF directory)."""
    root = tmp_path_factory.mktemp("models")
    dit = tiny_transformer(seed=4)
    shard_dir = root / "diffusion_models" / "Wan2.2-S2V-tiny"
    shard_dir.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in dit.state_dict().items()}
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, shard_dir / fname)
        weight_map.update({k: fname for k in part})
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dit.cfg.__dict__.items()}
    (shard_dir / "config.json").write_text(json.dumps(cfg))

    gen = torch.Generator().manual_seed(0)
    lora = {}
    for name in ("blocks.0.self_attn.q", "blocks.1.ffn.0"):
        out_f, in_f = dict(dit.named_modules())[name].weight.shape
        lora[f"base_model.model.{name}.lora_A.default.weight"] = torch.randn(4, in_f, generator=gen) * 0.1
        lora[f"base_model.model.{name}.lora_B.default.weight"] = torch.randn(out_f, 4, generator=gen) * 0.1
    (root / "loras").mkdir()
    save_file(lora, root / "loras" / "liveavatar.safetensors")
    (root / "loras" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))

    tiny_vae(seed=1).model.save_pretrained(root / "vae" / "wan_2.1_vae_diffusers")
    text = tiny_text_encoder(seed=3)
    (root / "text_encoders").mkdir()
    text_state = {k: v.contiguous() for k, v in text.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(text_state, root / "text_encoders" / "umt5_tiny.safetensors")  # HF/ComfyUI layout, tie dropped
    save_tiny_tokenizer(root / "text_encoders" / "umt5-xxl")
    tiny_audio_encoder(seed=2).save_pretrained(root / "audio_encoders" / "wav2vec2-tiny")
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    synth_face(300, 200).save(d / "face.png")
    soundfile.write(d / "voice.wav", np.stack([synth_speech(1.2, 22050)] * 2, axis=1), 22050)  # stereo, 22.05 kHz
    return d


def _generate(models, inputs, out, *extra):
    vae = models / "vae" / "wan_2.1_vae_diffusers"  # a diffusers folder: given explicitly
    cmd = [sys.executable, "-m", "liveavatar", "generate", "--models", str(models), "--image", str(inputs / "face.png"),
           "--audio", str(inputs / "voice.wav"), "--size", "128*128", *(["--vae", str(vae)] if vae.exists() else []),
           "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_model_folder_discovery(models):
    files = find_model_files(models)
    assert files.dit == models / "diffusion_models" / "Wan2.2-S2V-tiny"
    assert files.lora.name == "liveavatar.safetensors" and files.text_encoder.name == "umt5_tiny.safetensors"
    assert files.tokenizer.name == "umt5-xxl" and files.audio_encoder.name == "wav2vec2-tiny"
    assert files.missing() == ["vae"]


@pytest.mark.slow
def test_generate_writes_video_with_sound(models, inputs, tmp_path):
    out = tmp_path / "talk.mp4"
    result = _generate(models, inputs, out, "--num-clips", "1", "--prompt", "a cheerful person")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA liveavatar.safetensors: merged 2 LoRA matrices" in result.stderr
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 45
    streams, audio_secs = probe_media(out)
    assert ("Audio", "aac") in streams and 1.1 <= audio_secs <= 45 / 25 + 1e-3


def test_missing_parts_are_listed_before_loading(tmp_path, inputs):
    (tmp_path / "models").mkdir()
    result = _generate(tmp_path / "models", inputs, tmp_path / "x.mp4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for part in ("dit", "lora", "vae", "text_encoder", "tokenizer", "audio_encoder"):
        assert f"- {part}: get" in result.stderr
    assert "Wan-AI/Wan2.2-S2V-14B" in result.stderr


@pytest.mark.parametrize("bad", ["image", "audio", "prompt"])
def test_bad_inputs_are_refused_up_front(models, inputs, tmp_path, bad):
    (tmp_path / "not_image.png").write_text("hello")
    (tmp_path / "empty.wav").write_bytes(b"")
    extra = {"image": ["--image", str(tmp_path / "not_image.png")], "audio": ["--audio", str(tmp_path / "empty.wav")],
             "prompt": ["--prompt", "word " * 600]}[bad]
    result = _generate(models, inputs, tmp_path / "x.mp4", *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert {"image": "not_image.png", "audio": "empty.wav", "prompt": "tokens long"}[bad] in result.stderr
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "x.partial.mp4").exists()


@pytest.mark.slow
def test_generate_from_tiny_models_in_comfyui_layout(tmp_path):
    """``tiny-models`` writes ComfyUI's folder layout in the real formats; ``generate`` finds and runs it."""
    models = tmp_path / "models"
    made = subprocess.run([sys.executable, "-m", "liveavatar", "tiny-models", "--out", str(models)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    files = find_model_files(models)
    assert not files.missing(), files
    assert files.dit.parent.name == "diffusion_models" and files.vae.parent.name == "vae"
    out = tmp_path / "tiny.mp4"
    cmd = [sys.executable, "-m", "liveavatar", "generate", "--models", str(models),
           "--image", str(models / "input" / "liveavatar_example.png"),
           "--audio", str(models / "input" / "liveavatar_example.wav"), "--size", "128*128", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    streams, audio_secs = probe_media(out)
    assert frames % 12 == 9 and ("Audio", "aac") in streams and audio_secs > 1.0


class _StopBeforeDiT(Exception):
    pass


def test_encoders_are_freed_before_the_dit_loads(models, inputs, tmp_path, monkeypatch):
    """The plan frees umT5 after encoding and keeps no audio encoder on the device while sampling: by the
    time the DiT loads, the text encoder object is gone, and so is wav2vec2 for a track encoded in one pass."""
    from liveavatar_pack import cli
    from liveavatar_pack.cli import generate

    refs: dict[str, weakref.ref] = {}
    alive: dict[str, bool] = {}

    def recording(name, loader):
        def load(*args, **kwargs):
            model = loader(*args, **kwargs)
            refs[name] = weakref.ref(model)
            return model
        return load

    def dit_loader(*args, **kwargs):
        alive.update({name: ref() is not None for name, ref in refs.items()})  # no gc.collect(): generate must free
        raise _StopBeforeDiT

    monkeypatch.setattr(generate, "load_text_encoder", recording("text encoder", generate.load_text_encoder))
    monkeypatch.setattr(generate, "load_audio_encoder", recording("audio encoder", generate.load_audio_encoder))
    monkeypatch.setattr(generate, "load_dit", dit_loader)
    with pytest.raises(_StopBeforeDiT):
        cli.main(["generate", "--models", str(models), "--image", str(inputs / "face.png"), "--audio",
                  str(inputs / "voice.wav"), "--size", "128*128", "--vae", str(models / "vae" / "wan_2.1_vae_diffusers"),
                  "--device", "cpu", "--out", str(tmp_path / "x.mp4")])
    assert alive == {"text encoder": False, "audio encoder": False}
    gc.collect()


def test_existing_out_is_refused_before_loading_unless_overwrite(models, inputs, tmp_path):
    out = tmp_path / "done.mp4"
    out.write_bytes(b"an earlier video")
    result = _generate(models, inputs, out, "--num-clips", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: {out} already exists (not overwritten); pass --overwrite to replace it\n" in result.stderr
    assert "text encoder" not in result.stderr and out.read_bytes() == b"an earlier video"  # nothing was loaded
    # with --overwrite the file is no problem (stopped here by a bad device, before loading)
    result = _generate(models, inputs, out, "--overwrite", "--device", "gpu")
    assert result.returncode == 2 and "already exists" not in result.stderr and "--device 'gpu'" in result.stderr
    assert out.read_bytes() == b"an earlier video"


def test_output_without_video_extension_is_refused_before_loading(models, inputs, tmp_path):
    result = _generate(models, inputs, tmp_path / "out" / "c7", "--num-clips", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "expected a video file name ending in .mp4" in result.stderr and "found extension none" in result.stderr
    assert "text encoder" not in result.stderr  # nothing was loaded
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_in_one_pass_before_loading(models, inputs, tmp_path):
    """Too-short audio, a truncated VAE and a bad device name: three one-line errors, nothing loaded."""
    soundfile.write(tmp_path / "blip.wav", synth_speech(0.01, 16000), 16000)  # 160 samples < one wav2vec2 frame
    vae = next((models / "vae" / "wan_2.1_vae_diffusers").glob("*.safetensors")).read_bytes()
    (tmp_path / "cut_vae.safetensors").write_bytes(vae[: len(vae) // 2])
    cmd = [sys.executable, "-m", "liveavatar", "generate", "--models", str(models), "--image", str(inputs / "face.png"),
           "--audio", str(tmp_path / "blip.wav"), "--vae", str(tmp_path / "cut_vae.safetensors"), "--device", "gpu",
           "--size", "128*128", "--out", str(tmp_path / "x.mp4")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3, result.stderr
    assert any("blip.wav: audio too short: 160 samples" in e for e in errors)
    assert any("cut_vae.safetensors: truncated safetensors file" in e for e in errors)
    assert any("--device 'gpu': expected auto, cpu, cuda or cuda:N" in e for e in errors)
    assert "text encoder" not in result.stderr and not (tmp_path / "x.mp4").exists()


@pytest.mark.skipif(torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None,
                    reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_one_line_before_loading(models, inputs, tmp_path):
    result = _generate(models, inputs, tmp_path / "x.mp4", "--device", "cuda")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: --device cuda: this torch" in result.stderr and "CPU-only build" in result.stderr
    assert "text encoder" not in result.stderr


def test_silent_and_short_audio_are_warned_about(models, inputs, tmp_path):
    """Silence and a track shorter than one clip still run, with a warning each (stopped here by a bad --out)."""
    soundfile.write(tmp_path / "quiet.wav", np.zeros(16000, dtype=np.float32), 16000)  # 1 s of silence
    result = _generate(models, inputs, tmp_path / "x", "--audio", str(tmp_path / "quiet.wav"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert any("quiet.wav is silent or nearly" in w for w in warnings), result.stderr
    assert any("quiet.wav is 1.00 s, shorter than one clip (48 frames = 1.92 s)" in w for w in warnings), result.stderr


def test_model_file_checks_read_headers_only(models, tmp_path):
    """A model of the wrong kind in a slot and a truncated .pth zip are refused from their headers."""
    from liveavatar_pack.cli.commands import UserError
    from liveavatar_pack.cli.preflight import check_model_file

    text = models / "text_encoders" / "umt5_tiny.safetensors"
    check_model_file("text_encoder", text)
    with pytest.raises(UserError, match=r"expected the vae \(Wan VAE\); found a umT5 text encoder"):
        check_model_file("vae", text)
    pth = tmp_path / "vae.pth"
    torch.save({"w": torch.zeros(1000)}, pth)
    check_model_file("vae", pth)
    pth.write_bytes(pth.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated or damaged zip"):
        check_model_file("vae", pth)


# ---------------------------------------------------------------- one-line errors (issue #11)

def _fail_info_with(monkeypatch, exc):
    from liveavatar_pack.cli import commands

    def run(self, args):
        raise exc

    monkeypatch.setattr(commands.Info, "run", run)


def test_worker_error_is_one_line_with_its_reason(monkeypatch, capsys):
    from liveavatar_pack import cli
    from liveavatar_pack.distributed.launcher import WorkerError

    tail = 'Traceback (most recent call last):\n  File "worker.py", line 9, in serve\nRuntimeError: CUDA error: device-side assert'
    _fail_info_with(monkeypatch, WorkerError("rank 1 failed while sampling", 1, tail))
    monkeypatch.delenv("LIVEAVATAR_DEBUG", raising=False)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 failed while sampling"), err
    assert "RuntimeError: CUDA error: device-side assert" in lines[0] and "LIVEAVATAR_DEBUG=1" in lines[0]
    assert "Traceback" not in err and "worker.py" not in err

    monkeypatch.setenv("LIVEAVATAR_DEBUG", "1")  # the traceback (the worker's with it) only on request
    with pytest.raises(WorkerError, match="worker.py"):
        cli.main(["info"])


@pytest.mark.parametrize("exc,status", [(RuntimeError("boom\nsecond line"), 1), (MemoryError(), 1), (KeyError("x"), 1)])
def test_unexpected_errors_are_one_line(monkeypatch, capsys, exc, status):
    from liveavatar_pack import cli

    _fail_info_with(monkeypatch, exc)
    monkeypatch.delenv("LIVEAVATAR_DEBUG", raising=False)
    assert cli.run(["info"]) == status  # the process entry (python -m liveavatar, the liveavatar command)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "LIVEAVATAR_DEBUG=1" in lines[0], lines
    with pytest.raises(type(exc)):  # in-process callers of main() still see the exception itself
        cli.main(["info"])


def test_python_m_liveavatar_prints_an_unexpected_error_in_one_line(tmp_path):
    """The real entry (liveavatar/__main__.py, also the ``liveavatar`` command) with a command that hits a bug."""
    script = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from liveavatar.bootstrap import load_pack\n"
        "pack = load_pack()\n"
        "from importlib import import_module\n"
        "commands = import_module(pack.__name__ + '.cli.commands')\n"
        "def boom(self, args):\n"
        "    raise RuntimeError('CUDA error: an illegal memory access was encountered\\nmore detail')\n"
        "commands.Info.run = boom\n"
        "sys.argv = ['liveavatar', 'info']\n"
        "main = import_module(pack.__name__ + '.liveavatar.__main__').main\n"
        "sys.exit(main())\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "LIVEAVATAR_DEBUG"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: RuntimeError: CUDA error: an illegal memory access was encountered (set LIVEAVATAR_DEBUG=1 for the traceback)"]


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this OS")
def test_fifo_as_dit_is_one_line_not_a_hang(models, inputs, tmp_path):
    import os

    fifo = tmp_path / "dit.safetensors"
    os.mkfifo(fifo)
    vae = models / "vae" / "wan_2.1_vae_diffusers"
    cmd = [sys.executable, "-m", "liveavatar", "generate", "--models", str(models), "--dit", str(fifo),
           "--image", str(inputs / "face.png"), "--audio", str(inputs / "voice.wav"), "--vae", str(vae),
           "--size", "128*128", "--out", str(tmp_path / "x.mp4")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"{fifo}: expected a regular model file; found a FIFO" in result.stderr
