"""Audio features: golden parity of every stage, input forms, edge cases, long-track windowing."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import golden_subdir
from liveavatar_pack.liveavatar.audio import AudioConfig, AudioFeatures, encode_audio, load_audio
from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder
from liveavatar_pack.liveavatar.tiny import tiny_audio_encoder


@pytest.fixture(scope="module")
def audio_dir(golden_dir):
    return golden_subdir(golden_dir, "audio")


@pytest.fixture(scope="module")
def golden(audio_dir):
    return load_file(str(audio_dir / "golden.safetensors"))


@pytest.fixture(scope="module")
def encoder(audio_dir):
    return load_audio_encoder(audio_dir / "wav2vec2")


@pytest.fixture(scope="module")
def features(encoder, audio_dir):
    return encode_audio(encoder, audio_dir / "test_16k.wav")


@pytest.fixture(scope="module")
def own_encoder():
    """A tiny wav2vec2 the tests build: the input and long-track tests run without the golden data."""
    return tiny_audio_encoder(0)


def _frames_per_clip(golden_dir) -> int:
    """Video frames per clip the golden bucket was built with (launch args, else the MANIFEST formula)."""
    log = golden_dir / "pipeline_tpp" / "call_log.json"
    if log.is_file():
        launch = json.loads(log.read_text()).get("launch", {})
        if "infer_frames" in launch:
            return int(launch["infer_frames"])
    match = re.search(r"batch_frames=(\d+)", (golden_dir / "MANIFEST.md").read_text())
    assert match, "the golden data does not say how many frames a clip has"
    return int(match.group(1))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out - ref).abs().max().item() / max(1.0, ref.abs().max().item())


def _speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Harmonics with a drifting pitch under a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.3 * t + seed)) / sr
    y = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)
    return (0.3 * y / np.abs(y).max()).astype(np.float32)


# -- golden parity ------------------------------------------------------------------------------


@pytest.mark.golden
def test_normalised_input_matches_golden(features, golden):
    assert features.input_values.shape == golden["input_values"].shape
    assert _rel_err(features.input_values, golden["input_values"]) <= 1e-6


@pytest.mark.golden
def test_hidden_states_match_golden(features, golden):
    ref = golden["hidden_states"]
    assert (features.num_layers, features.num_50hz, features.dim) == tuple(ref.shape)
    out = features.hidden_50hz(torch.arange(features.num_50hz))
    # measured 2.8e-7 of max|x| with 2 threads; the MANIFEST suggests 1e-4
    assert (out - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()


@pytest.mark.golden
def test_30hz_features_match_golden_and_torch_interpolate(features, golden):
    ref = golden["feat_30fps"]
    assert features.num_30hz == ref.shape[1]
    out = features.features_30hz(torch.arange(features.num_30hz))
    assert (out - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()
    hidden = features.hidden_50hz(torch.arange(features.num_50hz))
    torch_ref = F.interpolate(hidden.transpose(1, 2), size=features.num_30hz, mode="linear", align_corners=True)
    # same float32 arithmetic as upstream's interpolate (bit-equal where torch's kernel uses FMA, as on x86)
    assert (out - torch_ref.transpose(1, 2)).abs().max().item() <= 2.5e-7 * hidden.abs().max().item()


@pytest.mark.golden
def test_bucket_matches_golden(features, golden, golden_dir):
    ref, ref_idx = golden["bucket"], golden["bucket_sample_indices"]
    fpc = _frames_per_clip(golden_dir)
    clips = features.num_clips(fpc)
    assert clips * fpc == ref.shape[0]
    assert torch.equal(torch.from_numpy(features.frame_indices(0, clips * fpc)), ref_idx)
    emb = features.frames(0, clips * fpc)
    assert emb.shape == (1, ref.shape[1], ref.shape[2], ref.shape[0])
    assert (emb - ref.permute(1, 2, 0)[None]).abs().max().item() <= 2e-6 * ref.abs().max().item()
    assert features.num_frames == int((ref_idx < features.num_30hz).sum())
    # block-sized reads (as the sampler does them) give the same rows
    blocks = torch.cat([features.frames(s, s + 12) for s in range(0, clips * fpc, 12)], dim=-1)
    assert torch.equal(blocks, emb)


@pytest.mark.golden
def test_resampling_22050_matches_librosa_golden(audio_dir, golden):
    ref = golden["waveform_22050_resampled_to_16k"].numpy()
    wav = load_audio(audio_dir / "test_22050.wav")
    assert wav.sample_rate == 16000 and wav.samples.shape == ref.shape
    assert np.abs(wav.samples - ref).max() <= 1e-6
    data, sr = sf.read(str(audio_dir / "test_22050.wav"), dtype="float32")
    comfy = {"waveform": torch.from_numpy(data)[None, None], "sample_rate": sr}  # ComfyUI AUDIO
    assert np.abs(load_audio(comfy).samples - ref).max() <= 1e-6


# -- loaders ------------------------------------------------------------------------------------


@pytest.mark.golden
def test_comfyui_single_file_layout_loads_the_same_encoder(audio_dir, encoder, tmp_path):
    cfg = json.loads((audio_dir / "wav2vec2" / "config.json").read_text())
    state = load_file(str(audio_dir / "wav2vec2" / "model.safetensors"))
    comfy = {}
    for key, value in state.items():  # ComfyUI's names: no "wav2vec2." prefix, parametrized weight norm
        key = key.removeprefix("wav2vec2.")
        key = key.replace("conv.weight_g", "conv.parametrizations.weight.original0")
        key = key.replace("conv.weight_v", "conv.parametrizations.weight.original1")
        comfy[key] = value
    save_file(comfy, str(tmp_path / "w2v.safetensors"))
    model = load_audio_encoder(tmp_path / "w2v.safetensors", num_heads=cfg["num_attention_heads"])
    x = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = torch.cat(model(x, output_hidden_states=True).hidden_states)
        b = torch.cat(encoder(x, output_hidden_states=True).hidden_states)
    assert torch.equal(a, b)
    assert model.config.conv_stride == encoder.config.conv_stride
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "w2v_fp16.safetensors"))
    assert load_audio_encoder(tmp_path / "w2v_fp16.safetensors", num_heads=2).dtype == torch.float16
    with pytest.raises(ValueError, match="num_heads"):
        load_audio_encoder(tmp_path / "w2v.safetensors")  # hidden 16: head count not derivable
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        load_audio_encoder(tmp_path / "other.safetensors")


# -- inputs and edge cases ------------------------------------------------------------------------


def test_stereo_and_comfy_audio_equal_their_mono_mix(own_encoder):
    left, right = _speech_like(1.0), _speech_like(1.0, seed=1)
    mono = (left + right) / 2
    ref = encode_audio(own_encoder, mono, 16000)
    stereo = encode_audio(own_encoder, np.stack([left, right]), 16000)
    comfy = encode_audio(own_encoder, {"waveform": torch.from_numpy(np.stack([left, right]))[None], "sample_rate": 16000})
    n = ref.num_frames
    assert torch.allclose(stereo.frames(0, n), ref.frames(0, n), atol=1e-6)
    assert torch.equal(comfy.frames(0, n), stereo.frames(0, n))
    with pytest.raises(ValueError, match="batch of 2"):
        load_audio({"waveform": torch.zeros(2, 1, 16000), "sample_rate": 16000})


def test_silence_gives_finite_features(own_encoder):
    feats = encode_audio(own_encoder, np.zeros(16000, np.float32), 16000)
    assert torch.count_nonzero(feats.input_values) == 0
    out = feats.frames(0, feats.num_frames)
    assert out.shape == (1, feats.num_layers, feats.dim, feats.num_frames) and torch.isfinite(out).all()


def test_audio_shorter_than_a_clip_is_zero_padded(own_encoder, tmp_path):
    sf.write(str(tmp_path / "short.wav"), _speech_like(0.5, sr=44100), 44100)
    feats = encode_audio(own_encoder, tmp_path / "short.wav")
    assert feats.num_clips(48) == 1 and 0 < feats.num_frames < 48
    clip = feats.frames(0, 48)
    assert clip.shape[-1] == 48
    assert clip[..., feats.num_frames:].abs().max() == 0
    assert clip[..., : feats.num_frames].abs().amax(dim=(0, 1, 2)).min() > 0
    assert feats.frames(100, 112).abs().max() == 0  # far past the end: zeros, no error


def test_too_short_empty_and_unreadable_audio_are_clear_errors(own_encoder, tmp_path):
    sf.write(str(tmp_path / "tiny.wav"), np.zeros(399, np.float32), 16000)
    with pytest.raises(ValueError, match=r"tiny\.wav.*too short to hold one wav2vec2 frame"):
        encode_audio(own_encoder, tmp_path / "tiny.wav")
    encode_audio(own_encoder, np.zeros(400, np.float32), 16000)  # exactly one frame is fine
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty\.wav"):
        load_audio(tmp_path / "empty.wav")
    (tmp_path / "notes.wav").write_text("not audio at all")
    with pytest.raises(ValueError, match=r"notes\.wav"):
        load_audio(tmp_path / "notes.wav")
    with pytest.raises(ValueError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


# -- long tracks ---------------------------------------------------------------------------------


def test_windowed_long_audio_close_to_one_shot(own_encoder):
    """64 s track, 10 s windows with 5 s context vs one pass (the tests' own tiny wav2vec2; audio.py's docstring)."""
    wav = load_audio(_speech_like(64.0), 16000)
    one_shot = AudioFeatures(own_encoder, wav, AudioConfig(window_seconds=1000.0))
    windowed = AudioFeatures(own_encoder, wav, AudioConfig(window_seconds=10.0, context_seconds=5.0, cached_windows=2))
    assert windowed._window < windowed.num_50hz  # really windowed
    n = one_shot.num_frames
    ref = one_shot.frames(0, n)
    out = torch.cat([windowed.frames(s, min(s + 48, n)) for s in range(0, n, 48)], dim=-1)
    assert len(windowed._cache) <= 2  # memory stays bounded: only the newest windows are kept
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-2, rel  # measured 1.7e-3 with tiny_audio_encoder(0) (2.3e-2 with the golden tiny model)
    assert windowed.num_frames == n and windowed.num_clips(48) == one_shot.num_clips(48)


# -- precision, one reader, planner ----------------------------------------------------------------


def _module_bytes(module: torch.nn.Module) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}.values())


@pytest.fixture(scope="module")
def tiny_w2v_state():
    from liveavatar_pack.liveavatar.tiny import tiny_audio_encoder

    model = tiny_audio_encoder(seed=3, hidden=64)
    return model, {k: v for k, v in model.state_dict().items() if k != "masked_spec_embed"}


def test_sft_pth_and_folded_weight_norm_files_load(tiny_w2v_state, tmp_path):
    """ComfyUI's .sft suffix, a .pth and an export with the pos-conv weight norm folded all load alike."""
    model, state = tiny_w2v_state
    save_file(state, str(tmp_path / "w2v.sft"))
    torch.save({"wav2vec2." + k: v for k, v in state.items()}, tmp_path / "w2v.pth")
    x = torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.cat(model(x, output_hidden_states=True).hidden_states)
        for name in ("w2v.sft", "w2v.pth"):
            got = load_audio_encoder(tmp_path / name, dtype=torch.float32, num_heads=2)
            assert torch.equal(torch.cat(got(x, output_hidden_states=True).hidden_states), want), name
    folded = dict(state)
    g = folded.pop("encoder.pos_conv_embed.conv.parametrizations.weight.original0")
    v = folded.pop("encoder.pos_conv_embed.conv.parametrizations.weight.original1")
    folded["encoder.pos_conv_embed.conv.weight"] = v * (g / v.norm(dim=(0, 1), keepdim=True))
    save_file(folded, str(tmp_path / "w2v_folded.sft"))
    got = load_audio_encoder(tmp_path / "w2v_folded.sft", dtype=torch.float32, num_heads=2)
    with torch.no_grad():
        out = torch.cat(got(x, output_hidden_states=True).hidden_states)
    assert (out - want).abs().max() <= 1e-4 * want.abs().max()
    (tmp_path / "cut.sft").write_bytes((tmp_path / "w2v.sft").read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"cut\.sft.*truncated"):
        load_audio_encoder(tmp_path / "cut.sft")


@pytest.mark.golden
def test_bf16_and_fp16_parity_cost(audio_dir, golden):
    """The README's figures: max |err| / max |golden| over all 25 hidden states per compute dtype."""
    ref = golden["hidden_states"]
    errs = {}
    for dtype in (torch.bfloat16, torch.float16):
        feats = encode_audio(load_audio_encoder(audio_dir / "wav2vec2", dtype=dtype), audio_dir / "test_16k.wav")
        errs[dtype] = ((feats.hidden_50hz(torch.arange(feats.num_50hz)) - ref).abs().max() / ref.abs().max()).item()
    assert errs[torch.bfloat16] <= 3.5e-2, errs  # measured 1.7e-2
    assert errs[torch.float16] <= 5e-3, errs  # measured 2.3e-3


def test_planner_audio_bytes_equal_what_the_loader_allocates(tiny_w2v_state, tmp_path):
    from liveavatar_pack.liveavatar.tiny import tiny_text_encoder
    from liveavatar_pack.model_loaders.planner import EncoderSizes

    model, state = tiny_w2v_state
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "w2v_fp16.safetensors"))
    sizes = EncoderSizes.of_models(tiny_text_encoder(), model)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        loaded = load_audio_encoder(tmp_path / "w2v_fp16.safetensors", dtype=dtype, num_heads=2)
        assert sizes.with_precision(audio=precision).audio_total == _module_bytes(loaded), precision


# ---------------------------------------------------------------- unreadable files say what they hold (issue #11)

@pytest.mark.parametrize("content,found", [
    (b"hello, this is not a recording\n", "found text, not audio"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "found a WAV header (16 bytes) without decodable audio"),
    (bytes(range(7, 107)), "found 100 bytes in no audio format"),
    (b"", "found an empty file (0 bytes)"),
])
def test_unreadable_audio_file_says_what_was_found(tmp_path, content, found):
    from liveavatar_pack.liveavatar.audio import load_audio

    path = tmp_path / "voice.wav"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_audio(path)
    text = str(err.value)
    assert text.startswith(f"cannot read audio file {path}: ") and found in text, text
    assert not text.rstrip().endswith(":") and "\n" not in text
