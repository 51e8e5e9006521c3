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


# ----------------------------------------------------------------------------- full tensors
# Keys exactly as PEFT writes them for a Wan DiT: get_peft_model_state_dict drops the adapter name
# (``<m>.lora_A.weight``); the wrapped model's own state dict names a wrapped Linear's base tensors
# ``<m>.base_layer.weight`` / ``.bias`` and everything else by its plain name (checked against
# peft 0.21.2's get_peft_model on the tiny DiT with target_modules q,k,v,o,ffn.0,ffn.2).
def peft_file(model, names, full, prefix, rank=4, seed=0):
    state = lora_for(model, names, rank=rank, prefix=prefix, adapter="", seed=seed)
    return {**state, **{prefix + k: v for k, v in full.items()}}


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_full_tensors_replace_base_tensors_before_the_merge(prefix):
    model = tiny_transformer(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    full = {  # a norm, the patch embedding, and the base weight + bias of a LoRA-wrapped Linear
        "blocks.0.norm3.weight": torch.randn(before["blocks.0.norm3.weight"].shape, generator=gen),
        "patch_embedding.weight": torch.randn(before["patch_embedding.weight"].shape, generator=gen),
        "blocks.1.self_attn.q.base_layer.weight": torch.randn(before["blocks.1.self_attn.q.weight"].shape, generator=gen),
        "blocks.1.self_attn.q.base_layer.bias": torch.randn(before["blocks.1.self_attn.q.bias"].shape, generator=gen),
    }
    state = peft_file(model, ["blocks.1.self_attn.q", "blocks.0.ffn.0"], full, prefix)
    report = merge_lora(model, state, config_alpha=8.0)
    after = model.state_dict()

    def delta(m):
        return (state[f"{prefix}{m}.lora_B.weight"] @ state[f"{prefix}{m}.lora_A.weight"]) * 2.0

    assert torch.equal(after["blocks.0.norm3.weight"], full["blocks.0.norm3.weight"])
    assert torch.equal(after["patch_embedding.weight"], full["patch_embedding.weight"])
    # replaced first, then merged (upstream: load_state_dict(strict=False), then merge_and_unload)
    assert torch.equal(after["blocks.1.self_attn.q.weight"], full["blocks.1.self_attn.q.base_layer.weight"] + delta("blocks.1.self_attn.q"))
    assert torch.equal(after["blocks.1.self_attn.q.bias"], full["blocks.1.self_attn.q.base_layer.bias"])
    assert torch.equal(after["blocks.0.ffn.0.weight"], before["blocks.0.ffn.0.weight"] + delta("blocks.0.ffn.0"))
    touched = {"blocks.0.norm3.weight", "patch_embedding.weight", "blocks.1.self_attn.q.weight", "blocks.1.self_attn.q.bias",
               "blocks.0.ffn.0.weight"}
    assert all(torch.equal(after[k], before[k]) for k in before if k not in touched)
    assert report.replaced == ["blocks.0.norm3.weight", "blocks.1.self_attn.q.bias", "blocks.1.self_attn.q.weight",
                               "patch_embedding.weight"]
    assert report.merged == ["blocks.0.ffn.0", "blocks.1.self_attn.q"]
    assert "replaced 4 base tensors" in report.summary()


@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
@pytest.mark.parametrize("key,shape,message", [
    pytest.param("blocks.9.norm3.weight", (64,), r"'{p}blocks\.9\.norm3\.weight' is not a PEFT lora_A/lora_B weight and names no tensor", id="names-nothing"),
    pytest.param("blocks.0.norm3.base_layer.weight", (64,), r"'{p}blocks\.0\.norm3\.base_layer\.weight' .*names no tensor", id="base-layer-of-unwrapped"),
    pytest.param("blocks.0.self_attn.q.weight", (64, 64), r"'{p}blocks\.0\.self_attn\.q\.weight' .*blocks\.0\.self_attn\.q\.base_layer\.weight", id="plain-name-of-wrapped"),
    pytest.param("blocks.0.norm3.weight", (32,), r"'{p}blocks\.0\.norm3\.weight' replaces blocks\.0\.norm3\.weight of shape \(64,\); found shape \(32,\)", id="wrong-shape"),
])
def test_full_tensor_that_names_nothing_upstream_would_load_is_refused(prefix, key, shape, message):
    model = tiny_transformer(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = peft_file(model, ["blocks.0.self_attn.q"], {key: torch.zeros(shape)}, prefix)
    with pytest.raises(LoraError, match=message.format(p=prefix.replace(".", r"\."))):
        merge_lora(model, state, config_alpha=4.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- non-finite LoRAs (issue #11)

def test_nan_alpha_keys_are_refused_as_non_finite_not_as_different_alphas():
    model = tiny_transformer(0)
    names = ["blocks.0.ffn.0", "blocks.0.ffn.2"]
    state = lora_for(model, names)
    for name in names:
        state[f"base_model.model.{name}.alpha"] = torch.tensor(float("nan"))
    before = model.blocks[0].ffn[0].weight.detach().clone()
    with pytest.raises(LoraError) as err:
        merge_lora(model, state)
    text = str(err.value)
    assert "different alphas" not in text and "nan" in text and "finite" in text and "blocks.0.ffn." in text, text
    assert torch.equal(model.blocks[0].ffn[0].weight, before)


def test_infinite_config_alpha_is_refused():
    model = tiny_transformer(0)
    with pytest.raises(LoraError, match="expected a finite number"):
        merge_lora(model, lora_for(model, ["blocks.0.ffn.0"]), config_alpha=float("inf"))


def test_nan_lora_matrix_is_refused_before_any_weight_changes():
    model = tiny_transformer(0)
    names = ["blocks.0.ffn.0", "blocks.1.ffn.0"]
    state = lora_for(model, names)
    state["base_model.model.blocks.1.ffn.0.lora_B.default.weight"][2, 1] = float("nan")
    before = model.blocks[0].ffn[0].weight.detach().clone()
    with pytest.raises(LoraError, match=r"lora_B of module 'blocks.1.ffn.0' holds 1 NaN/Inf"):
        merge_lora(model, state, config_alpha=4.0)
    assert torch.equal(model.blocks[0].ffn[0].weight, before)


def test_nan_lora_file_names_the_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from liveavatar_pack.model_loaders.formats import ModelFileError
    from liveavatar_pack.model_loaders.lora_file import read_lora

    model = tiny_transformer(0)
    state = lora_for(model, ["blocks.0.ffn.0", "blocks.0.ffn.2"])
    state.update({f"base_model.model.{n}.alpha": torch.tensor(float("nan")) for n in ["blocks.0.ffn.0", "blocks.0.ffn.2"]})
    path = tmp_path / "nan_lora.safetensors"
    save_file(state, path)
    with pytest.raises(ModelFileError) as err:
        read_lora(path)
    text = str(err.value)
    assert str(path) in text and ".alpha" in text and "NaN/Inf" in text and "different alphas" not in text, text
