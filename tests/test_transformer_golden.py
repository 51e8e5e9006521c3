"""Parity of the DiT and the LoRA merge with the upstream golden data (dit/, pipeline/model_checks)."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from conftest import golden_subdir
from goldens import assert_close, golden_dit, read_json
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.sampler import SamplerConfig, reference_rope_frame

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def dit_dir(golden_dir):
    return golden_subdir(golden_dir, "dit")


@pytest.fixture(scope="module")
def model(dit_dir):
    return golden_dit(dit_dir)


def test_lora_merge_matches_sha256(dit_dir, model):
    checks = read_json(dit_dir / "lora_merged_checks.json")
    state = model.state_dict()
    assert set(checks["all_merged_sha256"]) == set(state), "merged state dict keys differ from golden"
    mismatched = [
        k for k, digest in checks["all_merged_sha256"].items()
        if hashlib.sha256(state[k].float().contiguous().numpy().tobytes()).hexdigest() != digest
    ]
    assert not mismatched, f"sha256 differs for {mismatched[:5]}"
    changed = set(checks["changed"])  # a dict (or list) of the weights the LoRA changed
    assert len(changed) == checks["num_changed"]
    base = load_file(dit_dir / "dit_base.safetensors")
    ours = {k for k in state if not torch.equal(state[k], base[k])}
    assert ours == changed, f"merge changed {sorted(ours ^ changed)[:5]} differently from the golden merge"
    for name, golden in load_file(dit_dir / "lora_merged_samples.safetensors").items():
        assert_close(state[name], golden, name, rel=1e-6)


@pytest.fixture(scope="module")
def model_checks(golden_dir):
    d = golden_subdir(golden_dir, "pipeline")
    return load_file(d / "model_checks.safetensors"), read_json(d / "call_log.json")


def _latent_hw(checks):
    x = checks["sink.in.x"]
    return x.shape[-2], x.shape[-1]


def test_sink_prefill(model, model_checks):
    checks, log = model_checks
    h, w = _latent_hw(checks)
    text = model.embed_text(checks["text_context"])
    cond = model.new_cond_cache(h, w, CacheStorage())
    sink_call = next(c for c in log["calls"] if c.get("model_check_tag") == "sink")
    model.prefill_sink(checks["sink.in.ref_latents"][0], checks["sink.in.motion_latents_last19"][0], text, cond,
                       SamplerConfig().rope_ref_frame)
    assert cond.length == sink_call["cond_end_after"]
    from liveavatar_pack.liveavatar.rope import rope_table
    sink_table = rope_table(model.sink_grids(h, w, SamplerConfig().rope_ref_frame), model.cfg.head_dim)
    assert torch.equal(sink_table, checks["sink.inter.rope_main"])
    for layer in range(model.cfg.num_layers):
        k, v = cond.read(layer)
        assert_close(k.transpose(1, 2), checks[f"sink.cache_after.layer{layer}.cond_k"], f"cond_k layer {layer}")
        assert_close(v.transpose(1, 2), checks[f"sink.cache_after.layer{layer}.cond_v"], f"cond_v layer {layer}")


@pytest.mark.parametrize("tag", ["blockA", "blockB"])
def test_block_call_with_caches(model, model_checks, tag):
    """A plain append (blockA) and a wrapped rolling-cache call (blockB), replayed in isolation."""
    checks, log = model_checks
    call = next(c for c in log["calls"] if c.get("model_check_tag") == tag)
    h, w = _latent_hw(checks)
    fsl = log["frame_seq_length"]
    storage = CacheStorage()
    cache = model.new_kv_cache(h, w, log["kv_cache_tokens"] // fsl, storage)
    cond = model.new_cond_cache(h, w, storage)
    for layer in range(model.cfg.num_layers):
        k = checks[f"{tag}.cache_before.layer{layer}.k"][0].transpose(0, 1)
        cache.k[layer, :, : k.shape[1]] = k
        cache.v[layer, :, : k.shape[1]] = checks[f"{tag}.cache_before.layer{layer}.v"][0].transpose(0, 1)
        cond.write(layer, checks[f"{tag}.cache_before.layer{layer}.cond_k"].transpose(1, 2),
                   checks[f"{tag}.cache_before.layer{layer}.cond_v"].transpose(1, 2))
    frame_start = call["current_start"] // fsl
    ref_frame = reference_rope_frame(SamplerConfig(), frame_start, call["relative_dist"])
    text = model.embed_text(checks["text_context"])
    out = model.forward_block(checks[f"{tag}.in.x"], checks[f"{tag}.in.t"][0], text, checks[f"{tag}.in.audio_input"],
                              cache, cond, frame_start, ref_frame, log["motion_frames"],
                              cond_states=checks[f"{tag}.in.cond_states"][0])
    assert_close(out, checks[f"{tag}.out.noise_pred"], f"{tag} velocity")
    slot = cache.slot(call["current_start"])
    n = call["current_end"] - call["current_start"]
    for layer in range(model.cfg.num_layers):
        assert_close(cache.k[layer, :, slot : slot + n], checks[f"{tag}.cache_after.layer{layer}.k_written"][0].transpose(0, 1),
                     f"{tag} written k layer {layer}")
        assert_close(cache.v[layer, :, slot : slot + n], checks[f"{tag}.cache_after.layer{layer}.v_written"][0].transpose(0, 1),
                     f"{tag} written v layer {layer}")
    if f"{tag}.inter.rope_main" in checks:
        from liveavatar_pack.liveavatar.rope import TokenGrid, rope_table
        hp, wp = h // 2, w // 2
        nf = checks[f"{tag}.in.x"].shape[1]
        grid = TokenGrid(tuple(range(frame_start, frame_start + nf)), tuple(range(hp)), tuple(range(wp)))
        assert torch.equal(rope_table([grid], model.cfg.head_dim), checks[f"{tag}.inter.rope_main"])
        assert torch.equal(rope_table(model.sink_grids(h, w, ref_frame), model.cfg.head_dim), checks[f"{tag}.inter.rope_cond"])
