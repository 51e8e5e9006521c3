"""Bytes each rank of a sequence-parallel (Ulysses) group sends per DiT call: the planner's link term.

Pure arithmetic on the config (the FSDP unit sizes come from a model built on the meta device, no
memory); ``distributed/ulysses.py`` is the implementation it predicts, and tests/test_ulysses.py
compares it with the bytes a rank really dispatches (``WireMeter``). For rank r of N with L block
tokens split ``L_r`` and heads split ``H_r`` (balanced, first ranks one more), head_dim D, E bytes
per activation element:

* per DiT block, two all-to-alls: q/k/v out, 3 * L_r * D * (H - H_r), and the attention output
  back, H_r * D * (L - L_r) elements;
* the head's output gathered on every rank: (N - 1) * L_r * prod(patch) * out_dim elements;
* with sharded weights, one FSDP all-gather per unit the call runs (every block, audio injector and
  its AdaLN, time embedding/projection, audio encoder, head): the rank's padded shard,
  ceil(rows / N) * cols per parameter, sent to the N - 1 others.

Point-to-point hand-offs of a tpp x sp layout (the block's latents to the next step group, once
per block rather than per call) are not included.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..liveavatar.config import DiTConfig


@dataclass(frozen=True)
class SPLayout:
    """One sp group: its size, whether weights are FSDP-sharded, bytes per element."""

    sp: int
    shard_weights: bool = True
    activation_bytes: int = 2  # bf16 activations (4: float32)
    weight_bytes: int = 2  # bytes per parameter of the low-precision part (fp32 modules stay 4)


def _split(n: int, world: int) -> list[int]:
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


# FSDP units a DiT call (forward_block) all-gathers, as (attribute path, whether it repeats per entry)
_CALL_UNITS = ("blocks", "audio_injector.injector", "audio_injector.injector_adain_layers",
               "time_embedding", "time_projection", "head", "casual_audio_encoder")


def _unit_shard_bytes(cfg: DiTConfig, world: int, weight_bytes: int) -> int:
    """One rank's padded shard bytes summed over the units a DiT call gathers."""
    import torch

    from ..liveavatar.transformer import LiveAvatarTransformer

    with torch.device("meta"):
        model = LiveAvatarTransformer(cfg)
    total = 0
    for path in _CALL_UNITS:
        unit = model
        for name in path.split("."):
            unit = getattr(unit, name)
        for pname, p in unit.named_parameters(prefix=path):
            fp32 = any(k in pname.split(".") for k in LiveAvatarTransformer.keep_in_fp32)
            rows = p.shape[0] if p.dim() else 1
            cols = p[0].numel() if p.dim() else 1
            total += math.ceil(rows / world) * cols * (4 if fp32 else weight_bytes)
    return total


def predicted_wire_bytes(cfg: DiTConfig, geometry, layout: SPLayout, rank: int = 0) -> dict[str, int]:
    """Bytes rank ``rank`` sends in one DiT call: {'all_to_all', 'gather', 'weights', 'total'}.

    ``geometry``: anything with ``block_tokens`` (the planner's ``Geometry``). Rank 0 holds the
    largest slices, so its figure is the per-call maximum.
    """
    n = layout.sp
    if n < 2:
        return {"all_to_all": 0, "gather": 0, "weights": 0, "total": 0}
    tokens, heads = _split(geometry.block_tokens, n), _split(cfg.num_heads, n)
    lr, hr, d = tokens[rank], heads[rank], cfg.head_dim
    per_block = 3 * lr * d * (cfg.num_heads - hr) + hr * d * (geometry.block_tokens - lr)
    e = layout.activation_bytes
    a2a = cfg.num_layers * per_block * e
    gather = (n - 1) * lr * math.prod(cfg.patch_size) * cfg.out_dim * e
    weights = (n - 1) * _unit_shard_bytes(cfg, n, layout.weight_bytes) if layout.shard_weights else 0
    return {"all_to_all": a2a, "gather": gather, "weights": weights, "total": a2a + gather + weights}
