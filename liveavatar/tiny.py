"""Tiny random-weight models with the real architecture, for tests, demos and CPU benchmarks.

Every parameter (including the ones upstream zero-initialises) gets seeded random
values, so every path of the model contributes to the output.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import TINY, DiTConfig
from .transformer import LiveAvatarTransformer


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Fill every parameter with N(0, std^2) from a generator seeded ``seed`` (norm weights around 1)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, param in module.named_parameters():
        values = torch.randn(param.shape, generator=gen) * std
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
            values += 1.0
        param.copy_(values.to(param.dtype))
    return module


def tiny_transformer(seed: int = 0, cfg: DiTConfig = TINY) -> LiveAvatarTransformer:
    """A random LiveAvatar DiT of config ``cfg`` (the TINY preset by default), in eval mode."""
    return randomize_(LiveAvatarTransformer(cfg), seed).eval()
