"""Merging a PEFT LoRA into the base weights: W' = W + (alpha / rank) * (B @ A), in float32.

The LiveAvatar LoRA must be merged before any quantization, so this works on a plain
state dict or module of float tensors. Reading the file lives in ``model_loaders``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

LIVEAVATAR_RANK = 128
LIVEAVATAR_ALPHA = 64.0
LIVEAVATAR_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.alpha$")


class LoraError(ValueError):
    """A LoRA that does not fit the model; the message names the key and shapes."""


@dataclass
class LoraPair:
    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    alpha: float | None = None


@dataclass
class LoraReport:
    merged: list[str] = field(default_factory=list)
    uncovered: list[str] = field(default_factory=list)  # target Linears the file does not touch
    rank: int = 0
    alpha: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def summary(self) -> str:
        text = f"merged {len(self.merged)} LoRA matrices (rank {self.rank}, alpha {self.alpha:g})"
        if self.uncovered:
            text += f"; {len(self.uncovered)} target layers not covered (e.g. {self.uncovered[0]})"
        return text


def parse_lora_state_dict(state: dict[str, torch.Tensor]) -> dict[str, LoraPair]:
    """Group PEFT keys (with or without ``base_model.model.`` and the adapter name) by module."""
    a_mats: dict[str, torch.Tensor] = {}
    b_mats: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if m:
            (a_mats if m["which"] == "A" else b_mats)[m["module"]] = tensor
            continue
        m = _ALPHA_KEY.match(key)
        if m and tensor.numel() == 1:
            alphas[m["module"]] = float(tensor)
            continue
        raise LoraError(f"LoRA key {key!r} is not a PEFT lora_A/lora_B weight")
    if not a_mats:
        raise LoraError("the file holds no lora_A/lora_B weights")
    missing = sorted(set(a_mats) ^ set(b_mats))
    if missing:
        raise LoraError(f"LoRA module {missing[0]!r} has only one of lora_A/lora_B")
    return {name: LoraPair(a_mats[name], b_mats[name], alphas.get(name)) for name in a_mats}


def resolve_alpha(pairs: dict[str, LoraPair], config_alpha: float | None) -> tuple[int, float]:
    """(rank, alpha): from per-module alpha keys, an adapter config, or the known LiveAvatar values."""
    ranks = {p.a.shape[0] for p in pairs.values()}
    if len(ranks) != 1:
        raise LoraError(f"LoRA mixes ranks {sorted(ranks)}; one rank per file is supported")
    rank = ranks.pop()
    alphas = {p.alpha for p in pairs.values() if p.alpha is not None}
    if len(alphas) > 1:
        raise LoraError(f"LoRA has different alphas per module {sorted(alphas)}")
    if alphas:
        return rank, alphas.pop()
    if config_alpha is not None:
        return rank, float(config_alpha)
    if rank == LIVEAVATAR_RANK:
        return rank, LIVEAVATAR_ALPHA
    raise LoraError(
        f"LoRA of rank {rank} carries no alpha and has no adapter_config.json beside it; "
        f"alpha is only known for the LiveAvatar LoRA (rank {LIVEAVATAR_RANK}, alpha {LIVEAVATAR_ALPHA:g})"
    )


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    config_alpha: float | None = None,
    targets: tuple[str, ...] = LIVEAVATAR_TARGETS,
) -> LoraReport:
    """Merge a PEFT LoRA state dict into ``model``'s Linear weights in place.

    Every LoRA module must be an ``nn.Linear`` of the model with matching shapes,
    otherwise nothing is changed and a ``LoraError`` names the key and the shapes.
    """
    pairs = parse_lora_state_dict(state)
    rank, alpha = resolve_alpha(pairs, config_alpha)
    modules = dict(model.named_modules())
    plan = []
    for name, pair in sorted(pairs.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            raise LoraError(f"LoRA key {name!r} matches no Linear module of the model (found {found})")
        out_f, in_f = module.weight.shape
        if pair.a.shape != (rank, in_f) or pair.b.shape != (out_f, rank):
            raise LoraError(
                f"LoRA {name!r}: lora_A {tuple(pair.a.shape)} / lora_B {tuple(pair.b.shape)} do not fit "
                f"weight {tuple(module.weight.shape)} (expected A ({rank}, {in_f}), B ({out_f}, {rank}))"
            )
        plan.append((name, module, pair))
    scaling = alpha / rank
    report = LoraReport(rank=rank, alpha=alpha)
    report.uncovered = [
        name for name, module in modules.items()
        if isinstance(module, nn.Linear) and name not in pairs and any(name == t or name.endswith("." + t) for t in targets)
    ]
    for name, module, pair in plan:
        w = module.weight
        delta = (pair.b.to(w.device, torch.float32) @ pair.a.to(w.device, torch.float32)) * scaling
        w.copy_((w.float() + delta).to(w.dtype))
        report.merged.append(name)
    return report
