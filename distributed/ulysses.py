"""Ulysses sequence parallel: every rank runs every layer on 1/N of the tokens.

What each of the N ranks of an sp group holds and does, per DiT call (``forward_block``):

* tokens: the contiguous slice ``token_range(L, r, N)`` of the block's L = F * fsl tokens (an
  uneven split when N does not divide L: sizes differ by at most one; no padding). Patch
  embedding, the time embedding and the audio encoder are cheap per call and run whole on every
  rank; every DiT block (modulation, norms, QKV, out, FFN, text cross-attention), the audio
  injectors and the head then run on the rank's own tokens only. The modulation and the audio
  injection are per latent frame: a slice that crosses a frame boundary is cut into segments
  (``token_segments``), and a rank projects the audio keys/values of the frames it touches only.
* self-attention: ``UlyssesProcessor``. q/k/v of the local tokens, all heads, go through one
  all-to-all (sequence-sharded -> head-sharded): each rank then has every token for its
  ``head_range`` of heads, applies RoPE, writes and reads the KV caches and the sink, attends,
  and a second all-to-all brings the output back (head-sharded -> sequence-sharded).
* KV caches and the sink store: split by heads, every token (``CacheStorage(heads=...)``), which
  is what Ulysses attention reads: no cache traffic at all. Uneven head counts (H % N != 0) work;
  the attention work is then uneven.
* text: the per-layer text keys/values (512 tokens, computed once per video) stay whole on every
  rank; each rank's queries attend all of them (1/N of the queries -> 1/N of the FLOPs).
* sink prefill: the reference + motion tokens are split the same way (one modulation row).
* output: the head's [L/N, 64] velocities are all-gathered, so every rank holds the block's whole
  latents (tiny: 16 channels) for the flow step, the pipeline hand-off and the stream.
* weights: optionally FSDP2-sharded (``sharding.shard_model``), with the next block's all-gather
  issued when the current block starts (explicit forward prefetch), so it overlaps its compute.

Why Ulysses and not ring attention: our attention is causal-by-block over a KV cache of the whole
clip plus a sink, not a single long self-attention. With Ulysses the cache is split by heads and
each rank attends its heads over the whole history locally: two all-to-alls of the block's own
q/k/v/o per layer, 4 * L * dim * (N-1) / N^2 elements per rank, independent of the cache length. Ring
attention keeps the sequence split, so every rank would need every other rank's slice of the
cache and the sink passed around the ring each layer: (N-1)/N of (cache + sink + block) keys and
values per rank per layer, 2 * dim * (N-1)/N * (window + sink + L) elements: at 704x384 (L = 3168
block tokens, a 12-frame window of 12672, 2640 sink tokens) 5.8x the Ulysses volume for N = 2
and 11.7x for N = 4 (Ulysses falls as 1/N^2, ring does not), and a cache split by tokens would also make the
rolling window's writes land on one rank at a time. Ulysses' limit (N <= heads, here 40) is far
beyond the 2-8 GPUs we target. PCIe consumer cards get the same all-to-all through NCCL.

``WireMeter`` measures the bytes a rank sends by watching the collectives it dispatches (the
all-to-alls, all-gathers of activations and FSDP's weight all-gathers); ``predicted_wire_bytes``
in ``model_loaders/wire_bytes.py`` is the planner's formula for the same figure.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from ..liveavatar.attention import DEFAULT_PROCESSOR, ProcessorWrapper


def split_sizes(n: int, world: int) -> list[int]:
    """Balanced contiguous split: the first n % world parts get one more."""
    base, extra = divmod(n, world)
    return [base + (r < extra) for r in range(world)]


def token_range(n: int, rank: int, world: int) -> tuple[int, int]:
    sizes = split_sizes(n, world)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def head_range(num_heads: int, rank: int, world: int) -> tuple[int, int]:
    if world > num_heads:
        raise ValueError(f"sp {world} needs at least {world} attention heads, the model has {num_heads}")
    return token_range(num_heads, rank, world)


class UlyssesGroup:
    """The collectives of one sp group, with a count of the bytes this rank sends."""

    def __init__(self, rank: int, world: int, num_heads: int, group=None):
        self.rank, self.world, self.group = rank, world, group
        self.heads = split_sizes(num_heads, world)
        self.head_start, self.head_stop = head_range(num_heads, rank, world)
        self.tokens: list[int] = []  # split of the sequence being run (set by ``shard``)
        self.sent_bytes = 0
        self.all_to_alls = 0

    def _exchange(self, chunks: list[torch.Tensor], out_numels: list[int]) -> list[torch.Tensor]:
        """Send ``chunks[s]`` to rank s; returns the flat chunks received from each rank."""
        inp = torch.cat([c.reshape(-1) for c in chunks])
        out = inp.new_empty(sum(out_numels))
        dist.all_to_all_single(out, inp, out_numels, [c.numel() for c in chunks], group=self.group)
        self.all_to_alls += 1
        self.sent_bytes += sum(c.numel() for s, c in enumerate(chunks) if s != self.rank) * inp.element_size()
        return list(out.split(out_numels))

    def seq_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """t [S, H, L_r, D] (S stacked tensors, local tokens, all heads) -> [S, H_r, L, D]."""
        s, _, _, d = t.shape
        chunks = [c.contiguous() for c in t.split(self.heads, dim=1)]
        hr = self.heads[self.rank]
        got = self._exchange(chunks, [s * hr * n * d for n in self.tokens])
        return torch.cat([g.view(s, hr, n, d) for g, n in zip(got, self.tokens)], dim=2)

    def heads_to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, H_r, L, D] -> [B, H, L_r, D]."""
        b, _, _, d = y.shape
        chunks = [c.contiguous() for c in y.split(self.tokens, dim=2)]
        lr = self.tokens[self.rank]
        got = self._exchange(chunks, [b * h * lr * d for h in self.heads])
        return torch.cat([g.view(b, h, lr, d) for g, h in zip(got, self.heads)], dim=1)


class UlyssesProcessor(ProcessorWrapper):
    """Self-attention of a sequence slice: all-to-all to head-sharded, attend, all-to-all back."""

    def __init__(self, comm: UlyssesGroup, inner=DEFAULT_PROCESSOR):
        super().__init__(inner)
        self.comm = comm

    def self_attention(self, attn, x, attend):
        q, k, v = attn.qkv(x)  # [1, H, L_r, D] each
        q, k, v = self.comm.seq_to_heads(torch.cat([q, k, v])).unbind(0)
        y = attend(q[None], k[None], v[None])  # [1, H_r, L, D]: RoPE, caches and sink of this rank's heads
        return attn.out(self.comm.heads_to_seq(y))


class UlyssesSplit:
    """The model's ``sequence_parallel``: this rank's token slice, and the gather of the head output."""

    def __init__(self, comm: UlyssesGroup):
        self.comm = comm

    def shard(self, n: int) -> tuple[int, int]:
        if n < self.comm.world:
            raise ValueError(f"sp {self.comm.world} splits a sequence of {n} tokens: every rank needs at least one")
        self.comm.tokens = split_sizes(n, self.comm.world)
        return token_range(n, self.comm.rank, self.comm.world)

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """local [1, L_r, C] -> [1, L, C] on every rank (the head's output: small)."""
        c = self.comm
        sizes = split_sizes(n, c.world)
        got = c._exchange([local] * c.world, [m * local.shape[-1] for m in sizes])
        return torch.cat([g.view(1, m, -1) for g, m in zip(got, sizes)], dim=1)


def sp_groups(rank: int, dit_ranks: int, sp: int):
    """Process groups of ``sp`` consecutive DiT ranks; this rank's (None for a rank outside them, e.g.
    the decode rank). Every rank of the world calls it: ``new_group`` is collective over the world."""
    mine = None
    for start in range(0, dit_ranks, sp):
        group = dist.new_group(list(range(start, start + sp)))
        if start <= rank < start + sp:
            mine = group
    return mine


def enable_ulysses(model, rank: int, world: int, group=None) -> UlyssesGroup:
    """Install Ulysses on ``model`` (every block's self-attention + the token split); returns the group."""
    comm = UlyssesGroup(rank, world, model.cfg.num_heads, group)
    for block in model.blocks:
        block.self_attn.set_processor(UlyssesProcessor(comm, block.self_attn.processor))
    model.set_sequence_parallel(UlyssesSplit(comm))
    return comm


# ----------------------------------------------------------------------------- measuring
_C10D = torch.ops.c10d


class WireMeter(TorchDispatchMode):
    """Bytes this rank sends through the collectives dispatched inside the ``with`` block.

    all-to-all: what goes to the other ranks; all-gather: the local input, once per other rank
    (the logical payload, whatever algorithm the backend uses); broadcast: the tensor, once per
    other rank at the root; send: the tensor. ``by_op`` splits the total per collective.
    """

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.rank, self.world = rank, world
        self.sent = 0
        self.by_op: dict[str, int] = {}

    def _add(self, op: str, nbytes: int) -> None:
        self.sent += nbytes
        self.by_op[op] = self.by_op.get(op, 0) + nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", None)
        others = self.world - 1
        if packet is _C10D.alltoall_base_:
            inp, in_splits = args[1], args[4]
            per_row = inp[0].numel() * inp.element_size() if inp.dim() else inp.element_size()
            if in_splits:
                self._add("all_to_all", sum(n for s, n in enumerate(in_splits) if s != self.rank) * per_row)
            else:
                self._add("all_to_all", inp.numel() * inp.element_size() * others // self.world)
        elif packet in (_C10D._allgather_base_, _C10D.allgather_into_tensor_coalesced_):
            inputs = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            self._add("all_gather", sum(t.numel() * t.element_size() for t in inputs) * others)
        elif packet is _C10D.allgather_:
            self._add("all_gather", sum(t.numel() * t.element_size() for t in args[1]) * others)
        elif packet is _C10D.broadcast_:
            root = args[2] if len(args) > 2 else 0
            if root == self.rank:
                self._add("broadcast", sum(t.numel() * t.element_size() for t in args[0]) * others)
        elif packet is _C10D.send:
            self._add("send", sum(t.numel() * t.element_size() for t in args[0]))
        return func(*args, **kwargs)
