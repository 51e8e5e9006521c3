"""Token layout vs RoPE positions on a non-square latent: each token's rotation must be the one of
the latent position it came from. The golden tests only see the golden geometry; these see any."""
from __future__ import annotations

import pytest
import torch

from liveavatar_pack.liveavatar import transformer as transformer_module
from liveavatar_pack.liveavatar.config import TINY
from liveavatar_pack.liveavatar.kv_cache import CacheStorage
from liveavatar_pack.liveavatar.rope import TokenGrid, rope_table
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer

H, W = TINY_LATENT_HW
REF_FRAME = 30  # the reference token's temporal position in the recorded call


def token_positions(model, nf: int, h: int, w: int) -> list[tuple[int, int, int]]:
    """(frame, token row, token column) of every token, read off the model's own unpatchify."""
    hp, wp = h // 2, w // 2
    n, width = nf * hp * wp, model.cfg.out_dim * 4
    marks = torch.arange(n, dtype=torch.float32)[:, None].expand(n, width)[None]
    pixels = model.unpatchify(marks, nf, hp, wp)  # [C, F, h, w]: each 2x2 patch holds its token index
    where = {int(pixels[0, f, 2 * i, 2 * j]): (f, i, j) for f in range(nf) for i in range(hp) for j in range(wp)}
    assert sorted(where) == list(range(n))
    return [where[k] for k in range(n)]


def recorded_block_tables(model, frame_start: int, h: int, w: int) -> list[torch.Tensor]:
    """The RoPE tables ``forward_block`` applies to the block's queries/keys (first layer)."""
    seen: list[torch.Tensor] = []
    real = transformer_module.apply_rope

    def recording(x, table):
        seen.append(table)
        return real(x, table)

    gen = torch.Generator().manual_seed(0)
    storage = CacheStorage("cpu", torch.float32)
    cond = model.new_cond_cache(h, w, storage)
    text = model.embed_text(torch.randn(7, TINY.text_dim, generator=gen))
    model.prefill_sink(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen), text, cond, 30)
    cache = model.new_kv_cache(h, w, 12, storage)
    audio = torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 12, generator=gen)
    x = torch.randn(16, 3, h, w, generator=gen)
    transformer_module.apply_rope = recording
    try:
        model.forward_block(x, torch.full((3,), 500.0), text, audio, cache, cond, frame_start, REF_FRAME, 19)
    finally:
        transformer_module.apply_rope = real
    return seen


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(0)


def test_block_tokens_are_rotated_by_their_own_latent_position(model):
    assert H != W, "the shared test geometry must be non-square"
    frame_start, nf = 5, 3
    positions = token_positions(model, nf, H, W)
    tables = recorded_block_tables(model, frame_start, H, W)
    n = len(positions)
    block_tables = [t for t in tables if t.shape[0] == n]
    assert block_tables, f"no RoPE table of the block's {n} tokens was applied"
    expected = torch.cat([rope_table([TokenGrid((frame_start + f,), (i,), (j,))], model.cfg.head_dim)
                          for f, i, j in positions])
    for table in block_tables:
        torch.testing.assert_close(table.cpu(), expected, rtol=0, atol=0)

    # the sink's reference frame is patchified the same way and sits first in the sink table
    sink_tables = [t for t in tables if t.shape[0] == model.sink_tokens(H, W)]
    assert sink_tables, "no RoPE table of the sink was applied"
    ref = torch.cat([rope_table([TokenGrid((REF_FRAME,), (i,), (j,))], model.cfg.head_dim)
                     for f, i, j in token_positions(model, 1, H, W)])
    for table in sink_tables:
        torch.testing.assert_close(table[: ref.shape[0]].cpu(), ref, rtol=0, atol=0)


def test_frame_packer_grids_match_its_pooled_token_shapes(model):
    """Each FramePack grid has as many rows and columns as its pooling conv yields on this latent."""
    motion = torch.randn(16, sum(model.frame_packer.buckets), H, W)
    n1, n2, n4 = model.frame_packer.buckets
    oldest, middle, newest = motion[None].split([n4, n2, n1], dim=2)
    pooled = [model.frame_packer.proj(newest), model.frame_packer.proj_2x(middle), model.frame_packer.proj_4x(oldest)]
    for grid, out in zip(model.frame_packer.grids(H, W), pooled):
        assert (len(grid.frames), len(grid.rows), len(grid.cols)) == tuple(out.shape[2:])
