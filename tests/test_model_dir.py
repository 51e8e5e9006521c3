"""Model folder discovery chooses each part by content, not by name, and says what it chose.

The look-alikes are written with the real key names of the models users keep beside ours:
Comfy-Org's ``wan2.2_vae.safetensors`` (the Wan 2.2 VAE: z_dim 48, 2x2-patchified 12-channel
input, nested ``downsamples.N.downsamples.M`` blocks - ComfyUI's ``comfy/ldm/wan/vae2_2.py``)
at tiny widths, a Wan T2V DiT (no S2V audio modules), Flux's ``t5xxl`` (T5: position bias in
block 0 only), a wav2vec2 of another width, a LoRA for another model size.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest
import torch
from safetensors.torch import save_file

from liveavatar_pack.cli.tiny_models import tiny_dit_config
from liveavatar_pack.liveavatar.tiny import tiny_audio_encoder, tiny_text_encoder, tiny_transformer, tiny_vae
from liveavatar_pack.model_loaders.model_dir import find_model_files
from liveavatar_pack.model_loaders.vae import load_wan_vae, to_wan_state_dict

ROOT = Path(__file__).resolve().parent.parent


def wan22_vae_shapes(dim=4, dec_dim=8, z_dim=48, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                     temporal_down=(False, True, True)) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a Wan 2.2 VAE (WanVAE of vae2_2.py: encoder dim 160, decoder 256, z 48 at full size)."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(name, o, i, k=(3, 3, 3)):
        out[f"{name}.weight"], out[f"{name}.bias"] = (o, i, *k), (o,)

    def residual(name, i, o):
        out[f"{name}.residual.0.gamma"] = (i, 1, 1, 1)
        conv(f"{name}.residual.2", o, i)
        out[f"{name}.residual.3.gamma"] = (o, 1, 1, 1)
        conv(f"{name}.residual.6", o, o)
        if i != o:
            conv(f"{name}.shortcut", o, i, (1, 1, 1))

    def middle(name, d):
        residual(f"{name}.0", d, d)
        out[f"{name}.1.norm.gamma"] = (d, 1, 1)
        conv(f"{name}.1.to_qkv", 3 * d, d, (1, 1))
        conv(f"{name}.1.proj", d, d, (1, 1))
        residual(f"{name}.2", d, d)

    levels = len(dim_mult)
    dims = [dim * u for u in (1, *dim_mult)]
    conv("encoder.conv1", dims[0], 12)  # 3 colours x 2x2 patch
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(num_res_blocks):
            residual(f"encoder.downsamples.{i}.downsamples.{j}", a if j == 0 else b, b)
        if i != levels - 1:
            conv(f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.resample.1", b, b, (3, 3))
            if temporal_down[i]:
                conv(f"encoder.downsamples.{i}.downsamples.{num_res_blocks}.time_conv", b, b, (3, 1, 1))
    middle("encoder.middle", dims[-1])
    out["encoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("encoder.head.2", 2 * z_dim, dims[-1])
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))
    dims = [dec_dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
    temporal_up = temporal_down[::-1]
    conv("decoder.conv1", dims[0], z_dim)
    middle("decoder.middle", dims[0])
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        for j in range(num_res_blocks + 1):
            residual(f"decoder.upsamples.{i}.upsamples.{j}", a if j == 0 else b, b)
        if i != levels - 1:
            conv(f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}.resample.1", b, b, (3, 3))
            if temporal_up[i]:
                conv(f"decoder.upsamples.{i}.upsamples.{num_res_blocks + 1}.time_conv", 2 * b, b, (3, 1, 1))
    out["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 12, dims[-1])
    return out


def write_wan22_vae(path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in wan22_vae_shapes().items()}, path)
    return path


def test_fake_wan22_vae_has_the_real_layout():
    shapes = wan22_vae_shapes(dim=160, dec_dim=256)
    assert shapes["conv2.weight"] == (48, 48, 1, 1, 1) and shapes["encoder.conv1.weight"] == (160, 12, 3, 3, 3)
    assert shapes["encoder.head.2.weight"] == (96, 640, 3, 3, 3) and shapes["decoder.conv1.weight"] == (1024, 48, 3, 3, 3)
    assert shapes["decoder.head.2.weight"] == (12, 256, 3, 3, 3)
    assert "encoder.downsamples.0.downsamples.0.residual.0.gamma" in shapes  # nested Down_ResidualBlock
    assert "decoder.upsamples.1.upsamples.3.time_conv.weight" in shapes  # temporal upsample of level 1


def write_wan21_vae(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in to_wan_state_dict(tiny_vae(seed=1).model).items()}, path)
    return path


def test_wan21_vae_chosen_over_wan22_beside_it(tmp_path):
    models = tmp_path / "models"
    wan22 = write_wan22_vae(models / "vae" / "wan2.2_vae.safetensors")
    wan21 = write_wan21_vae(models / "vae" / "wan_2.1_vae.safetensors")
    with pytest.raises(ValueError, match="Wan 2.2"):  # the loader refuses it, so discovery must not pick it
        load_wan_vae(wan22)
    files = find_model_files(models)
    assert files.vae == wan21
    assert "Wan 2.1 VAE, z_dim 16" in files.found["vae"]
    report = "\n".join(files.report())
    assert f"vae: {wan21}" in report and f"passed over {wan22}: a Wan 2.2 VAE (z_dim 48, 12 input channels" in report
    wan21.unlink()  # only the Wan 2.2 VAE: nothing chosen, and the refusal says why
    files = find_model_files(models)
    assert files.vae is None
    with pytest.raises(FileNotFoundError, match=r"(?s)- vae: get .*found but refused: .*wan2\.2_vae\.safetensors: a Wan 2\.2 VAE"):
        files.require(models)


def _save(sd: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return path


def test_every_part_chosen_by_content(tmp_path):
    """Look-alikes that sort first or carry the right words in their names are passed over."""
    models = tmp_path / "models"
    dit = tiny_transformer(4, tiny_dit_config())  # dim 128 (config read off the shapes): text width 32, audio 64 x 25
    dit_sd = {"model.diffusion_model." + k: v for k, v in dit.state_dict().items()}
    s2v = _save(dit_sd, models / "diffusion_models" / "wan2.2_s2v_14B_bf16.safetensors")
    t2v = {k: v for k, v in dit_sd.items() if "audio" not in k and "cond" not in k}
    t2v["model.diffusion_model.head.modulation"] = torch.zeros(1, 2, 128)
    t2v_path = _save(t2v, models / "diffusion_models" / "wan2.2_s2v_14B_a_t2v_mislabelled.safetensors")

    def hf_text(dim):  # the HF/ComfyUI layout, tied embedding dropped
        return {k: v for k, v in tiny_text_encoder(seed=3, dim=dim).state_dict().items() if k != "encoder.embed_tokens.weight"}

    text = hf_text(32)
    t5 = {k: v for k, v in text.items() if not (".relative_attention_bias." in k and not k.startswith("encoder.block.0."))}
    t5_path = _save(t5, models / "text_encoders" / "umt5_a_really_t5xxl.safetensors")
    wide = _save(hf_text(48), models / "text_encoders" / "umt5_b_wide.safetensors")
    umt5 = _save(text, models / "text_encoders" / "umt5_xxl_fp16.safetensors")
    _save(text, models / "text_encoders" / "t5xxl_fp16.safetensors")  # not named umt5: tried only after

    narrow = _save(tiny_audio_encoder(seed=2, hidden=32).state_dict(), models / "audio_encoders" / "wav2vec2_a_base_english.safetensors")
    audio = _save(tiny_audio_encoder(seed=2, hidden=64).state_dict(), models / "audio_encoders" / "wav2vec2_large_english_fp16.safetensors")

    gen = torch.Generator().manual_seed(0)
    mods = dict(dit.named_modules())

    def lora(dim_in=None, full=None):
        out = {}
        for m in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
            o, i = mods[m].weight.shape
            out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, dim_in or i, generator=gen)
            out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(o, 4, generator=gen)
            out[f"base_model.model.{m}.alpha"] = torch.tensor(4.0)
        return {**out, **(full or {})}

    bad_lora = _save(lora(dim_in=5120), models / "loras" / "liveavatar_a_for_14B.safetensors")
    good_lora = _save(lora(full={"base_model.model.blocks.0.norm3.weight": torch.ones(128)}),
                      models / "loras" / "liveavatar_b.safetensors")
    files = find_model_files(models)
    assert (files.dit, files.text_encoder, files.audio_encoder, files.lora) == (s2v, umt5, audio, good_lora)
    passed = {part: "\n".join(lines) for part, lines in files.passed_over.items()}
    assert f"{t2v_path}: its keys are those of a Wan DiT without the S2V audio modules" in passed["dit"]
    assert f"{t5_path}: a T5 encoder (position bias in block 0 only" in passed["text_encoder"]
    assert f"{wide}: a umT5 of width 48; the DiT takes text of width 32" in passed["text_encoder"]
    assert f"{narrow}: a wav2vec2 of width 32 with 25 hidden states; the DiT mixes 25 hidden states of width 64" in passed["audio_encoder"]
    assert f"{bad_lora}: its module blocks.0.self_attn.q" in passed["lora"]
    assert "1 full tensors" in files.found["lora"]
    # an explicit path wins, unchecked (its loader checks it)
    assert find_model_files(models, lora=bad_lora).lora == bad_lora


@pytest.mark.slow
def test_generate_runs_with_a_wan22_vae_beside_the_wan21_one(tmp_path):
    """Done-when of issue 10: a tiny-models folder plus Comfy-Org's Wan 2.2 VAE file still runs ``generate``."""
    from liveavatar_pack.liveavatar.demo_assets import synth_face, synth_speech
    from liveavatar_pack.liveavatar.video import write_wav

    models = tmp_path / "models"
    made = subprocess.run([sys.executable, "-m", "liveavatar", "tiny-models", "--out", str(models)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    wan22 = write_wan22_vae(models / "vae" / "wan2.2_vae.safetensors")
    assert sorted(p.name for p in (models / "vae").iterdir())[0] == wan22.name  # first by name, as before the fix
    synth_face(64, 128).save(tmp_path / "face.png")
    write_wav(tmp_path / "voice.wav", synth_speech(1.6, 16000), 16000)
    out = tmp_path / "talk.mp4"
    result = subprocess.run(
        [sys.executable, "-m", "liveavatar", "generate", "--models", str(models), "--image", str(tmp_path / "face.png"),
         "--audio", str(tmp_path / "voice.wav"), "--size", "128*128", "--num-clips", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wan_2.1_vae.safetensors (Wan 2.1 VAE, z_dim 16)" in result.stderr
    assert "passed over" in result.stderr and "wan2.2_vae.safetensors: a Wan 2.2 VAE" in result.stderr
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 45
