"""GGUF DiT files (ComfyUI-GGUF's layout): reading, dequantization parity, quantized Linears, placement.

Files are written by the tests with the ``gguf`` package's own writer and quantizer; K-quant
blocks (which the package cannot write) are built from the format's specification: random
bytes with finite fp16 scales, so the package's reference dequantization is defined on them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf
from liveavatar_pack.liveavatar.config import TINY, DiTConfig
from liveavatar_pack.liveavatar.tiny import tiny_transformer
from liveavatar_pack.model_loaders.dit import load_dit
from liveavatar_pack.model_loaders.formats import ModelFileError, describe, open_checkpoint
from liveavatar_pack.model_loaders.gguf_linear import GGUFLinear
from liveavatar_pack.model_loaders.gguf_quants import QUANT_TYPES, SUPPORTED, dequantize_blocks
from liveavatar_pack.model_loaders.gguf_write import quantized_targets, write_gguf_dit
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement

PREFIX = "model.diffusion_model."
CFG = TINY  # dim 64: not inferable from shapes (heads of 128), so given
PACKAGE_WRITES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K")
# byte offsets of the fp16 scales in one block (set to finite values in constructed blocks)
SCALES = {"Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,)}


def random_blocks(qtype: str, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random blocks of a K-quant with finite fp16 scales (d, dmin) in [-0.02, 0.02]."""
    q = QUANT_TYPES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, q.type_size), dtype=np.uint8)
    for at in SCALES[qtype]:
        blocks[:, at:at + 2] = (rng.uniform(-0.02, 0.02, (n_blocks, 1)).astype(np.float16)).view(np.uint8)
    return blocks


def test_supported_types_are_the_issue_list():
    assert set(SUPPORTED) == {"F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K"}


@pytest.mark.parametrize("qtype", PACKAGE_WRITES)
def test_dequant_matches_gguf_on_package_quantized_tensors(qtype):
    """Values quantized by gguf.quants.quantize, dequantized by us (torch) and by gguf (numpy)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    x[3, :32] = 0  # an all-zero block (scale 0)
    raw = np.ascontiguousarray(gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    got = dequantize_blocks(torch.from_numpy(raw.view(np.uint8).copy()), qtype).numpy()
    assert np.abs(ref - got).max() <= 1e-6
    if qtype not in ("F32",):
        assert np.abs(got - x.reshape(-1)).max() > 0  # really quantized (not a pass-through)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_dequant_matches_gguf_on_spec_built_k_quant_blocks(qtype):
    blocks = random_blocks(qtype, 300, seed=len(qtype) + ord(qtype[1]))
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    got = dequantize_blocks(torch.from_numpy(blocks.copy()), qtype).numpy()
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    assert np.abs(ref - got).max() <= 1e-6


# ----------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.contiguous() for k, v in tiny_transformer(seed=2).state_dict().items()}


def _dequantized_model_weights(model):
    return {n: m.dequantized(torch.float32) for n, m in model.named_modules() if isinstance(m, GGUFLinear)}


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_comfyui_layout_loads_with_weights_kept_quantized(tmp_path, tiny_sd, prefix, qtype):
    path = write_gguf_dit(tiny_sd, tmp_path / "dit.gguf", qtype, prefix=prefix)
    d = describe(path)
    assert d.kind == "liveavatar_dit" and d.format == "gguf (wan)" and d.prefix == prefix and qtype in d.quantization
    with open_checkpoint(path) as ckpt:
        assert ckpt.shape(prefix + "patch_embedding.weight") == tuple(tiny_sd["patch_embedding.weight"].shape)  # 5-D
        assert ckpt.qtype(prefix + "patch_embedding.weight").name == "F32"
        raw = {n: ckpt.read_raw(prefix + n) for n in quantized_targets(tiny_sd)}
    model, report = load_dit(path, precision="fp32", config=CFG)
    targets = quantized_targets(tiny_sd)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert {n + ".weight" for n in layers} == targets and report.gguf_layers == len(targets)
    for name, layer in layers.items():
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, raw[name + ".weight"])  # the file's bytes
        ref = gguf.quants.dequantize(raw[name + ".weight"].numpy(), gguf.GGMLQuantizationType[qtype])
        assert np.abs(layer.dequantized(torch.float32).numpy() - ref).max() <= 1e-6
    state = model.state_dict()
    assert torch.equal(state["patch_embedding.weight"], tiny_sd["patch_embedding.weight"])  # F32, 5-D, exact


def test_detected_by_content_not_name(tmp_path, tiny_sd):
    path = write_gguf_dit(tiny_sd, tmp_path / "dit.safetensors", "Q8_0")
    assert describe(path).format == "gguf (wan)"
    model, _ = load_dit(path, precision="fp32", config=CFG)
    assert any(isinstance(m, GGUFLinear) for m in model.modules())


K_CFG = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, audio_dim=16, audio_inject_layers=(0, 1))


def test_k_quant_file_loads(tmp_path):
    """A Q4_K file (blocks built from the spec) loads; every quantized Linear equals gguf's dequantization."""
    sd = {k: v.contiguous() for k, v in tiny_transformer(seed=4, cfg=K_CFG).state_dict().items()}
    targets = quantized_targets(sd)
    q = QUANT_TYPES["Q4_K"]
    raw = {n: random_blocks("Q4_K", sd[n].numel() // 256, seed=i).reshape(sd[n].shape[0], -1) for i, n in enumerate(sorted(targets))}
    path = write_gguf_dit(sd, tmp_path / "k.gguf", "Q4_K", raw=raw)
    model, report = load_dit(path, precision="bf16")
    assert report.gguf_layers == len(targets) and "Q4_K" in report.precision
    for name, w in _dequantized_model_weights(model).items():
        ref = gguf.quants.dequantize(raw[name + ".weight"], gguf.GGMLQuantizationType.Q4_K)
        assert np.abs(w.numpy() - ref).max() <= 1e-6
        assert model.get_submodule(name).weight.nbytes == sd[name + ".weight"].numel() // q.block_size * q.type_size


def test_unsupported_type_refused_by_name(tmp_path):
    """A Q2_K tensor (not in the supported list) is refused with one line naming the type."""
    sd = {k: v.contiguous() for k, v in tiny_transformer(seed=4, cfg=K_CFG).state_dict().items()}
    target = sorted(quantized_targets(sd))[0]
    out, inp = sd[target].shape
    writer = gguf.GGUFWriter(path=None, arch="wan")
    for name, v in sd.items():
        if name == target:
            writer.add_tensor(name, np.zeros((out, inp // 256 * 84), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            writer.add_tensor(name, v.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
    path = tmp_path / "q2k.gguf"
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "Q2_K" in describe(path).quantization
    with pytest.raises(ModelFileError) as err:
        load_dit(path, precision="fp32")
    message = str(err.value)
    assert "Q2_K" in message and "not support" in message and target in message and "\n" not in message


def test_missing_5d_tensors_named(tmp_path, tiny_sd):
    """ComfyUI-GGUF's convert.py without its fix_5d_tensors step: the Conv3d weights are absent."""
    sd = {k: v for k, v in tiny_sd.items() if v.dim() <= 4}
    path = write_gguf_dit(sd, tmp_path / "no5d.gguf", "Q8_0")
    with pytest.raises(ModelFileError, match="5-D Conv3d weights .*fix_5d_tensors"):
        load_dit(path, precision="fp32", config=CFG)


def test_orig_shape_metadata_restores_the_shape(tmp_path):
    """``comfy.gguf.orig_shape.<name>``: a tensor stored as rows of 256 is read in its real shape."""
    x = (torch.randn(3, 5, 512) * 0.1)
    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_array("comfy.gguf.orig_shape.t", [3, 5, 512])
    writer.add_tensor("t", gguf.quants.quantize(x.reshape(-1, 256).numpy(), gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    path = tmp_path / "shape.gguf"
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open_checkpoint(path) as ckpt:
        assert ckpt.shape("t") == (3, 5, 512)
        assert ckpt.read("t").shape == (3, 5, 512)
        assert (ckpt.read("t") - x).abs().max() < 0.01


def test_truncated_file_one_line(tmp_path, tiny_sd):
    path = write_gguf_dit(tiny_sd, tmp_path / "t.gguf", "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError) as err:
        load_dit(path, config=CFG)
    assert "truncated" in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_fp8_precision_refused_for_gguf(tmp_path, tiny_sd):
    path = write_gguf_dit(tiny_sd, tmp_path / "p.gguf", "Q8_0")
    with pytest.raises(ModelFileError, match="already quantized .*bf16, fp16 or fp32"):
        load_dit(path, precision="fp8", config=CFG)


# ----------------------------------------------------------------------------- run time
def test_forward_equals_dequantized_model(tmp_path, tiny_sd):
    """A GGUFLinear computes exactly what a Linear holding the dequantized weight computes."""
    path = write_gguf_dit(tiny_sd, tmp_path / "f.gguf", "Q4_0")
    model, _ = load_dit(path, precision="fp32", config=CFG)
    for layer in model.modules():
        if isinstance(layer, GGUFLinear):
            x = torch.randn(5, layer.in_features)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized(torch.float32), layer.bias))


def test_block_swap_moves_quantized_bytes(tmp_path, tiny_sd):
    """Block swap in guard mode (blocks off the device poisoned) gives the unplaced latents bit for bit;
    the host copies of the swapped blocks hold the uint8 blocks, not dequantized weights."""
    from test_placement import make_sampler

    path = write_gguf_dit(tiny_sd, tmp_path / "s.gguf", "Q8_0")
    model, _ = load_dit(path, precision="fp32", config=CFG)
    reference = [b.latents for b in make_sampler(model).blocks(1)]
    placed = apply_placement(model, PlacementConfig(device="cpu", blocks_on_device=1), guard=True)
    with placed.in_use():
        latents = [b.latents for b in make_sampler(model, placed.cache_storage()).blocks(1)]
    sw = placed.swapper
    assert sw.transfers > 0 and all(torch.equal(a, b) for a, b in zip(reference, latents))
    host = [t for k in sw.swapped for t in sw.host[k]]
    quantized = sum(t.nbytes for t in host if t.dtype == torch.uint8)
    expected = sum(m.weight.nbytes for k in sw.swapped for m in model.blocks[k].modules() if isinstance(m, GGUFLinear))
    assert quantized == expected > 0
    placed.remove()


def test_model_loader_node_lists_and_loads_gguf(tmp_path):
    """The Model Loader lists .gguf DiTs from diffusion_models and unet, and loads one (kept quantized)."""
    from node_env import comfy_double, run

    from liveavatar_pack.cli.tiny_models import tiny_dit_config

    sd = tiny_transformer(seed=0, cfg=tiny_dit_config()).state_dict()
    write_gguf_dit(sd, tmp_path / "models" / "diffusion_models" / "Wan2.2-S2V-14B-Q8_0.gguf", "Q8_0", prefix=PREFIX)
    write_gguf_dit(sd, tmp_path / "models" / "unet" / "sub" / "Wan2.2-S2V-14B-Q4_0.gguf", "Q4_0")
    with comfy_double(tmp_path) as env:
        from liveavatar_pack.nodes import loaders

        options = next(i for i in loaders.ModelLoader.define_schema().inputs if i.id == "dit_name").options
        assert "Wan2.2-S2V-14B-Q8_0.gguf" in options and "sub/Wan2.2-S2V-14B-Q4_0.gguf" in options
        holder = run(loaders.ModelLoader, dit_name="sub/Wan2.2-S2V-14B-Q4_0.gguf", lora_name="none", precision="fp32")[0]
        assert "Q4_0" in holder.summary and any(isinstance(m, GGUFLinear) for m in holder.model.modules())
        assert holder.precision == "Q4_0"  # what the planner counts for this model
        del env


def _sample_tiny(model, clips: int = 1):
    """The streaming sampler on fixed inputs (one clip of 24 frames = 2 blocks x 4 steps): the latents of every block."""
    from liveavatar_pack.liveavatar.config import SamplerConfig
    from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio
    from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW

    cfg = model.cfg if hasattr(model, "cfg") else model.config
    h, w = TINY_LATENT_HW
    gen = torch.Generator().manual_seed(123)
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 150, generator=gen))
    text = torch.randn(7, cfg.text_dim, generator=gen)
    with torch.inference_mode():
        blocks = StreamingSampler(model, SamplerConfig(frames_per_clip=24), text, audio, sink, seed=3).blocks(clips)
        return torch.cat([b.latents.float() for b in blocks], dim=1)


def test_tiny_models_gguf_sampler_error_per_type(tmp_path):
    """tiny-models' GGUF DiTs (Q8_0, Q4_0) run the sampler; their latents' error vs the fp32 model, beside
    the bf16 file's own error: Q8_0 stays close to bf16, Q4_0 is larger but bounded."""
    from liveavatar_pack.cli import tiny_models as tm

    tm.write_dit(tmp_path)
    assert all((tmp_path / name).is_file() for name in tm.GGUF_FILES)
    fp32 = tiny_transformer(seed=0, cfg=tm.tiny_dit_config()).eval()
    ref = _sample_tiny(fp32)
    errors = {}
    for label, name in [("bf16", tm.DIT_FILES[0])] + list(zip(tm.GGUF_TYPES, tm.GGUF_FILES)):
        model, report = load_dit(tmp_path / name, precision="bf16")
        assert (report.gguf_layers > 0) == name.endswith(".gguf")
        out = _sample_tiny(model)
        errors[label] = ((out - ref).norm() / ref.norm()).item()
    print("\nrelative latent error vs the fp32 model: " + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()))
    assert all(np.isfinite(v) for v in errors.values())
    assert errors["Q8_0"] <= 2.0 * errors["bf16"]
    assert errors["bf16"] < errors["Q4_0"] < 0.5


@pytest.mark.slow
def test_generate_with_a_gguf_dit_from_tiny_models(tmp_path):
    """``tiny-models`` writes the GGUF DiTs beside the bf16 one (which ``--models`` alone still picks);
    ``generate --dit <file>.gguf`` makes the video with the quantized DiT."""
    import subprocess
    import sys

    from conftest import ROOT
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.model_loaders.model_dir import find_model_files

    models = tmp_path / "models"
    made = subprocess.run([sys.executable, "-m", "liveavatar", "tiny-models", "--out", str(models)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-2000:]
    assert find_model_files(models).dit.name == tm.DIT_FILES[0]
    gguf_file = models / "diffusion_models" / tm.GGUF_FILES[1]
    out = tmp_path / "q4.mp4"
    cmd = [sys.executable, "-m", "liveavatar", "generate", "--models", str(models), "--dit", str(gguf_file),
           "--image", str(models / "input" / tm.IMAGE_FILE), "--audio", str(models / "input" / tm.SPEECH_FILE),
           "--size", "128*128", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GGUF Q4_0" in result.stderr and "quantized GGUF Linears" in result.stderr
    assert out.is_file() and out.stat().st_size > 1000


# ----------------------------------------------------------------------------- LoRA on a quantized base
def _write_lora(model, path, rank=4, seed=5, scale=0.05):
    """A PEFT LoRA on every q,k,v,o,ffn.0,ffn.2 of ``model`` (alpha = rank: scaling 1)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "0", "2"):
            sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * scale
            sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * scale
            sd[f"base_model.model.{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def _effective(layer: GGUFLinear) -> torch.Tensor:
    w = layer.dequantized(torch.float32)
    if layer.has_lora:
        w = w + layer.lora_b.float() @ layer.lora_a.float()
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_lora_runtime_and_merge_on_quantized_base(tmp_path, tiny_sd, qtype):
    """Run-time LoRA: base blocks stay the file's, the low-rank term is added per call (exactly what the
    effective weight gives). Merge-at-load: requantized weights, no low-rank term; its error vs the float32
    merge is larger than the run-time path's (two roundings instead of one)."""
    base = tiny_transformer(seed=2)
    lora = _write_lora(base, tmp_path / "lora.safetensors")
    path = write_gguf_dit(tiny_sd, tmp_path / "b.gguf", qtype)
    runtime, rep_r = load_dit(path, lora=lora, precision="fp32", config=CFG)
    merged, rep_m = load_dit(path, lora=lora, precision="fp32", config=CFG, lora_mode="merge")
    assert rep_r.lora_mode == "runtime" and rep_m.lora_mode == "merge" and len(rep_r.lora.merged) == len(rep_m.lora.merged) > 0
    plain, _ = load_dit(path, precision="fp32", config=CFG)
    reference = load_dit(write_gguf_dit(tiny_sd, tmp_path / "f32.gguf", "F32"), lora=lora, precision="fp32", config=CFG)[0]
    err = {"runtime": 0.0, "merge": 0.0}
    for name in rep_r.lora.merged:
        r, m, p = runtime.get_submodule(name), merged.get_submodule(name), plain.get_submodule(name)
        ref_w = reference.get_submodule(name).weight
        assert r.has_lora and not m.has_lora and torch.equal(r.weight, p.weight)  # the file's blocks, untouched
        assert not torch.equal(m.weight, p.weight)  # requantized
        x = torch.randn(3, r.in_features)
        want = torch.nn.functional.linear(x, p.dequantized(torch.float32), p.bias) + (x @ r.lora_a.T) @ r.lora_b.T
        assert torch.allclose(r(x), want, atol=1e-6, rtol=1e-5)
        err["runtime"] += (_effective(r) - ref_w).square().sum().item()
        err["merge"] += (_effective(m) - ref_w).square().sum().item()
    assert err["runtime"] < err["merge"]
    assert "applied at run time" in rep_r.summary() and rep_r.requant_error is None
    assert 0 < rep_m.requant_error < (0.02 if qtype == "Q8_0" else 0.2) and "added error" in rep_m.summary()


def test_lora_merge_refused_for_k_quants(tmp_path):
    sd = {k: v.contiguous() for k, v in tiny_transformer(seed=4, cfg=K_CFG).state_dict().items()}
    raw = {n: random_blocks("Q4_K", sd[n].numel() // 256, seed=i).reshape(sd[n].shape[0], -1)
           for i, n in enumerate(sorted(quantized_targets(sd)))}
    path = write_gguf_dit(sd, tmp_path / "k.gguf", "Q4_K", raw=raw)
    lora = _write_lora(tiny_transformer(seed=4, cfg=K_CFG), tmp_path / "l.safetensors")
    with pytest.raises(ModelFileError, match="Q4_K.*lora_mode 'runtime'"):
        load_dit(path, lora=lora, precision="fp32", lora_mode="merge")
    model, report = load_dit(path, lora=lora, precision="fp32")
    assert report.lora_mode == "runtime" and sum(isinstance(m, GGUFLinear) and m.has_lora for m in model.modules()) > 0


# ----------------------------------------------------------------------------- planner and memory
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_device_bytes_equal_the_planner_count(tmp_path, qtype):
    """What a loaded GGUF DiT holds (quantized blocks + bf16 rest + a run-time LoRA) is the planner's count, per block too."""
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.model_loaders.planner import weight_bytes

    cfg = tm.tiny_dit_config()
    path = write_gguf_dit(tiny_transformer(seed=0, cfg=cfg).state_dict(), tmp_path / "d.gguf", qtype)
    for lora, rank in ((None, 0), (tm.write_lora(tmp_path, rank=4), 4)):  # no LoRA; tiny-models' LoRA, run-time
        model, report = load_dit(path, lora=lora, precision="bf16")
        count = weight_bytes(cfg, qtype, lora_rank=rank)
        assert report.model_bytes == count.total(cfg.num_layers)
        assert sum(t.nbytes for t in [*model.blocks[0].parameters(), *model.blocks[0].buffers()]) == count.block
    assert weight_bytes(cfg, qtype, lora_rank=0).total(cfg.num_layers) < weight_bytes(cfg, qtype).total(cfg.num_layers)
    assert weight_bytes(cfg, qtype, lora_rank=0).total(cfg.num_layers) < weight_bytes(cfg, "bf16").total(cfg.num_layers)


def test_plan_names_a_gguf_type_for_16_and_12_gib():
    from liveavatar_pack.liveavatar.config import WAN_S2V_14B, SamplerConfig
    from liveavatar_pack.model_loaders.gguf_plan import recommend_gguf

    for gpus in ("1x16", "1x12"):
        choice = recommend_gguf(WAN_S2V_14B, 688, 368, SamplerConfig(), gpus, host_ram_gib=64)
        assert choice.qtype in ("Q8_0", "Q6_K", "Q5_K", "Q4_K") and choice.plan.peak_device <= int(gpus[2:]) * 2**30 * 0.95
        assert f"GGUF recommendation: {choice.qtype}" in "\n".join(choice.lines())
    big = recommend_gguf(WAN_S2V_14B, 688, 368, SamplerConfig(), "1x80", host_ram_gib=64)
    assert big.qtype == "Q8_0" and big.placement.blocks_on_device is None  # room for all: the best quality


def test_plan_cli_prints_the_gguf_recommendation():
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "liveavatar", "plan", "--gpus", "1x16", "--size", "688*368", "--host-ram", "64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "GGUF recommendation: Q4_K" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]



def test_plan_takes_a_gguf_precision(capsys):
    from liveavatar_pack.cli import main

    assert main(["plan", "--gpus", "1x16", "--size", "688*368", "--host-ram", "64", "--precision", "Q4_K"]) == 0
    out = capsys.readouterr().out
    assert "Q4_K weights" in out and "GGUF recommendation" not in out


RSS_SCRIPT = """
import importlib.util, json, sys
import psutil, torch
spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/liveavatar/bootstrap.py")
boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(boot); boot.load_pack(sys.argv[1])
from liveavatar_pack.model_loaders.dit import load_dit
from liveavatar_pack.liveavatar.config import DiTConfig
import gguf  # imported before the baseline, as load_dit would on its first GGUF file
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1] + "/bench")
from peak_rss import peak_rss, reset_peak
cfg = DiTConfig(**json.loads(sys.argv[3]))
reset_peak()
base = psutil.Process().memory_info().rss
model, report = load_dit(sys.argv[2], precision="bf16", config=cfg)
print(json.dumps({"base": base, "peak": peak_rss(), "model_bytes": report.model_bytes}))
"""


def test_peak_host_memory_while_loading_a_gguf_file(tmp_path):
    """Peak RSS over the baseline while loading stays <= 1.2x the file's size (+ 48 MiB of slack)."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    if sys.platform != "linux":
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    cfg = DiTConfig(dim=1024, ffn_dim=2816, num_heads=8, num_layers=6, text_dim=256, audio_dim=64, audio_inject_layers=(0, 3))
    path = write_gguf_dit(tiny_transformer(seed=0, cfg=cfg).state_dict(), tmp_path / "m.gguf", "Q8_0")
    size = path.stat().st_size
    assert size > 80e6
    raw = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), str(path), json.dumps(raw)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    extra = figures["peak"] - figures["base"]
    print(f"\nGGUF file {size / 2**20:.0f} MiB, model {figures['model_bytes'] / 2**20:.0f} MiB: peak RSS over baseline "
          f"{extra / 2**20:.0f} MiB ({extra / size:.2f}x the file)")
    assert extra <= 1.2 * size + 48 * 2**20
