"""One live session: a paced audio timeline in, H.264/AAC fragments and per-block timing out.

The engine's sampler pulls audio features block by block through :class:`LiveAudio`, an
``AudioSource`` whose ``frames()`` waits until the audio a block needs (its end plus the feature
look-ahead) is on the timeline. Pacing rules (issue #14):

* audio that arrives faster than real time is appended to the timeline: queued, never dropped
  (up to ``max_queued_seconds``, then the client gets an error for that chunk);
* when nothing arrives, the timeline is padded with silence once the wall clock passes the time
  at which real-time audio would have been there (plus ``grace``), so the avatar keeps idling at
  the live pace; after an "end of utterance" the look-ahead is padded at once (no waiting);
* every block reports when its first frame left the encoder: ``latency_ms`` (from the arrival of
  the audio at the block's first frame), ``late_ms`` (from the earliest moment a real-time
  generator could have shown it) and ``behind_ms`` (``late_ms`` beyond one block: the player will
  stall by that much, so the page says so).

The generation runs in its own thread; :meth:`LiveSession.cancel` stops it between two DiT calls
or while it waits for audio, so a closed tab frees the engine within one block.
"""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..liveavatar.config import SamplerConfig
from ..liveavatar.sampler import Cancelled, SinkInputs
from ..liveavatar.stream_audio import StreamingFeatures
from ..liveavatar.vae import BlockDecoder, to_uint8
from .muxer import AUDIO_RATE, LiveMuxer, Segment

SOUND_LEAD = 2560  # samples of sound fed ahead of the video, so the AAC delay never holds frames back


@dataclass
class Pacing:
    grace: float = 0.25  # s a block waits for late real-time audio before padding silence
    max_queued_seconds: float = 600.0  # audio queued ahead of the generation, at most


class LiveAudio:
    """The sampler's ``AudioSource`` over a timeline that grows while it is read."""

    def __init__(self, features: StreamingFeatures, pacing: Pacing, cancelled: threading.Event):
        self.features, self.pacing, self.cancelled = features, pacing, cancelled
        self.cond = threading.Condition()
        self.t0 = time.monotonic()
        self.offset = 0  # sampler frame 0 is timeline frame ``offset`` (moves on a new reference)
        self.flush = False  # end of utterance: pad the look-ahead now
        self.arrivals: list[tuple[int, float]] = [(0, self.t0)]  # (timeline sample, wall time) of each piece
        self.pads: list[tuple[int, int]] = []  # (timeline sample, count) of each silence padding
        self.draining = False  # a pool job is stopping: its remaining blocks get zeros (their output is dropped)
        self._shape: tuple[int, ...] | None = None  # of the last features handed out

    # -- producer side (the connection) ------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        with self.cond:
            queued = self.features.length - self.features._stats_at
            if queued / AUDIO_RATE > self.pacing.max_queued_seconds:
                raise ValueError(f"more than {self.pacing.max_queued_seconds:g} s of audio queued; send at "
                                 f"most real-time pace")
            self._arrive()
            self.features.push(samples)
            self.flush = False
            self.cond.notify_all()

    def end_utterance(self) -> None:
        with self.cond:
            self.flush = True
            self.cond.notify_all()

    def _arrive(self) -> None:
        self.arrivals.append((self.features.length, time.monotonic()))
        if len(self.arrivals) > 4096:
            del self.arrivals[:2048]

    def arrival(self, sample: int) -> float:
        """Wall time the timeline sample arrived (or was padded)."""
        i = bisect.bisect_right(self.arrivals, (sample, float("inf"))) - 1
        return self.arrivals[max(0, i)][1]

    # -- consumer side (the sampler) ---------------------------------------------------------------
    def due(self, needed: int) -> float:
        """Earliest wall time real-time audio could have filled the timeline to ``needed``."""
        return self.t0 + needed / AUDIO_RATE

    def frames(self, start: int, stop: int) -> torch.Tensor:
        a, b = start + self.offset, stop + self.offset
        needed = self.features.samples_needed(b)
        with self.cond:
            while self.features.length < needed:
                if self.cancelled.is_set():
                    raise Cancelled()
                now = time.monotonic()
                if self.flush or now >= self.due(needed) + self.pacing.grace:
                    self._pad(needed)
                    break
                self.cond.wait(min(0.05, self.due(needed) + self.pacing.grace - now))
            prepared = self.features.prepare(a, b)
        return self.features.encode(prepared)  # outside the lock: the connection keeps pushing audio

    def try_frames(self, start: int, stop: int) -> torch.Tensor | None:
        """``frames`` without the wait, for a worker pool's feed (polled): None while the block's audio is
        not there and not yet due for silence padding. Once cancelled (or while a job stops for a new
        reference) it answers at once, zeros: the ranks finish the blocks they started (their output is
        dropped) and the pool stays usable."""
        a, b = start + self.offset, stop + self.offset
        needed = self.features.samples_needed(b)
        stopping = self.cancelled.is_set() or self.draining
        if stopping and self._shape is not None:  # the timeline is left as it is for the next job
            return torch.zeros(*self._shape[:-1], stop - start)
        with self.cond:
            if self.features.length < needed:
                if not (stopping or self.flush or time.monotonic() >= self.due(needed) + self.pacing.grace):
                    return None
                self._pad(needed)
            prepared = self.features.prepare(a, b)
        out = self.features.encode(prepared)
        self._shape = tuple(out.shape)
        return out

    def _pad(self, needed: int) -> None:
        """Silence up to ``needed`` (caller holds ``cond``)."""
        self._arrive()
        self.pads.append((self.features.length, needed - self.features.length))
        del self.pads[:-10000]
        self.features.pad_silence(needed - self.features.length)


@dataclass
class BlockEvent:
    """Timing of one block (sent to the client as JSON when the block's first frame is out)."""

    index: int
    first_frame: int
    frames: int
    audio_sample: int  # timeline sample at the block's first sampler frame
    due: float
    arrived: float
    written: float = 0.0
    extra: dict = field(default_factory=dict)


class LiveSession:
    """Runs the sampler + streaming decoder for one connection, in a thread."""

    def __init__(self, engine, pixels: torch.Tensor, send: Callable[[object], None], pacing: Pacing = Pacing(),
                 on_done: Callable[[], None] | None = None):
        m = engine.models
        self.engine, self.model, self.vae, self.text, self.cfg, self.seed = engine, m.model, m.vae, m.text, m.cfg, m.seed
        self.pixels = pixels
        self.height, self.width = pixels.shape[1:]
        features = engine.features()
        self.send = send  # called from worker threads with bytes (media) or dict (events)
        self.cancelled = threading.Event()
        self.stopping = threading.Event()
        self.audio = LiveAudio(features, pacing, self.cancelled)
        self.on_done = on_done or (lambda: None)
        self._new_pixels: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._pending: list[BlockEvent] = []
        self._out_times: list[tuple[float, int]] = []
        self.frames_out = 0
        self.first_frame_at: float | None = None
        self.error: str | None = None
        self.muxer: LiveMuxer | None = None
        self.thread = threading.Thread(target=self._run, name="live-session", daemon=True)

    @property
    def lookahead_ms(self) -> float:
        return self.audio.features.config.lookahead_ms

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        """Stop now (client gone): between two DiT calls or while waiting for audio."""
        self.cancelled.set()
        with self.audio.cond:
            self.audio.cond.notify_all()

    def stop(self) -> None:
        """Stop after the current block and flush what was generated (client asked)."""
        self.stopping.set()
        self.cancel()

    def new_reference(self, pixels: torch.Tensor) -> None:
        """Continue from the next block on with a new reference (same size, same timeline)."""
        with self._lock:
            self._new_pixels = pixels

    # -- the generation thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.muxer = LiveMuxer(self.width, self.height, self.cfg.fps, self._on_segment)
            with torch.inference_mode():
                while not self.cancelled.is_set():
                    self._generate(self.engine.encode(self.pixels))
                    with self._lock:
                        self.pixels, self._new_pixels = self._new_pixels, None
        except Cancelled:
            pass
        except Exception as err:  # noqa: BLE001 - reported to the client in one line
            self.error = f"{type(err).__name__}: {err}"
            self.send({"type": "error", "message": f"generation stopped: {self.error}"})
        finally:
            if self.muxer is not None:
                if self.stopping.is_set() and self.error is None:
                    self.muxer.close()
                else:
                    self.muxer.kill()
            self.send({"type": "end", "frames": self.frames_out, "error": self.error})
            self.on_done()

    def _generate(self, sink: SinkInputs) -> None:
        """One reference: sampler + decoder until cancelled or a new reference is waiting."""
        cfg = self.cfg
        self.audio.offset = self.frames_out
        sampler, num_clips = self.engine.sampler(sink, self.audio, self._check_cancel)
        decoder = BlockDecoder.from_config(self.vae, cfg)
        decoder.warm_up(sink.motion_latents)
        blocks = sampler.blocks(num_clips)
        try:
            self._stream(cfg, decoder, blocks)
        finally:  # a pool's job stops here (cancel, new reference): its last blocks' output is dropped
            self.audio.draining = True
            blocks.close()
            self.audio.draining = False

    def _stream(self, cfg: SamplerConfig, decoder: BlockDecoder, blocks) -> None:
        for index, block in enumerate(blocks):
            self._check_cancel()
            frames = to_uint8(decoder.decode_block(block.latents)).numpy()
            start = block.clip * cfg.frames_per_clip + block.block * cfg.frames_per_block + self.audio.offset
            first_out, n = self.frames_out, frames.shape[0]
            features = self.audio.features
            sample = round(start * features.samples_per_frame)
            needed = features.samples_needed(start + cfg.frames_per_block)
            event = BlockEvent(index, first_out, n, sample, self.audio.due(needed), self.audio.arrival(sample))
            event.extra["idle"] = not features.is_real(sample)
            event.extra["client_audio_s"] = self._client_seconds(sample)
            self.frames_out += n
            sound_from = self.muxer.audio_samples_in
            with self.audio.cond:  # the connection appends audio meanwhile
                sound_to = max(sound_from, min(features.length, round(self.frames_out * features.samples_per_frame)
                                               + SOUND_LEAD))
                sound = features.samples(sound_from, sound_to)
                # a pool reads features ahead; a new reference re-reads from the next frame: keep its window
                features.hold_from = sound_to if self.engine.pool is None else \
                    max(0, min(sound_to, round(self.frames_out * features.samples_per_frame) - features.context
                               - features.audio.sample_rate))
            with self._lock:
                event.written = time.monotonic()
                self._pending.append(event)
            self.muxer.write(frames, sound)
            with self._lock:
                if self._new_pixels is not None:
                    return

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()

    def _client_seconds(self, sample: int) -> float:
        """Seconds of client audio received before timeline sample ``sample`` (padding excluded)."""
        padded = sum(min(n, max(0, sample - at)) for at, n in self.audio.pads)
        return (sample - padded) / AUDIO_RATE

    # -- muxer output ------------------------------------------------------------------------------
    def _on_segment(self, seg: Segment) -> None:
        now = time.monotonic()
        if seg.init:
            self.send({"type": "init", "mime": f'video/mp4; codecs="{self.muxer.mime}"', "width": self.width,
                       "height": self.height, "fps": self.cfg.fps})
        self.send(seg.data)
        if seg.init:
            return
        if self.first_frame_at is None and seg.video_frames:
            self.first_frame_at = now
        self._out_times.append((now, seg.video_frames))
        del self._out_times[:-100]
        with self._lock:
            ready = [e for e in self._pending if e.first_frame < seg.video_frames]
            self._pending = [e for e in self._pending if e.first_frame >= seg.video_frames]
        for e in ready:
            self.send(self._event_json(e, now))

    def _event_json(self, e: BlockEvent, now: float) -> dict:
        block_ms = 1000 * self.cfg.frames_per_block / self.cfg.fps
        late = 1000 * (now - e.due)
        window = [(t, f) for t, f in self._out_times if t >= now - 5.0]
        fps = (window[-1][1] - window[0][1]) / (window[-1][0] - window[0][0]) if len(window) > 1 and \
            window[-1][0] > window[0][0] else 0.0
        return {
            "type": "block", "index": e.index, "first_frame": e.first_frame, "frames": e.frames,
            "audio_s": round(e.audio_sample / AUDIO_RATE, 4), "client_audio_s": round(e.extra["client_audio_s"], 4),
            "idle": bool(e.extra["idle"]),
            "latency_ms": round(1000 * (now - e.arrived), 1), "encode_ms": round(1000 * (now - e.written), 1),
            "late_ms": round(late, 1), "behind_ms": round(max(0.0, late - block_ms), 1),
            "fps": round(fps, 2), "since_start_ms": round(1000 * (now - self.audio.t0), 1),
            "queued_audio_ms": round(1000 * max(0, self.audio.features.length - e.audio_sample) / AUDIO_RATE, 1),
        }
