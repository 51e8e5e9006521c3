"""DiT checkpoint loading: every real file layout, LoRA paths, precisions, errors and peak memory.

Checkpoints are written by the tests themselves from tiny random models, in the layouts users
have: Wan-AI's sharded directory (index + shards + config.json), ComfyUI single files (with
``model.diffusion_model.`` prefixes, bf16, fp8 "scaled" in both scale spellings) and ``.pth``.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, golden_subdir
from liveavatar_pack.liveavatar.config import TINY, DiTConfig, replace
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.lora import merge_lora
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer
from liveavatar_pack.liveavatar.transformer import LiveAvatarTransformer
from liveavatar_pack.model_loaders.dit import infer_dit_config, load_dit
from liveavatar_pack.model_loaders.formats import ModelFileError, describe
from liveavatar_pack.model_loaders.fp8 import FP8Linear, quantize_fp8
from liveavatar_pack.model_loaders.lora_file import read_lora

F8 = torch.float8_e4m3fn
KEEP_FP32 = LiveAvatarTransformer.keep_in_fp32


def target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if any(p in KEEP_FP32 for p in name.split(".")) else dtype


def is_fp8_target(name: str) -> bool:
    """Linear weights ComfyUI-style fp8 files quantise and our fp8 precision stores in fp8."""
    return name.endswith(".weight") and name.split(".")[0] in ("blocks", "audio_injector") and (
        ".self_attn." in name or ".cross_attn." in name or ".ffn." in name or ".injector." in name or "adain" in name
    ) and "norm" not in name


@pytest.fixture(scope="module")
def ref():
    return {k: v.contiguous() for k, v in tiny_transformer(3).state_dict().items()}


def config_json(cfg: DiTConfig) -> dict:
    """An upstream-style config.json (extra keys the loader must ignore included)."""
    raw = dataclasses.asdict(cfg)
    raw.update({"_class_name": "WanModel_S2V", "model_type": "s2v", "enable_adain": True, "window_size": [-1, -1]})
    return raw


def write_sharded(sd: dict, folder: Path, cfg: DiTConfig | None, shards: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(config_json(cfg)))
    return folder


def comfy_fp8(sd: dict, style: str) -> tuple[dict, dict]:
    """A ComfyUI fp8 'scaled' state dict (prefix model.diffusion_model.) and its fp8 entries."""
    out, quantised = {}, {}
    for k, v in sd.items():
        if is_fp8_target(k):
            scale = (v.float().abs().max() / 448.0).reshape(())
            q = (v.float() / scale).clamp(-448, 448).to(F8)
            layer = k[: -len(".weight")]
            out["model.diffusion_model." + k] = q
            if style == "scale_weight":
                out[f"model.diffusion_model.{layer}.scale_weight"] = scale
                out[f"model.diffusion_model.{layer}.scale_input"] = torch.ones(())
            else:
                out[f"model.diffusion_model.{layer}.weight_scale"] = scale
                out[f"model.diffusion_model.{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            quantised[k] = (q, scale)
        else:
            out["model.diffusion_model." + k] = v.to(target_dtype(k, torch.bfloat16))
    if style == "scale_weight":
        out["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=F8)
    return out, quantised


def write_layout(layout: str, sd: dict, tmp: Path) -> tuple[Path, DiTConfig | None]:
    """(path, config argument) of a tiny checkpoint in one of the real layouts."""
    if layout == "sharded":
        return write_sharded(sd, tmp / "Wan2.2-S2V-tiny", TINY), None
    if layout == "prefixed":
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, tmp / "s2v_prefixed.safetensors")
        return tmp / "s2v_prefixed.safetensors", TINY
    if layout == "diffusion_model":
        save_file({"diffusion_model." + k: v for k, v in sd.items()}, tmp / "s2v_dm.safetensors")
        return tmp / "s2v_dm.safetensors", TINY
    if layout == "pth":
        torch.save(sd, tmp / "s2v.pth")
        return tmp / "s2v.pth", TINY
    raise ValueError(layout)


def assert_state_equal(model, expected: dict):
    state = model.state_dict()
    assert set(state) == set(expected)
    bad = [k for k in expected if state[k].dtype != expected[k].dtype or not torch.equal(state[k], expected[k])]
    assert not bad, f"differ: {bad[:5]}"


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("layout", ["sharded", "prefixed", "diffusion_model", "pth"])
def test_layouts_load_bitwise(layout, ref, tmp_path):
    path, cfg = write_layout(layout, ref, tmp_path)
    info = describe(path)
    assert info.kind == "liveavatar_dit" and info.tensors == len(ref) and info.dtype == "float32"
    model, report = load_dit(path, precision="fp32", config=cfg)
    assert_state_equal(model, ref)
    assert report.config == TINY and report.tensors == len(ref)
    assert not model.training


def test_sharded_layout_describe_and_config(ref, tmp_path):
    path = write_sharded(ref, tmp_path / "m", TINY)
    info = describe(path)
    assert info.format == "safetensors (sharded, 3 files)" and info.prefix == ""
    _, report = load_dit(path, precision="fp32")
    assert report.config_source == "config.json"


def test_config_inferred_from_shapes(tmp_path):
    cfg = replace(TINY, dim=256, ffn_dim=512, num_heads=2, num_layers=2, audio_inject_layers=(0, 1), text_dim=48, audio_dim=24)
    model = tiny_transformer(1, cfg)
    sd = model.state_dict()
    assert infer_dit_config({k: tuple(v.shape) for k, v in sd.items()}) == cfg
    save_file(sd, tmp_path / "x.safetensors")
    loaded, report = load_dit(tmp_path / "x.safetensors", precision="fp32")
    assert report.config == cfg and report.config_source == "inferred from tensor shapes"
    assert_state_equal(loaded, sd)


def test_bf16_file(ref, tmp_path):
    save_file({k: v.bfloat16() for k, v in ref.items()}, tmp_path / "s2v_bf16.safetensors")
    assert describe(tmp_path / "s2v_bf16.safetensors").dtype == "bfloat16"
    model, _ = load_dit(tmp_path / "s2v_bf16.safetensors", precision="bf16", config=TINY)
    assert_state_equal(model, {k: v.bfloat16().to(target_dtype(k, torch.bfloat16)) for k, v in ref.items()})
    model16, _ = load_dit(tmp_path / "s2v_bf16.safetensors", precision="fp16", config=TINY)
    assert_state_equal(model16, {k: v.bfloat16().to(target_dtype(k, torch.float16)) for k, v in ref.items()})
    # the engine's own cast gives the same model from an fp32 file
    path, cfg = write_layout("prefixed", ref, tmp_path)
    model_cast, _ = load_dit(path, precision="bf16", config=cfg)
    assert_state_equal(model_cast, tiny_transformer(3).cast(torch.bfloat16).state_dict())


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfy_fp8_scaled(style, ref, tmp_path):
    sd, quantised = comfy_fp8(ref, style)
    path = tmp_path / f"wan2.2_s2v_tiny_fp8_{style}.safetensors"
    save_file(sd, path)
    info = describe(path)
    assert info.kind == "liveavatar_dit" and info.prefix == "model.diffusion_model." and info.quantization.startswith("fp8_scaled")
    model, report = load_dit(path, precision="fp8", config=TINY)
    assert report.fp8_from_file == report.fp8_layers == len(quantised)
    for k, (q, scale) in quantised.items():
        layer = model.get_submodule(k[: -len(".weight")])
        assert isinstance(layer, FP8Linear)
        assert torch.equal(layer.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(layer.weight_scale, scale)
    # dequantised at load for a high-precision model: real = fp8 * scale
    full, _ = load_dit(path, precision="fp32", config=TINY)
    expected = {k: (quantised[k][0].float() * quantised[k][1]) if k in quantised else sd["model.diffusion_model." + k].float() for k in ref}
    assert_state_equal(full, expected)


def test_fp8_precision_from_fp32(ref, tmp_path):
    path, cfg = write_layout("sharded", ref, tmp_path)
    model, report = load_dit(path, precision="fp8", config=cfg)
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            q, scale = quantize_fp8(ref[name + ".weight"])
            assert torch.equal(module.weight.view(torch.uint8), q.view(torch.uint8)) and torch.equal(module.weight_scale, scale)
            assert module.bias.dtype == torch.bfloat16
            n += 1
    assert n == report.fp8_layers == 4 * 10 + 2 * 5  # blocks: 4+4 attention + 2 ffn; injectors: q,k,v,o + adain
    assert isinstance(model.head.head, torch.nn.Linear) and model.head.head.weight.dtype == torch.bfloat16
    assert model.time_projection[1].weight.dtype == torch.float32 and model.blocks[0].modulation.dtype == torch.float32
    model.cast(torch.bfloat16)  # the engine's cast leaves the fp8 buffers alone
    assert model.blocks[0].ffn[0].weight.dtype == F8


# ----------------------------------------------------------------------------- fp8 accuracy
def block_velocity(model, seed=0, h=TINY_LATENT_HW[0], w=TINY_LATENT_HW[1]):
    gen = torch.Generator().manual_seed(seed)
    storage = CacheStorage(dtype=model.dtype)
    text = model.embed_text(torch.randn(7, TINY.text_dim, generator=gen))
    cond = model.new_cond_cache(h, w, storage)
    model.prefill_sink(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen), text, cond, 30)
    cache = model.new_kv_cache(h, w, 3, storage)
    audio = torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 12, generator=gen)
    x = torch.randn(16, 3, h, w, generator=gen)
    return model.forward_block(x, torch.full((3,), 858.0), text, audio, cache, cond, 0, 30, 73)


def test_fp8_velocity_error(ref, tmp_path):
    """fp8 weights vs bf16 on one forward_block call of the tiny model (see the report's figure)."""
    path, cfg = write_layout("prefixed", ref, tmp_path)
    v32 = block_velocity(load_dit(path, precision="fp32", config=cfg)[0])
    v16 = block_velocity(load_dit(path, precision="bf16", config=cfg)[0])
    v8 = block_velocity(load_dit(path, precision="fp8", config=cfg)[0])
    scale = v32.abs().max().item()
    err_bf16 = (v16 - v32).abs().max().item() / scale
    err_fp8_vs_bf16 = (v8 - v16).abs().max().item() / scale
    rms_fp8_vs_bf16 = ((v8 - v16).pow(2).mean().sqrt() / v16.pow(2).mean().sqrt()).item()
    print(f"\nvelocity max error / max|v|: bf16 vs fp32 {err_bf16:.4f}; fp8 vs bf16 {err_fp8_vs_bf16:.4f} (rms rel {rms_fp8_vs_bf16:.4f})")
    # e4m3 has a 3-bit mantissa (relative step 1/16): a few percent on the output, well above bf16's own error
    assert err_fp8_vs_bf16 < 0.08 and rms_fp8_vs_bf16 < 0.04
    assert err_fp8_vs_bf16 > err_bf16  # the fp8 path really ran on fp8 values


# ----------------------------------------------------------------------------- LoRA
def make_lora(model_sd: dict, rank=4, seed=0, modules=None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    modules = modules or sorted({k[: -len(".weight")] for k in model_sd if is_fp8_target(k) and "adain" not in k})
    out = {}
    for m in modules:
        o, i = model_sd[m + ".weight"].shape
        out[f"base_model.model.{m}.lora_A.default.weight"] = torch.randn(rank, i, generator=gen) * 0.1
        out[f"base_model.model.{m}.lora_B.default.weight"] = torch.randn(o, rank, generator=gen) * 0.1
    return out


def write_lora(style: str, lora: dict, tmp: Path) -> tuple[Path, float]:
    folder = tmp / f"lora_{style}"
    folder.mkdir()
    if style == "adapter_config":
        save_file(lora, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q"]}))
        return folder / "adapter_model.safetensors", 8.0
    if style == "alpha_keys":
        sd = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in lora.items()}
        for k in list(sd):
            if ".lora_A." in k:
                sd[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(2.0)
        save_file(sd, folder / "my_lora.safetensors")
        return folder / "my_lora.safetensors", 2.0
    if style == "comfy_down_up":
        sd = {}
        for k, v in lora.items():
            k = k.replace("base_model.model.", "diffusion_model.").replace(".default", "")
            sd[k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")] = v
            if ".lora_A." in k:
                sd[k.replace(".lora_A.weight", ".alpha")] = torch.tensor(4.0)
        torch.save(sd, folder / "my_lora.pth")
        return folder / "my_lora.pth", 4.0
    raise ValueError(style)


@pytest.mark.parametrize("layout", ["sharded", "prefixed", "pth"])
@pytest.mark.parametrize("style", ["adapter_config", "alpha_keys", "comfy_down_up"])
def test_lora_merge_each_path(layout, style, ref, tmp_path):
    lora = make_lora(ref)
    path, cfg = write_layout(layout, ref, tmp_path)
    lora_path, alpha = write_lora(style, lora, tmp_path)
    merged, report = load_dit(path, lora=lora_path, precision="fp32", config=cfg)
    base, _ = load_dit(path, precision="fp32", config=cfg)
    expected_report = merge_lora(base, lora, config_alpha=alpha)
    assert_state_equal(merged, base.state_dict())
    assert report.lora.merged == sorted(expected_report.merged) and report.lora.alpha == alpha
    if layout == "sharded" and style == "adapter_config":  # precision after the fp32 merge
        m16, _ = load_dit(path, lora=lora_path, precision="bf16", config=cfg)
        assert_state_equal(m16, base.cast(torch.bfloat16).state_dict())
        m8, _ = load_dit(path, lora=lora_path, precision="fp8", config=cfg)
        for name in expected_report.merged:
            q, scale = quantize_fp8(merged.get_submodule(name).weight)
            assert torch.equal(m8.get_submodule(name).weight.view(torch.uint8), q.view(torch.uint8))


def test_lora_merged_into_comfy_fp8_file(ref, tmp_path):
    sd, quantised = comfy_fp8(ref, "scale_weight")
    save_file(sd, tmp_path / "fp8.safetensors")
    lora_path, alpha = write_lora("adapter_config", make_lora(ref), tmp_path)
    base, _ = load_dit(tmp_path / "fp8.safetensors", precision="fp32", config=TINY)
    merge_lora(base, read_lora(lora_path).state_dict(), config_alpha=alpha)
    m8, report = load_dit(tmp_path / "fp8.safetensors", lora=lora_path, precision="fp8", config=TINY)
    assert report.fp8_from_file == 2  # the injectors' AdaLN projections: no LoRA, taken as they are
    for name in report.lora.merged:  # dequantise, merge in fp32, re-quantise
        q, _ = quantize_fp8(base.get_submodule(name).weight)
        assert torch.equal(m8.get_submodule(name).weight.view(torch.uint8), q.view(torch.uint8))



# A LoRA file as PEFT writes it (get_peft_model_state_dict: no adapter name), with full tensors named
# as in the PEFT-wrapped model (a wrapped Linear's base tensors under ``base_layer``), which upstream's
# load_state_dict(strict=False) puts in place of the base tensors before merge_and_unload.
FULL_TENSORS = ("blocks.0.norm3.weight", "patch_embedding.weight", "casual_audio_encoder.weights",
                "blocks.1.self_attn.q.base_layer.weight", "blocks.1.self_attn.q.base_layer.bias",
                "audio_injector.injector.0.o.base_layer.weight")


def peft_lora_with_full_tensors(ref: dict, prefix: str, folder: Path, extra: dict | None = None) -> tuple[Path, dict]:
    state = {k.replace("base_model.model.", prefix).replace(".default", ""): v for k, v in make_lora(ref).items()}
    gen = torch.Generator().manual_seed(7)
    full = {}
    for key in FULL_TENSORS:
        base = ref[key.replace(".base_layer", "")]
        full[key] = (torch.randn(base.shape, generator=gen) * 0.05 + 0.5).to(torch.bfloat16)
    state.update({prefix + k: v for k, v in {**full, **(extra or {})}.items()})
    folder.mkdir()
    save_file(state, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    return folder / "adapter_model.safetensors", full


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
@pytest.mark.parametrize("layout", ["sharded", "prefixed"])
def test_lora_file_with_full_tensors_replaces_then_merges(prefix, layout, ref, tmp_path):
    path, cfg = write_layout(layout, ref, tmp_path)
    lora_path, full = peft_lora_with_full_tensors(ref, prefix, tmp_path / "lora")
    model, report = load_dit(path, lora=lora_path, precision="fp32", config=cfg)
    replaced = sorted(k.replace(".base_layer", "") for k in FULL_TENSORS)
    assert report.lora.replaced == replaced and len(report.lora.merged) == len(make_lora(ref)) // 2
    assert f"replaced {len(replaced)} base tensors" in report.summary()
    state = model.state_dict()
    assert torch.equal(state["blocks.0.norm3.weight"], full["blocks.0.norm3.weight"].float())
    assert torch.equal(state["blocks.1.self_attn.q.bias"], full["blocks.1.self_attn.q.base_layer.bias"].float())
    lora = read_lora(lora_path)
    delta = lora.delta("blocks.1.self_attn.q")
    assert torch.equal(state["blocks.1.self_attn.q.weight"], full["blocks.1.self_attn.q.base_layer.weight"].float() + delta)
    untouched = [k for k in ref if k not in replaced and k[: -len(".weight")] not in lora.pairs]
    assert untouched and all(torch.equal(state[k], ref[k]) for k in untouched)
    # the engine's merge_lora on the same file gives the same model, in every precision
    base, _ = load_dit(path, precision="fp32", config=cfg)
    engine = merge_lora(base, lora.state_dict(), config_alpha=8.0)
    assert engine.replaced == replaced
    assert_state_equal(model, base.state_dict())
    m16, _ = load_dit(path, lora=lora_path, precision="bf16", config=cfg)
    assert_state_equal(m16, base.cast(torch.bfloat16).state_dict())  # replaced and merged in fp32, then cast
    m8, r8 = load_dit(path, lora=lora_path, precision="fp8", config=cfg)
    assert r8.lora.replaced == replaced
    for name in ("blocks.1.self_attn.q", "audio_injector.injector.0.o"):  # replaced, merged, then quantised
        q, _ = quantize_fp8(model.get_submodule(name).weight)
        assert torch.equal(m8.get_submodule(name).weight.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_lora_file_full_tensor_that_names_nothing_is_refused(prefix, ref, tmp_path):
    path, cfg = write_layout("prefixed", ref, tmp_path)
    p = prefix.replace(".", r"\.")
    cases = {
        "blocks.7.norm3.weight": (torch.zeros(64), rf"'{p}blocks\.7\.norm3\.weight' is not a PEFT lora_A/lora_B weight and names no tensor"),
        "blocks.0.self_attn.q.weight": (torch.zeros(64, 64), rf"'{p}blocks\.0\.self_attn\.q\.weight'.*base tensor PEFT names blocks\.0\.self_attn\.q\.base_layer\.weight"),
        "blocks.0.norm3.bias": (torch.zeros(65), rf"'{p}blocks\.0\.norm3\.bias' replaces blocks\.0\.norm3\.bias of shape \(64,\); found shape \(65,\)"),
    }
    for i, (key, (tensor, message)) in enumerate(cases.items()):
        lora_path, _ = peft_lora_with_full_tensors(ref, prefix, tmp_path / f"lora{i}", extra={key: tensor})
        with pytest.raises(ModelFileError, match=rf"adapter_model\.safetensors: LoRA key {message}.*checked against the DiT s2v_prefixed\.safetensors"):
            load_dit(path, lora=lora_path, config=cfg)

@pytest.mark.golden
def test_golden_dit_and_lora_sha256(golden_dir):
    d = golden_subdir(golden_dir, "dit")
    checks = json.loads((d / "lora_merged_checks.json").read_text())
    model, report = load_dit(d / "dit_base.safetensors", lora=d / "lora.safetensors", precision="fp32", config=d / "config.json")
    state = model.state_dict()
    assert set(state) == set(checks["all_merged_sha256"])
    bad = [k for k, h in checks["all_merged_sha256"].items() if hashlib.sha256(state[k].float().contiguous().numpy().tobytes()).hexdigest() != h]
    assert not bad, f"sha256 differs for {bad[:5]}"
    assert len(report.lora.merged) == checks["num_changed"]
    # the directory form (model file picked by its keys, config.json beside it) gives the same
    model_dir, _ = load_dit(d, lora=d / "lora.safetensors", precision="fp32")
    assert_state_equal(model_dir, state)


# ----------------------------------------------------------------------------- errors
def test_error_other_model_kind(ref, tmp_path):
    save_file({"encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3), "decoder.head.2.weight": torch.zeros(3, 4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(ModelFileError, match=r"vae\.safetensors: expected a LiveAvatar / Wan2\.2-S2V DiT.*found a Wan VAE file"):
        load_dit(tmp_path / "vae.safetensors")
    save_file(make_lora(ref), tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match=r"lora\.safetensors: expected a LiveAvatar.*found a LoRA file"):
        load_dit(tmp_path / "lora.safetensors")
    save_file({"token_embedding.weight": torch.zeros(8, 4), "blocks.0.attn.q.weight": torch.zeros(4, 4)}, tmp_path / "t5.safetensors")
    assert describe(tmp_path / "t5.safetensors").kind == "umt5"
    with pytest.raises(ModelFileError, match=r"found a umT5 text encoder file"):
        load_dit(tmp_path / "t5.safetensors")
    assert issubclass(ModelFileError, ValueError)


def test_error_missing_unexpected_and_shapes(ref, tmp_path):
    sd = dict(ref)
    del sd["blocks.3.ffn.2.weight"]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match=r"missing\.safetensors: expected every tensor.*found 1 missing: blocks\.3\.ffn\.2\.weight"):
        load_dit(tmp_path / "missing.safetensors", config=TINY)
    save_file({**ref, "motioner.extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors")
    with pytest.raises(ModelFileError, match=r"extra\.safetensors: expected only the tensors.*found 1 unexpected: motioner\.extra\.weight"):
        load_dit(tmp_path / "extra.safetensors", config=TINY)
    model, report = load_dit(tmp_path / "extra.safetensors", config=TINY, strict=False, precision="fp32")
    assert report.skipped == ["motioner.extra.weight"] and "ignored 1 unexpected" in report.summary()
    save_file({**ref, "blocks.0.ffn.0.weight": torch.zeros(120, 64)}, tmp_path / "shape.safetensors")
    with pytest.raises(ModelFileError, match=r"shape\.safetensors: tensor shapes do not fit.*blocks\.0\.ffn\.0\.weight: expected \[128, 64\], found \[120, 64\]"):
        load_dit(tmp_path / "shape.safetensors", config=TINY)
    # a model of another size under the config of this one
    other = tiny_transformer(0, replace(TINY, num_layers=3, audio_inject_layers=(0, 2))).state_dict()
    save_file(other, tmp_path / "small.safetensors")
    with pytest.raises(ModelFileError, match=r"found \d+ missing: blocks\.3\."):
        load_dit(tmp_path / "small.safetensors", config=TINY)
    with pytest.raises(ModelFileError, match=r"dim 64 is not a multiple of 128.*give a config\.json"):
        load_dit(tmp_path / "small.safetensors")


def test_error_truncated_and_broken_shards(ref, tmp_path):
    save_file(ref, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5000])
    with pytest.raises(ModelFileError, match=r"cut\.safetensors: truncated safetensors file: its header describes \d+ bytes, the file has \d+"):
        load_dit(tmp_path / "cut.safetensors", config=TINY)
    (tmp_path / "stub.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelFileError, match=r"stub\.safetensors: expected a safetensors file; found a header length"):
        describe(tmp_path / "stub.safetensors")
    folder = write_sharded(ref, tmp_path / "sharded", TINY)
    shard = folder / "diffusion_pytorch_model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(ModelFileError, match=r"diffusion_pytorch_model-00002-of-00003\.safetensors: truncated"):
        load_dit(folder)
    shard.unlink()
    with pytest.raises(ModelFileError, match=r"index\.json: expected shard diffusion_pytorch_model-00002-of-00003\.safetensors.*found no such file"):
        load_dit(folder)
    torch.save(ref, tmp_path / "x.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "x.pth").read_bytes()[:-3000])
    with pytest.raises(ModelFileError, match=r"cut\.pth: expected a PyTorch weights file readable with torch\.load\(weights_only=True\)"):
        load_dit(tmp_path / "cut.pth", config=TINY)


class NotAWeight:  # pickled by the test below; weights_only loading must refuse it
    pass


def test_error_pth_with_code_refused(tmp_path):
    torch.save({"x": NotAWeight()}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError, match=r"evil\.pth: expected a PyTorch weights file readable with torch\.load\(weights_only=True\)"):
        load_dit(tmp_path / "evil.pth")


def test_error_lora_for_another_model(ref, tmp_path):
    path, cfg = write_layout("prefixed", ref, tmp_path)
    wide = tiny_transformer(0, replace(TINY, dim=128, ffn_dim=256, num_heads=4)).state_dict()
    save_file(make_lora(wide), tmp_path / "wide_lora.safetensors")
    (tmp_path / "wide_lora_config.json").write_text(json.dumps({"lora_alpha": 4, "lora_rank": 4}))
    with pytest.raises(ModelFileError, match=r"wide_lora\.safetensors: expected lora_A \(4, 64\) and lora_B \(64, 4\).*found lora_A \(4, 128\)"):
        load_dit(path, lora=tmp_path / "wide_lora.safetensors", config=cfg)
    foreign = {"base_model.model.layers.0.attention.wq.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.layers.0.attention.wq.lora_B.weight": torch.zeros(64, 4)}
    save_file(foreign, tmp_path / "llm_lora.safetensors")
    with pytest.raises(ModelFileError, match=r"llm_lora\.safetensors: expected a LoRA for the DiT.*found module 'layers\.0\.attention\.wq', which is nothing"):
        load_dit(path, lora=tmp_path / "llm_lora.safetensors", config=cfg, lora_alpha=4)
    with pytest.raises(ModelFileError, match=r"s2v_prefixed\.safetensors: expected a PEFT LoRA.*found a LiveAvatar / Wan2\.2-S2V DiT file"):
        load_dit(path, lora=path, config=cfg)
    lora_path, _ = write_lora("adapter_config", make_lora(ref, rank=8), tmp_path)
    with pytest.raises(ModelFileError, match=r"adapter_config\.json says rank r=4; the file's matrices have rank 8"):
        load_dit(path, lora=lora_path, config=cfg)
    save_file(make_lora(ref), tmp_path / "noalpha.safetensors")
    with pytest.raises(ModelFileError, match=r"noalpha\.safetensors: LoRA of rank 4 carries no alpha"):
        load_dit(path, lora=tmp_path / "noalpha.safetensors", config=cfg)


def _count(cls) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_failed_load_leaves_nothing_allocated(ref, tmp_path):
    sd = dict(ref)
    sd["trainable_cond_mask.weight"] = torch.zeros(ref["trainable_cond_mask.weight"].shape, dtype=torch.int32)
    save_file(sd, tmp_path / "bad_dtype.safetensors")
    gc.collect()
    before = _count(LiveAvatarTransformer), _count(torch.nn.Parameter)
    with pytest.raises(ModelFileError, match=r"bad_dtype\.safetensors: tensor 'trainable_cond_mask\.weight' is torch\.int32; expected a floating-point weight") as info:
        load_dit(tmp_path / "bad_dtype.safetensors", config=TINY, precision="fp32")
    del info
    gc.collect()
    assert (_count(LiveAvatarTransformer), _count(torch.nn.Parameter)) == before



def test_meta_model_at_full_size_costs_nothing():
    """The 14B model on meta (accelerate's init_empty_weights + our skip of the initialisers):
    every tensor on meta, none trainable, no sympy import (what the initialisers alone cost)."""
    code = textwrap.dedent(
        """
        import importlib.util, sys
        import psutil
        spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/liveavatar/bootstrap.py")
        boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(boot); boot.load_pack(sys.argv[1])
        from liveavatar_pack.liveavatar.config import WAN_S2V_14B
        from liveavatar_pack.model_loaders.dit import empty_model
        rss = psutil.Process().memory_info().rss
        model = empty_model(WAN_S2V_14B)
        tensors = list(model.parameters()) + list(model.buffers())
        assert sum(t.numel() for t in tensors) > 14e9
        assert all(t.is_meta for t in tensors) and not any(p.requires_grad for p in model.parameters())
        assert "sympy" not in sys.modules, "a meta initialiser ran its decomposition"
        grew = psutil.Process().memory_info().rss - rss
        assert grew < 64 * 2**20, grew
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]

# ----------------------------------------------------------------------------- memory
RSS_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    import psutil, torch
    spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/liveavatar/bootstrap.py")
    boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(boot); boot.load_pack(sys.argv[1])
    from liveavatar_pack.model_loaders.dit import load_dit
    torch.set_num_threads(1)

    sys.path.insert(0, sys.argv[1] + "/bench")
    from peak_rss import peak_rss, reset_peak
    reset_peak()
    base = psutil.Process().memory_info().rss
    model, report = load_dit(sys.argv[2], precision=sys.argv[3])
    print(json.dumps({"base": base, "peak": peak_rss(), "model_bytes": report.model_bytes}))
    """
)

MEMORY_CFG = DiTConfig(dim=1024, ffn_dim=2048, num_heads=8, num_layers=6, text_dim=256, audio_dim=64, audio_inject_layers=(0, 3))


def write_random_shards(folder: Path, cfg: DiTConfig, dtype=torch.float32, shards: int = 4) -> int:
    """Shards of a random DiT of ``cfg`` written tensor by tensor (never the whole model in memory)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LiveAvatarTransformer(cfg).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(shapes)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(dtype) for k in keys[i::shards]}
        save_file(part, folder / name)
        weight_map.update({k: name for k in part})
        total += sum(v.numel() * v.element_size() for v in part.values())
        del part
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config_json(cfg)))
    return total


def test_peak_host_memory_while_loading(tmp_path):
    """Peak RSS above the process baseline stays under 1.2x the loaded model (+ 48 MiB of slack).

    A loader that reads the whole state dict before building the model needs ~2x and fails.
    """
    if sys.platform != "linux":
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    size = write_random_shards(tmp_path / "m", MEMORY_CFG)
    assert size > 300e6
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(ROOT), str(tmp_path / "m"), "fp32"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["model_bytes"] == size
    extra = figures["peak"] - figures["base"]
    print(f"\nloaded {size / 2**20:.0f} MiB: peak RSS over baseline {extra / 2**20:.0f} MiB ({extra / size:.2f}x)")
    assert extra <= 1.2 * size + 48 * 2**20, f"peak {extra / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
