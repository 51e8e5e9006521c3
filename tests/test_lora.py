"""LoRA merge rules on a tiny model: key variants, alpha, subsets and refusals."""
from __future__ import annotations

import pytest
import torch

from liveavatar_pack.liveavatar.lora import LoraError, merge_lora
from liveavatar_pack.liveavatar.tiny import tiny_transformer


def lora_for(model, names, rank=4, prefix="base_model.model.", adapter=".default", seed=0):
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    state = {}
    for name in names:
        out_f, in_f = modules[name].weight.shape
        state[f"{prefix}{name}.lora_A{adapter}.weight"] = torch.randn(rank, in_f, generator=gen)
        state[f"{prefix}{name}.lora_B{adapter}.weight"] = torch.randn(out_f, rank, generator=gen)
    return state


@pytest.mark.parametrize("prefix,adapter", [("base_model.model.", ".default"), ("", ""), ("", ".default")])
def test_merge_formula_and_key_variants(prefix, adapter):
    model = tiny_transformer(0)
    name = "blocks.1.self_attn.q"
    before = model.blocks[1].self_attn.q.weight.detach().clone()
    state = lora_for(model, [name], prefix=prefix, adapter=adapter)
    report = merge_lora(model, state, config_alpha=8.0)
    a = state[f"{prefix}{name}.lora_A{adapter}.weight"]
    b = state[f"{prefix}{name}.lora_B{adapter}.weight"]
    assert torch.equal(model.blocks[1].self_attn.q.weight, before + (b @ a) * 2.0)
    assert report.merged == [name] and report.scaling == 2.0


def test_subset_is_merged_and_reported():
    model = tiny_transformer(0)
    report = merge_lora(model, lora_for(model, ["blocks.0.ffn.0", "blocks.0.ffn.2"]), config_alpha=4.0)
    assert report.merged == ["blocks.0.ffn.0", "blocks.0.ffn.2"]
    assert "blocks.0.self_attn.q" in report.uncovered and "blocks.3.ffn.2" in report.uncovered
    assert "not covered" in report.summary()


def test_alpha_unknown_is_refused_and_liveavatar_rank_known():
    model = tiny_transformer(0)
    with pytest.raises(LoraError, match="carries no alpha"):
        merge_lora(model, lora_for(model, ["blocks.0.self_attn.q"]))
    # rank 128 without alpha: the known LiveAvatar values (alpha 64)
    from liveavatar_pack.liveavatar.config import TINY, replace
    from liveavatar_pack.liveavatar.transformer import LiveAvatarTransformer

    wide = LiveAvatarTransformer(replace(TINY, dim=128, ffn_dim=256, num_layers=1, audio_inject_layers=(0,)))
    report = merge_lora(wide, lora_for(wide, ["blocks.0.self_attn.q"], rank=128))
    assert report.alpha == 64.0 and report.rank == 128


def test_alpha_keys_in_file_are_used():
    model = tiny_transformer(0)
    state = lora_for(model, ["blocks.0.self_attn.k"], prefix="")
    state["blocks.0.self_attn.k.alpha"] = torch.tensor(2.0)
    assert merge_lora(model, state).alpha == 2.0


def test_unknown_key_and_bad_shape_refused_without_changes():
    model = tiny_transformer(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = lora_for(model, ["blocks.0.self_attn.q"])
    state["base_model.model.blocks.9.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 64)
    state["base_model.model.blocks.9.self_attn.q.lora_B.default.weight"] = torch.zeros(64, 4)
    with pytest.raises(LoraError, match=r"blocks\.9\.self_attn\.q.*matches no Linear"):
        merge_lora(model, state, config_alpha=4.0)
    bad = lora_for(model, ["blocks.0.self_attn.q"])
    bad["base_model.model.blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 32)
    with pytest.raises(LoraError, match=r"lora_A \(4, 32\).*weight \(64, 64\)"):
        merge_lora(model, bad, config_alpha=4.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_lora_key_refused():
    model = tiny_transformer(0)
    with pytest.raises(LoraError, match="not a PEFT"):
        merge_lora(model, {"blocks.0.self_attn.q.weight": torch.zeros(64, 64)}, config_alpha=1.0)
