"""Wan 2.1 VAE: loader, normalised encode, streaming decode, TPP schedule, uint8 frames."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar_pack.liveavatar.config import SamplerConfig
from liveavatar_pack.liveavatar.vae import BlockDecoder, StreamingDecoder, WanVAE, to_uint8
from liveavatar_pack.model_loaders.vae import build_wan_vae, infer_wan_vae_config, load_wan_vae, wan_vae_key_names


def _tol(golden: torch.Tensor) -> float:
    return 2e-5 * max(1.0, golden.abs().max().item())


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------- golden parity
@pytest.fixture(scope="module")
def golden_vae(golden_dir):
    from conftest import golden_subdir

    d = golden_subdir(golden_dir, "vae")
    vae = load_wan_vae(d / "vae.safetensors", config=d / "config.json")
    return d, vae, load_file(str(d / "golden.safetensors"))


@pytest.mark.golden
def test_loader_reads_config_from_shapes(golden_vae):
    d, vae, _ = golden_vae
    cfg = json.loads((d / "config.json").read_text())
    inferred = infer_wan_vae_config(load_file(str(d / "vae.safetensors")))
    assert inferred["base_dim"] == cfg["dim"]
    assert inferred["z_dim"] == cfg["z_dim"] == vae.z_dim
    assert inferred["dim_mult"] == list(cfg["dim_mult"])
    assert inferred["num_res_blocks"] == cfg["num_res_blocks"]
    assert inferred["temperal_downsample"] == [bool(v) for v in cfg["temperal_downsample"]]
    assert torch.allclose(vae._mean.flatten(), torch.tensor(cfg["latent_mean"]))
    assert torch.allclose(1 / vae._inv_std.flatten(), torch.tensor(cfg["latent_std"]))


@pytest.mark.golden
@pytest.mark.parametrize("name", ["encode_image_1f_mean", "encode_image_5f_mean"])
def test_encode_image(golden_vae, name):
    _, vae, g = golden_vae
    want = g[name]
    frames = 1 + vae.temporal_stride * (want.shape[1] - 1)  # the image repeated to T frames
    video = g["image"][:, None].repeat(1, frames, 1, 1)
    got = vae.encode(video)
    err = _maxdiff(got, want)
    assert err <= _tol(want), f"{name}: max |diff| {err:.3g}"


@pytest.mark.golden
def test_encode_video9(golden_vae):
    _, vae, g = golden_vae
    want = g["encode_video9_mean"]
    err = _maxdiff(vae.encode(g["video9"]), want)
    assert err <= _tol(want), f"encode_video9_mean: max |diff| {err:.3g}"


@pytest.mark.golden
def test_decode_full(golden_vae):
    _, vae, g = golden_vae
    want = g["decode_full_out"]
    got = vae.decode(g["decode_latent"])
    err = _maxdiff(got, want)
    assert err <= _tol(want), f"decode_full_out: max |diff| {err:.3g}"
    assert got.abs().max() <= 1.0


@pytest.mark.golden
def test_streaming_decode_golden(golden_vae):
    _, vae, g = golden_vae
    dec = vae.streaming_decoder()
    for part in ("warmup", "chunk0", "chunk1"):
        want = g[f"stream_out_{part}"]
        assert dec.frames_for(g[f"stream_in_{part}"].shape[1]) == want.shape[1]
        got = dec.decode(g[f"stream_in_{part}"])
        err = _maxdiff(got, want)
        assert err <= _tol(want), f"stream_out_{part}: max |diff| {err:.3g}"


@pytest.mark.golden
def test_block_decoder_matches_golden_stream(golden_vae):
    """The TPP helper: warm-up output discarded, first block's first frames dropped."""
    _, vae, g = golden_vae
    cfg = SamplerConfig()
    bd = BlockDecoder(vae)
    assert (bd.warmup_latents, bd.drop_first_frames) == (cfg.decoder_warmup_latents, cfg.dropped_first_frames)
    warm = g["stream_in_warmup"]
    if warm.shape[1] != bd.warmup_latents:
        pytest.fail(f"golden warm-up has {warm.shape[1]} latents, SamplerConfig says {bd.warmup_latents}")
    bd.warm_up(warm)
    first = bd.decode_block(g["stream_in_chunk0"])
    second = bd.decode_block(g["stream_in_chunk1"])
    want0 = g["stream_out_chunk0"][:, bd.drop_first_frames :]
    assert _maxdiff(first, want0) <= _tol(want0)
    assert _maxdiff(second, g["stream_out_chunk1"]) <= _tol(g["stream_out_chunk1"])


@pytest.mark.golden
def test_pth_loads_like_safetensors(golden_vae, tmp_path):
    d, vae, g = golden_vae
    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save(load_file(str(d / "vae.safetensors")), pth)
    other = load_wan_vae(pth, config=d / "config.json")
    for a, b in zip(vae.model.state_dict().values(), other.model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.golden
def test_wan_key_names_match_golden_file(golden_dir):
    from conftest import golden_subdir

    d = golden_subdir(golden_dir, "vae")
    assert sorted(load_file(str(d / "vae.safetensors"))) == sorted(wan_vae_key_names())


def test_full_size_vae_layout_is_recognised():
    """The real 96-wide Wan 2.1 layout, built on the meta device (no weights needed)."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    to_wan = convert_wan_vae_to_diffusers({k: k for k in wan_vae_key_names()})
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=96).state_dict()
    sd = {to_wan[dk]: torch.empty(t.shape, device="meta", dtype=torch.bfloat16) for dk, t in ref.items()}
    cfg = infer_wan_vae_config(sd)
    assert cfg["base_dim"] == 96 and cfg["z_dim"] == 16 and cfg["dim_mult"] == [1, 2, 4, 4]
    assert cfg["num_res_blocks"] == 2 and cfg["temperal_downsample"] == [False, True, True]
    vae = build_wan_vae(sd, device="meta", dtype=None)
    assert vae.temporal_stride == 4 and vae.spatial_stride == 8 and vae.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- tiny random VAE
@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    with torch.no_grad():  # make the output react to the latents instead of saturating
        for p in model.parameters():
            p.mul_(0.5)
    return WanVAE(model)


def _latents(t, h=2, w=3, seed=1):
    return torch.randn(16, t, h, w, generator=torch.Generator().manual_seed(seed))


def test_streaming_equals_one_shot(tiny_vae):
    z = _latents(10)
    full = tiny_vae.decode(z)
    assert full.shape == (3, 1 + 4 * 9, 16, 24)
    assert 0 < (full.abs() < 1).float().mean()  # not all clamped
    dec = tiny_vae.streaming_decoder()
    assert isinstance(dec, StreamingDecoder)
    parts, start = [], 0
    for n in (1, 3, 2, 4):
        parts.append(dec.decode(z[:, start : start + n]))
        start += n
    assert [p.shape[1] for p in parts] == [1, 12, 8, 16]
    assert _maxdiff(torch.cat(parts, 1), full) <= 1e-6


def test_decoders_are_independent(tiny_vae):
    x, y = _latents(5, seed=2), _latents(4, seed=3)
    a, b = tiny_vae.streaming_decoder(), tiny_vae.streaming_decoder()
    a1 = a.decode(x[:, :2])
    b1 = b.decode(y)  # a second video: must start from empty caches
    a2 = a.decode(x[:, 2:])
    assert _maxdiff(b1, tiny_vae.decode(y)) <= 1e-6
    assert _maxdiff(torch.cat([a1, a2], 1), tiny_vae.decode(x)) <= 1e-6
    # reset() starts over as well
    a.reset()
    assert _maxdiff(a.decode(y), tiny_vae.decode(y)) <= 1e-6


def test_stream_state_is_constant(tiny_vae):
    dec = tiny_vae.streaming_decoder()

    def state():
        return sum(c.numel() for c in dec._cache if isinstance(c, torch.Tensor)), len(dec._cache)

    dec.decode(_latents(3, seed=4))
    after_one = state()
    for i in range(6):
        dec.decode(_latents(3, seed=5 + i))
    assert state() == after_one


def test_block_decoder_schedule(tiny_vae):
    cfg = SamplerConfig()
    motion = _latents(9, seed=7)
    blocks = [_latents(cfg.latent_frames_per_block, seed=10 + i) for i in range(3)]
    bd = BlockDecoder.from_config(tiny_vae, cfg)
    bd.warm_up(motion)
    out = [bd.decode_block(b) for b in blocks]
    fpb = cfg.frames_per_block
    assert [o.shape[1] for o in out] == [fpb - cfg.dropped_first_frames, fpb, fpb]
    ref = tiny_vae.decode(torch.cat([motion[:, : cfg.decoder_warmup_latents]] + blocks, 1))
    skip = 1 + 4 * (cfg.decoder_warmup_latents - 1) + cfg.dropped_first_frames
    assert _maxdiff(torch.cat(out, 1), ref[:, skip:]) <= 1e-6
    with pytest.raises(ValueError):
        BlockDecoder(tiny_vae, warmup_latents=12).warm_up(motion)
    with pytest.raises(RuntimeError):
        BlockDecoder(tiny_vae).decode_block(blocks[0])


def test_encode_shapes(tiny_vae):
    video = torch.rand(3, 9, 32, 48) * 2 - 1
    lat = tiny_vae.encode(video)
    assert lat.shape == (16, 3, 4, 6) and lat.dtype == torch.float32
    assert tiny_vae.encode(video[None]).shape == (1, 16, 3, 4, 6)
    with pytest.raises(ValueError):
        tiny_vae.encode(torch.zeros(3, 1, 30, 48))


@pytest.mark.golden
def test_to_uint8_matches_pipeline_video(golden_dir):
    """Every clip's recorded first/last float frame, at the frame index the run's call log gives it."""
    from conftest import golden_subdir
    from goldens import read_json

    pipeline = golden_subdir(golden_dir, "pipeline")
    g = load_file(str(pipeline / "golden.safetensors"))
    log = read_json(pipeline / "call_log.json")
    video, ranges = g["video_uint8"], log["clip_frame_ranges"]
    assert len(ranges) == log["num_clips"] and ranges[-1][1] == video.shape[0] == log["final_frame_count"]
    checked = 0
    for clip, (start, stop) in enumerate(ranges):
        for name, index in ((f"clip{clip}_frame_first_float", start), (f"clip{clip}_frame_last_float", stop - 1)):
            if name in g:
                assert torch.equal(to_uint8(g[name][:, None])[0], video[index]), name
                checked += 1
    assert f"clip{len(ranges) - 1}_frame_last_float" in g and checked >= 2, "the last clip's last frame must be checked"


def test_to_uint8():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 6, 1, 1).repeat(3, 1, 1, 1)
    x[1] *= -1
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (6, 1, 1, 3)
    assert u[:, 0, 0, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert u[:, 0, 0, 1].tolist() == [255, 255, 127, 63, 0, 0]


def test_diffusers_directory(tiny_vae, tmp_path):
    tiny_vae.model.save_pretrained(str(tmp_path / "vae"))
    other = load_wan_vae(tmp_path / "vae")
    z = _latents(2, seed=9)
    assert _maxdiff(other.decode(z), tiny_vae.decode(z)) == 0.0


# ---------------------------------------------------------------------------- loader errors
def test_not_a_vae_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    save_file({"blocks.0.attn.q.weight": torch.zeros(4, 4)}, str(bad))
    with pytest.raises(ValueError) as info:
        load_wan_vae(bad)
    msg = str(info.value)
    assert str(bad) in msg and "Wan 2.1 VAE" in msg and "blocks.0.attn.q.weight" in msg


def test_unreadable_files(tmp_path):
    trunc = tmp_path / "cut.safetensors"
    trunc.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    obj = tmp_path / "obj.pth"
    torch.save({"step": 3, "note": "x"}, obj)
    for path in (trunc, junk, obj):
        with pytest.raises(ValueError, match=str(path.name)):
            load_wan_vae(path)
    with pytest.raises(FileNotFoundError):
        load_wan_vae(tmp_path / "missing.pth")


def test_wrong_shapes_are_reported(tmp_path):
    """A Wan-layout file with a tensor of the wrong shape names that tensor."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    # A Wan-layout dict for a small standard-layout model: invert the converter on key names.

    model = AutoencoderKLWan(base_dim=4)
    names = wan_vae_key_names()
    to_diffusers = convert_wan_vae_to_diffusers({k: k for k in names})
    inv = to_diffusers  # diffusers name -> Wan name
    sd = {inv[k]: v.clone() for k, v in model.state_dict().items()}
    assert build_wan_vae(sd).z_dim == 16
    sd["decoder.head.2.weight"] = torch.zeros(3, 5, 3, 3, 3)
    path = tmp_path / "vae_bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match="decoder"):
        load_wan_vae(path)




# ---------------------------------------------------------------------------- precision, one reader, planner
def _module_bytes(module: torch.nn.Module) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}.values())


@pytest.fixture(scope="module")
def std_vae():
    """A random VAE of the standard Wan 2.1 layout (what Wan's key names can describe), 8 wide."""
    from liveavatar_pack.liveavatar.tiny import tiny_vae as make

    return make(seed=2, base_dim=8)


def test_sft_and_pth_files_load_alike(std_vae, tmp_path):
    """ComfyUI lists .sft; every suffix goes through formats.open_checkpoint."""
    from liveavatar_pack.model_loaders.vae import to_wan_state_dict

    sd = to_wan_state_dict(std_vae.model)
    save_file(sd, str(tmp_path / "wan_2.1_vae.sft"))
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    z = _latents(2, seed=4)
    want = std_vae.decode(z)
    for name in ("wan_2.1_vae.sft", "Wan2.1_VAE.pth"):
        assert _maxdiff(load_wan_vae(tmp_path / name).decode(z), want) == 0.0, name
    (tmp_path / "cut.sft").write_bytes((tmp_path / "wan_2.1_vae.sft").read_bytes()[:20000])
    with pytest.raises(ValueError, match=r"cut\.sft.*truncated.*Wan 2.1 VAE"):
        load_wan_vae(tmp_path / "cut.sft")


def test_planner_vae_bytes_equal_what_the_loader_allocates(std_vae, tmp_path):
    from liveavatar_pack.model_loaders.planner import VAESize
    from liveavatar_pack.model_loaders.vae import to_wan_state_dict

    save_file({k: v.half() for k, v in to_wan_state_dict(std_vae.model).items()}, str(tmp_path / "vae.safetensors"))
    size = VAESize(base_dim=8, params=sum(p.numel() for p in std_vae.model.parameters()))
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        vae = load_wan_vae(tmp_path / "vae.safetensors", dtype=dtype)
        assert size.with_precision(precision).weight_bytes == _module_bytes(vae.model), precision
    # full size: the planner's default is the real 96-wide VAE counted on the meta device, in bf16
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        real = AutoencoderKLWan(base_dim=96)
    assert VAESize().params == sum(p.numel() for p in real.parameters()) and VAESize().dtype_bytes == 2


@pytest.mark.golden
def test_low_precision_decode_error(golden_vae):
    """bf16 / fp16 encode and streaming decode against the float32 golden (the README's figures).

    max |err| / max |golden|; measured on the tiny golden VAE (random weights, base width 4):
    bf16 encode 8.7e-3, stream 8.4e-2; fp16 encode 1.2e-3, stream 1.6e-2.
    """
    d, _, g = golden_vae
    bounds = {torch.bfloat16: (2e-2, 0.17), torch.float16: (3e-3, 3.2e-2)}
    for dtype, (enc_bound, dec_bound) in bounds.items():
        vae = load_wan_vae(d / "vae.safetensors", config=d / "config.json", dtype=dtype)
        assert vae.dtype == dtype
        want = g["encode_video9_mean"]
        enc = _maxdiff(vae.encode(g["video9"]), want) / want.abs().max().item()
        dec = vae.streaming_decoder()
        worst = 0.0
        for part in ("warmup", "chunk0", "chunk1"):
            out = dec.decode(g[f"stream_in_{part}"])
            assert out.dtype == dtype
            want = g[f"stream_out_{part}"]
            worst = max(worst, _maxdiff(out, want) / want.abs().max().item())
        assert enc <= enc_bound and worst <= dec_bound, (dtype, enc, worst)


def test_loader_nodes_take_a_precision(tmp_path):
    """The VAE / text / audio loader nodes load in the chosen precision; auto = per-device default."""
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.model_loaders.fp8 import FP8Linear
    from node_env import comfy_double, run

    models = tmp_path / "models"
    tm.write_vae(models / "vae")
    tm.write_text_encoder(models / "text_encoders")
    tm.write_audio_encoder(models / "audio_encoders")
    with comfy_double(tmp_path) as env:
        from liveavatar_pack.nodes import loaders
        for node in (loaders.VAELoader, loaders.TextEncoderLoader, loaders.AudioEncoderLoader):
            names = [i.id for i in node.define_schema().inputs]
            assert "precision" in names, node
        auto = run(loaders.VAELoader, vae_name=tm.VAE_FILE, precision="auto")[0]
        assert auto.vae.dtype == torch.float32  # the CPU default
        assert run(loaders.VAELoader, vae_name=tm.VAE_FILE, precision="bf16")[0].vae.dtype == torch.bfloat16
        te = run(loaders.TextEncoderLoader, text_encoder_name=tm.TEXT_FILE, tokenizer=loaders.BYTE_TOKENS,
                 precision="auto")[0]
        assert te.model.dtype == torch.bfloat16  # umT5 in bf16 on the CPU too (half of fp32's RAM)
        te8 = run(loaders.TextEncoderLoader, text_encoder_name=tm.TEXT_FILE, tokenizer=loaders.BYTE_TOKENS,
                  precision="fp8")[0]
        assert any(isinstance(m, FP8Linear) for m in te8.model.modules())
        ae = run(loaders.AudioEncoderLoader, audio_encoder_name=tm.AUDIO_FILE, precision="auto")[0]
        assert ae.model.dtype == torch.float32
        assert run(loaders.AudioEncoderLoader, audio_encoder_name=tm.AUDIO_FILE, precision="fp16")[0].model.dtype == torch.float16
