"""``DistributedSampler``: the engine's ``StreamingSampler`` interface over a worker pool.

Same constructor inputs (minus the model, which the pool holds) and the same
``blocks(num_clips)`` iterator of ``BlockOutput`` in (clip, block) order, so the pipeline,
the CLI and the nodes swap it in (e.g. ``VideoStream(..., block_source=s.blocks)``).
With a pool that has a decode rank (``PoolOptions(decode_rank=True)``), ``frames(num_clips)``
yields the decoded ``FrameChunk``s instead (``VideoStream(..., frame_source=s.frames)``);
the VAE spec given as ``vae`` travels with the job and the parent decodes nothing.
Inputs cross the channel as tensors and plain data: the text context [L, text_dim]
(embedded on the workers), the sink inputs, the seed, the settings, and the rd offsets and
noise as data when they are injected. The audio features go block by block (``feed``), a
bounded number of blocks ahead of the delivered ones, so neither the parent nor a rank ever
holds the whole track's features for a job.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

from ..liveavatar.config import SamplerConfig
from ..liveavatar.sampler import (
    AudioSource,
    BlockOutput,
    RopeOffsets,
    SeededRopeOffsets,
    SinkInputs,
    TableRopeOffsets,
    default_rope_offsets,
    schedule,
)
from ..liveavatar.pipeline import FrameChunk
from .launcher import PoolOptions, WorkerPool, check_sp_layout, shared_pool


class DistributedSampler:
    """Runs the streaming sampler on the pool's workers; yields every clean block in order."""

    def __init__(
        self,
        pool: WorkerPool | PoolOptions,
        cfg: SamplerConfig,
        text: torch.Tensor,
        audio: AudioSource,
        sink: SinkInputs,
        seed: int,
        rope_offsets: RopeOffsets | None = None,
        noise: Callable[[int], torch.Tensor] | None = None,
        sink_refresh: None = None,
        check_cancel: Callable[[], None] | None = None,
        vae: dict | None = None,
    ):
        cfg.validate()
        if not torch.is_tensor(text):
            raise TypeError("DistributedSampler takes the text context as a tensor [L, text_dim]; the workers embed it")
        if sink_refresh is not None:
            raise ValueError("distributed runs always use the TPP clip-1 sink rule (clip 0's first latent)")
        self.pool = pool if isinstance(pool, WorkerPool) else shared_pool(pool)
        opts = self.pool.options
        check_sp_layout(opts.mode, opts.workers * opts.nnodes, opts.sp_size, cfg.steps)
        self.cfg, self.text, self.audio, self.sink, self.seed = cfg, text, audio, sink, seed
        self.rope_offsets = rope_offsets or default_rope_offsets(cfg, seed)
        self.noise = noise
        self.check_cancel = check_cancel
        self.vae = dict(vae) if vae is not None else None  # {"kind": "wan_vae", "path", "config"} | {"kind": "tiny_vae", "seed"}
        self.stats: dict[int, dict] = {}
        self.poll_s = 0.05  # how often the pool checks check_cancel (and a polled live feed)

    def _rope_spec(self, num_clips: int) -> dict:
        r = self.rope_offsets
        if isinstance(r, SeededRopeOffsets):
            return {"kind": "seeded", "seed": r.seed, "low": r.low, "high": r.high}
        if isinstance(r, TableRopeOffsets):
            table = [[[int(v) for v in steps] for steps in blocks] for blocks in r.table]
        else:  # any other pure function of (clip, block, step): tabulate it here
            table = self.schedule(num_clips).rd_table()
        return {"kind": "table", "table": torch.tensor(table, dtype=torch.int64)}

    def schedule(self, num_clips: int):
        return schedule(self.cfg, num_clips, self.seed, self.rope_offsets)

    def job(self, num_clips: int) -> dict:
        """The job message: everything but the per-block audio (``feed``)."""
        cfg = self.cfg
        job = {
            "cfg": dataclasses.asdict(cfg),
            "text": self.text.detach().cpu(),
            "ref_latent": self.sink.ref_latent.detach().cpu(),
            "motion_latents": self.sink.motion_latents.detach().cpu(),
            "seed": int(self.seed),
            "num_clips": int(num_clips),
            "rope": self._rope_spec(num_clips),
        }
        if self.vae is not None:
            job["vae"] = self.vae
        if self.noise is not None:
            job["noise"] = torch.stack([self.noise(c).detach().cpu() for c in range(num_clips)])
        return job

    def feed(self, num_clips: int) -> Callable[[int], dict]:
        """Block g's message to the DiT ranks: its audio features, the frames its plan reads."""
        plan = self.schedule(num_clips)

        # a live source (``try_frames``: None until the block's audio is there) is polled, never waited on,
        # so the pool keeps receiving the blocks already made while the audio of later ones arrives
        read = getattr(self.audio, "try_frames", self.audio.frames)

        def block_audio(g: int) -> dict | None:
            p = plan.block_at(g)
            features = read(p.audio_start, p.audio_stop)
            if features is None:
                return None
            features = features.detach().cpu().clone()  # no view of a track
            return {"type": "audio", "index": g, "start": p.audio_start, "stop": p.audio_stop, "features": features}

        return block_audio

    def _run(self, num_clips: int) -> Iterator[dict]:
        return self.pool.run(self.job(num_clips), self.check_cancel, self.poll_s, feed=self.feed(num_clips))

    def blocks(self, num_clips: int) -> Iterator[BlockOutput]:
        if self.pool.options.decode_rank:
            raise ValueError("this pool has a decode rank: it streams frames (use frames(), e.g. VideoStream(frame_source=...))")
        expected = (plan.where for plan in self.schedule(num_clips))
        self.stats = {}
        for msg in self._run(num_clips):
            where = (int(msg["clip"]), int(msg["block"]))
            want = next(expected, None)
            if where != want:
                raise RuntimeError(f"workers delivered block {where}, expected {want}")
            yield BlockOutput(where[0], where[1], msg["latents"])
        self.stats = self.pool.last_stats

    def frames(self, num_clips: int) -> Iterator[FrameChunk]:
        """The decoded video from the pool's decode rank, one ``FrameChunk`` per block in (clip, block) order."""
        if not self.pool.options.decode_rank:
            raise ValueError("frames() needs a pool with a decode rank (PoolOptions(decode_rank=True))")
        if self.vae is None:
            raise ValueError("frames() needs the VAE spec (DistributedSampler(..., vae={'kind': ...}))")
        plan = self.schedule(num_clips)
        expected = (p.where for p in plan)
        self.stats = {}
        first = 0
        for done, msg in enumerate(self._run(num_clips), start=1):
            where = (int(msg["clip"]), int(msg["block"]))
            want = next(expected, None)
            if where != want or int(msg["first_frame"]) != first:
                raise RuntimeError(f"decode rank delivered block {where} at frame {msg['first_frame']}, expected {want} at {first}")
            frames = msg["frames"]
            yield FrameChunk(frames, first, where[0], where[1], done, len(plan))
            first += frames.shape[0]
        self.stats = self.pool.last_stats
