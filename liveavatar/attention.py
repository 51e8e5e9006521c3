"""Attention processors: the one place a layout changes how a DiT attention layer runs.

Every ``SelfAttention``/``CrossAttention`` layer holds ``self.processor`` and its ``forward`` and
``context_kv`` delegate to it (diffusers' ``WanAttnProcessor`` pattern). Block swap, FSDP
sharding and the sequence-parallel layouts install a processor with ``layer.set_processor(p)``
instead of rebinding the layer's methods, so a new layout plugs in by writing a processor.

* ``AttnProcessor``: the default, every head and every token in this process.
* ``ProcessorWrapper``: delegates to an inner processor; subclasses override what they change.
* ``WeightsGuard``: runs ``context_kv`` between ``enter()`` and ``exit()`` (the layer's weights are
  brought in by block swap or all-gathered by FSDP only around a forward; ``context_kv`` reads
  them outside one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention on [B, H, L, D] tensors."""
    return F.scaled_dot_product_attention(q, k, v)


@dataclass
class SegmentedKV:
    """Cross-attention context per token range: tokens [a, b) of x attend ``kv`` (e.g. each latent
    frame its own audio tokens, for a sequence-parallel slice that spans frames)."""

    parts: list[tuple[int, int, KV]]


class AttnProcessor:
    """Default processor: all heads of all tokens attended here."""

    def self_attention(self, attn, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        """x [B, L, dim] -> o(attend(q, k, v)); ``attend`` applies RoPE and the caches."""
        q, k, v = attn.qkv(x)
        return attn.out(attend(q, k, v))

    def cross_attention(self, attn, x: torch.Tensor, kv: KV | SegmentedKV) -> torch.Tensor:
        q = attn.heads(attn.norm_q(attn.q(x)))
        if isinstance(kv, SegmentedKV):  # one projection of all tokens, one attention per range
            return attn.out(torch.cat([attention(q[:, :, a:b], *part) for a, b, part in kv.parts], dim=2))
        return attn.out(attention(q, *kv))

    def context_kv(self, attn, context: torch.Tensor) -> KV:
        return attn.heads(attn.norm_k(attn.k(context))), attn.heads(attn.v(context))


DEFAULT_PROCESSOR = AttnProcessor()


class ProcessorWrapper(AttnProcessor):
    """Delegates everything to ``inner``; wrappers stack (e.g. a weights guard over a sequence split)."""

    def __init__(self, inner: AttnProcessor):
        self.inner = inner

    def self_attention(self, attn, x, attend):
        return self.inner.self_attention(attn, x, attend)

    def cross_attention(self, attn, x, kv):
        return self.inner.cross_attention(attn, x, kv)

    def context_kv(self, attn, context):
        return self.inner.context_kv(attn, context)


class WeightsGuard(ProcessorWrapper):
    """``context_kv`` with the layer's weights present: ``enter()`` before, ``exit()`` after."""

    def __init__(self, inner: AttnProcessor, enter: Callable[[], None], exit: Callable[[], None]):
        super().__init__(inner)
        self.enter, self.exit = enter, exit

    def context_kv(self, attn, context):
        self.enter()
        try:
            return self.inner.context_kv(attn, context)
        finally:
            self.exit()


def unwrap(processor: AttnProcessor, kind: type) -> AttnProcessor | None:
    """The first processor of type ``kind`` in a stack of wrappers (None if absent)."""
    while processor is not None:
        if isinstance(processor, kind):
            return processor
        processor = getattr(processor, "inner", None)
    return None
