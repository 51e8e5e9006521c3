"""3-axis rotary position embedding with upstream's exact rounding.

Upstream builds its cos/sin tables in float64 and stores them as complex32, so every
table entry is rounded to float16. We compute the same values on the fly from the
positions (no fixed 45000-row table, so very long videos keep working: attention
only sees position differences, and a float64 angle loses nothing at large p), keep
them as float32 tensors, and rotate in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Channel pairs given to the (frame, height, width) axes: (22, 21, 21) for d = 128."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def _axis_cos_sin(positions: torch.Tensor, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [len(positions), pairs] for one axis, float16-rounded, returned as float32.

    Negative positions use the conjugate of the |p| row, as upstream does.
    """
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / (2 * pairs))
    p = positions.to(torch.float64)
    angle = torch.outer(p.abs(), inv_freq)
    cos = torch.cos(angle).to(torch.float16)
    sin = (torch.sin(angle) * torch.sign(p).where(p != 0, torch.ones_like(p))[:, None]).to(torch.float16)
    return cos.float(), sin.float()


@dataclass(frozen=True)
class TokenGrid:
    """Positions of a rectangular group of tokens, frame-major then row then column."""

    frames: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.frames) * len(self.rows) * len(self.cols)


def sampled_positions(start: int, span: int, count: int) -> tuple[int, ...]:
    """``count`` integer positions spread over ``span`` positions from ``start`` (numpy linspace, truncated).

    Coarse frame-packer tokens cover several latent positions; upstream picks these.
    Negative starts count backwards from -start, mirroring upstream's negative-frame rule.
    """
    if start >= 0:
        return tuple(int(v) for v in np.linspace(start, start + span - 1, count).astype(int))
    return tuple(-int(v) for v in np.linspace(-start, -start - span + 1, count).astype(int))


def rope_table(grids: list[TokenGrid], head_dim: int) -> torch.Tensor:
    """cos/sin table [tokens, head_dim/2, 2] for the concatenated grids."""
    pf, ph, pw = axis_pairs(head_dim)
    parts = []
    for g in grids:
        if g.num_tokens == 0:
            continue
        fc, fs = _axis_cos_sin(torch.tensor(g.frames), pf)
        hc, hs = _axis_cos_sin(torch.tensor(g.rows), ph)
        wc, ws = _axis_cos_sin(torch.tensor(g.cols), pw)
        nf, nh, nw = len(g.frames), len(g.rows), len(g.cols)

        def expand(f, h, w):
            return torch.cat(
                [
                    f[:, None, None, :].expand(nf, nh, nw, pf),
                    h[None, :, None, :].expand(nf, nh, nw, ph),
                    w[None, None, :, :].expand(nf, nh, nw, pw),
                ],
                dim=-1,
            ).reshape(nf * nh * nw, pf + ph + pw)

        parts.append(torch.stack([expand(fc, hc, wc), expand(fs, hs, ws)], dim=-1))
    if not parts:
        return torch.zeros(0, head_dim // 2, 2)
    return torch.cat(parts, dim=0)


@lru_cache(maxsize=16)
def device_rope_table(grids: tuple[TokenGrid, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    """``rope_table`` on ``device``, remembered: the steps of a block share their tables, and an
    upload from pinned memory does not make the host wait for the device's queue."""
    table = rope_table(list(grids), head_dim)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of ``x`` [B, H, L, D] by ``table`` [L, D/2, 2]; returns x's dtype."""
    b, h, n, d = x.shape
    pairs = x.float().reshape(b, h, n, d // 2, 2)
    re, im = pairs.unbind(-1)
    cos, sin = table[..., 0], table[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.reshape(b, h, n, d).to(x.dtype)
