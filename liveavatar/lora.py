"""Merging a PEFT LoRA into the base weights: W' = W + (alpha / rank) * (B @ A), in float32.

The LiveAvatar LoRA must be merged before any quantization, so this works on a plain
state dict or module of float tensors. Reading the file lives in ``model_loaders``.

Full tensors in a LoRA file. Upstream (``add_lora_to_model`` in ``causal_s2v_pipeline*.py``)
wraps the DiT with PEFT (``target_modules`` q,k,v,o,ffn.0,ffn.2), loads the whole file into
that wrapped model with ``load_state_dict(strict=False)`` (``load_lora_weight_only=False``;
keys get a ``base_model.model.`` prefix when the first one lacks it), then
``merge_and_unload()``. So a full tensor replaces the base tensor of the same name *before* the
merge, and the names are those of the wrapped model: ``<m>.base_layer.weight`` / ``.bias`` for
a wrapped Linear ``<m>``, the plain name for anything else. We do the same
(:func:`replacement_targets`), with two differences on keys upstream would silently ignore: a
key that names nothing in the wrapped model is refused (a LoRA for another model), and so is
the plain ``<m>.weight`` of a wrapped Linear (upstream drops it as unexpected; replacing with
it would change the result, dropping it silently would hide a malformed file). A shape that
does not fit is refused (upstream's ``load_state_dict`` raises on it too).
"""
from __future__ import annotations

import math

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn

LIVEAVATAR_RANK = 128
LIVEAVATAR_ALPHA = 64.0
LIVEAVATAR_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.alpha$")
PEFT_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"


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
    replaced: list[str] = field(default_factory=list)  # model tensors replaced by the file's full tensors
    rank: int = 0
    alpha: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def summary(self) -> str:
        text = f"merged {len(self.merged)} LoRA matrices (rank {self.rank}, alpha {self.alpha:g})"
        if self.replaced:
            text += f"; replaced {len(self.replaced)} base tensors with the file's full tensors (e.g. {self.replaced[0]})"
        if self.uncovered:
            text += f"; {len(self.uncovered)} target layers not covered (e.g. {self.uncovered[0]})"
        return text


def is_lora_key(key: str) -> bool:
    """A PEFT ``lora_A``/``lora_B`` matrix or a per-module ``alpha`` (any prefix, any adapter name)."""
    return bool(_KEY.match(key) or _ALPHA_KEY.match(key))


def peft_wrapped(module_names: Iterable[str], targets: tuple[str, ...] = LIVEAVATAR_TARGETS) -> set[str]:
    """The modules PEFT's ``target_modules`` match (the name, or its last dotted parts, equals a target)."""
    return {n for n in module_names if any(n == t or n.endswith("." + t) for t in targets)}


def _strip_peft_prefix(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def replacement_targets(
    shapes: Mapping[str, tuple[int, ...]],
    params: Mapping[str, tuple[int, ...]],
    wrapped: set[str],
    name_of: Callable[[str], str] = _strip_peft_prefix,
) -> dict[str, str]:
    """Full tensors of a LoRA file -> the model tensors they replace, as upstream's load does.

    ``shapes``: the file's non-LoRA keys and their shapes; ``name_of`` turns a key into the
    name inside the wrapped model (default: without ``base_model.model.``); ``params``: the
    model's state dict names and shapes; ``wrapped``: the Linears PEFT wraps. Returns
    {model tensor name: file key}; raises ``LoraError`` (naming the key as in the file) for a
    key upstream would not load (see the module docstring) or a shape that does not fit.
    """
    out: dict[str, str] = {}
    for key, shape in sorted(shapes.items()):
        name = name_of(key)
        module, _, leaf = name.rpartition(".")
        if module.endswith(BASE_LAYER) and module[: -len(BASE_LAYER)] in wrapped:
            target = f"{module[: -len(BASE_LAYER)]}.{leaf}"
        elif module in wrapped:
            raise LoraError(
                f"LoRA key {key!r} is not a PEFT lora_A/lora_B weight, and upstream would not load it: {module} is a "
                f"LoRA-wrapped Linear whose base tensor PEFT names {module}{BASE_LAYER}.{leaf} (upstream's strict=False "
                "load ignores this spelling); rename the key to replace the base tensor, or drop it"
            )
        else:
            target = name
        if target not in params:
            raise LoraError(
                f"LoRA key {key!r} is not a PEFT lora_A/lora_B weight and names no tensor of the model "
                "(a file for another model?)"
            )
        if tuple(shape) != tuple(params[target]):
            raise LoraError(f"LoRA key {key!r} replaces {target} of shape {tuple(params[target])}; found shape {tuple(shape)}")
        if target in out:
            raise LoraError(f"LoRA keys {out[target]!r} and {key!r} both replace {target}")
        out[target] = key
    return out


def _finite_alpha(value: float, what: str) -> float:
    """A NaN/Inf alpha would scale every delta to NaN: refused, saying so (not as "different alphas")."""
    if not math.isfinite(value):
        raise LoraError(f"{what} is {value}; expected a finite number (a damaged LoRA file)")
    return value


def check_finite_pair(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """lora_A/lora_B of one module must be finite: one NaN spreads over the whole merged weight."""
    for which, t in (("lora_A", a), ("lora_B", b)):
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t.sum())):
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                raise LoraError(f"LoRA {which} of module {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}; "
                                "expected finite weights (a damaged LoRA file)")


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
            alphas[m["module"]] = _finite_alpha(float(tensor), f"alpha of LoRA module {m['module']!r} (key {key!r})")
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
        return rank, _finite_alpha(float(config_alpha), "the LoRA alpha given (argument or adapter config)")
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

    Full tensors in ``state`` replace the model's tensors first, as upstream loads them (see the
    module docstring); then every pair is merged. Every LoRA module must be an ``nn.Linear`` of
    the model with matching shapes, otherwise nothing is changed and a ``LoraError`` names the
    key and the shapes.
    """
    modules = dict(model.named_modules())
    current = model.state_dict()
    full = {k: v for k, v in state.items() if not is_lora_key(k)}
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    lora_modules = {_KEY.match(k)["module"] for k in state if _KEY.match(k)}
    replace = replacement_targets({k: tuple(v.shape) for k, v in full.items()},
                                  {k: tuple(v.shape) for k, v in current.items()},
                                  peft_wrapped(linears, targets) | lora_modules)
    pairs = parse_lora_state_dict({k: v for k, v in state.items() if k not in full})
    rank, alpha = resolve_alpha(pairs, config_alpha)
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
    for name, key in sorted(replace.items()):  # before the merge, as upstream's load_state_dict + merge_and_unload
        current[name].copy_(full[key].to(current[name].device, current[name].dtype))
        report.replaced.append(name)
    report.uncovered = [
        name for name, module in modules.items()
        if isinstance(module, nn.Linear) and name not in pairs and any(name == t or name.endswith("." + t) for t in targets)
    ]
    for name, _, pair in plan:  # all checked before any weight changes
        check_finite_pair(name, pair.a, pair.b)
    for name, module, pair in plan:
        w = module.weight
        delta = (pair.b.to(w.device, torch.float32) @ pair.a.to(w.device, torch.float32)) * scaling
        w.copy_((w.float() + delta).to(w.dtype))
        report.merged.append(name)
    return report
