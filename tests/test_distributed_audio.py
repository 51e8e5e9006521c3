"""Distributed jobs carry audio per block: rank memory is flat in the video's length.

The tiny DiT of ``bench/bench_rank_memory.py`` has the real audio feature size (25 wav2vec2
layers x 1024 = 102 kB per video frame), so a 21-clip track is ~49 MiB: a rank that held it
(the job message used to carry all of it) shows it in its resident memory, and in the bytes
it receives. The parent samples the ranks' RSS when clip 3 and clip 20 arrive, holding the
block back until the ranks are idle: with per-block audio they wait for the next block's
features, so no DiT call's activations blur the figure.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool
from liveavatar_pack.distributed.sampler import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from bench_rank_memory import CFG, DIT, conditioning, job_bytes, measure, track_bytes  # noqa: E402

MiB = 2**20


def test_a_job_message_does_not_grow_with_the_video():
    """What goes out up front is the same for 4 clips and 12: the audio comes per block (``feed``)."""
    size = {n: job_bytes(n) for n in (4, 12)}
    assert size[12] - size[4] < 1024, f"a job message of 12 clips has {size[12] - size[4]} bytes more than one of 4"
    text, audio, sink = conditioning(4)
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2))  # never started
    block = DistributedSampler(pool, CFG, text, audio, sink, seed=0).feed(4)(3)
    assert (block["start"], block["stop"]) == (3 * CFG.frames_per_block, 4 * CFG.frames_per_block)
    assert torch.equal(block["features"], audio.features[..., block["start"]:block["stop"]])


@pytest.mark.distributed
def test_rank_memory_is_flat_from_clip_3_to_clip_20(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))  # measure() sets it for the ranks; undone here
    clips = 21
    result = measure(clips, (3, 20), workers=2)
    track = track_bytes(clips)
    for r in result["ranks"]:
        base, at3, at20 = r["rss_before"], r["rss_at"][3], r["rss_at"][20]
        report = (f"rank {r['rank']}: RSS {base / MiB:.1f} MiB before the job, {at3 / MiB:.1f} at clip 3, "
                  f"{at20 / MiB:.1f} at clip 20 (the track's features: {track / MiB:.1f} MiB)")
        print(report)
        assert at3 - base < track / 2, report
        assert abs(at20 - at3) < track / 4, report
    per_block = CFG.frames_per_block * DIT.num_audio_layers * DIT.audio_dim * 4
    ahead = WorkerPool(PoolOptions(workers=2, mode="tpp")).feed_ahead()  # blocks fed beyond the delivered ones
    for r in result["ranks"]:
        print(f"rank {r['rank']}: audio received {r['audio_bytes_received'] / MiB:.1f} MiB, "
              f"held at most {r['audio_bytes_peak'] / MiB:.2f} MiB at once")
        assert r["audio_bytes_received"] == clips * CFG.blocks_per_clip * per_block
        assert r["audio_bytes_peak"] <= ahead * per_block < track / 2
