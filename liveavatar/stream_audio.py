"""Streaming audio features: wav2vec2 over a window that ends a fixed look-ahead after the block.

Live mode cannot wait for the whole track as :class:`liveavatar.audio.AudioFeatures` does. For the
video frames ``[a, b)`` of a block, :class:`StreamingFeatures` runs wav2vec2 once over the audio
from ``context_seconds`` before the block to ``lookahead_ms`` after the block's end (frame ``b`` at
25 fps), and keeps only the block's own 50 Hz hidden states. Three things differ from the offline
path, all because the end of the track is unknown:

1. the transformer sees ``lookahead_ms`` of future audio, not the whole rest of the track: the
   look-ahead's effect is that the last frames of a block hear what follows them (co-articulation);
   at 0 ms the block's last feature frames see no right context at all;
2. the input is normalised with the mean and variance of the real audio received up to the
   window's end (running sums, silence padding excluded), not of the whole track;
3. 50 Hz -> 30 Hz resampling uses the exact rate ratio 5/3; offline uses ``(T50 - 1) / (T30 - 1)``,
   which depends on the track's length (it drifts up to ~1 feature frame by a short track's end).

Features depend only on the samples, never on how they were chunked or when they arrived (the tests
check it). Latency floor: a block can start only when the audio up to its end plus the look-ahead
has arrived, so the first frame of a block is shown at least one block (480 ms) plus the look-ahead
after the audio that drives it was spoken. The default look-ahead and the measured difference from
the offline features on the golden audio are in the README ("Live mode").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .audio import DEFAULT_AUDIO, AudioConfig, _conv_geometry, _round_half_even


@dataclass(frozen=True)
class StreamingAudioConfig:
    lookahead_ms: float = 320.0  # audio after the block's end that wav2vec2 sees
    context_seconds: float = 3.0  # audio before the block that wav2vec2 sees

    def validate(self) -> None:
        if self.lookahead_ms < 0 or self.context_seconds < 0:
            raise ValueError(f"look-ahead and context must be >= 0, got {self.lookahead_ms} ms, "
                             f"{self.context_seconds} s")


class StreamingFeatures:
    """Per-video-frame wav2vec2 features ``[1, L, D, n]`` of audio pushed in pieces (16 kHz mono)."""

    def __init__(self, encoder: torch.nn.Module, config: StreamingAudioConfig = StreamingAudioConfig(),
                 audio: AudioConfig = DEFAULT_AUDIO):
        config.validate()
        audio.validate()
        self.encoder, self.config, self.audio = encoder.eval(), config, audio
        self.hop, self.field = _conv_geometry(encoder.config)
        self.num_layers = encoder.config.num_hidden_layers + 1
        self.dim = encoder.config.hidden_size
        self.lookahead = round(config.lookahead_ms * audio.sample_rate / 1000)
        self.context = round(config.context_seconds * audio.sample_rate)
        self.samples_per_frame = audio.sample_rate / audio.fps
        self._buf = np.zeros(0, np.float32)  # timeline samples [base, length)
        self._real = np.zeros(0, bool)  # which of them were received (not silence padding)
        self.base = 0
        self.length = 0
        self._stats_at = 0  # running sums cover real samples in [0, _stats_at)
        self._sum = self._sumsq = 0.0
        self._count = 0
        self.hold_from: int | None = None  # a soundtrack reader still needs samples from here on

    # -- input --------------------------------------------------------------------------------------
    def push(self, samples: np.ndarray) -> None:
        """Append received audio (mono float32 at ``audio.sample_rate``)."""
        self._append(np.asarray(samples, np.float32).reshape(-1), True)

    def pad_silence(self, count: int) -> None:
        """Append ``count`` samples of silence (nothing arrived in time); not counted in the input statistics."""
        if count > 0:
            self._append(np.zeros(count, np.float32), False)

    def _append(self, x: np.ndarray, real: bool) -> None:
        self._buf = np.concatenate([self._buf, x])
        self._real = np.concatenate([self._real, np.full(len(x), real)])
        self.length += len(x)

    def samples(self, start: int, stop: int) -> np.ndarray:
        """Timeline samples ``[start, stop)`` still held (the soundtrack of the frames)."""
        if start < self.base or stop > self.length:
            raise ValueError(f"samples [{start}, {stop}) not held (have [{self.base}, {self.length}))")
        return self._buf[start - self.base:stop - self.base].copy()

    def is_real(self, position: int) -> bool:
        """Whether the timeline sample at ``position`` was received (False: silence padding)."""
        return bool(self._real[position - self.base]) if self.base <= position < self.length else False

    # -- what a block needs ---------------------------------------------------------------------------
    def _plan(self, start: int, stop: int):
        i = np.arange(start, stop, dtype=np.int64)
        idx30 = _round_half_even(i * self.audio.resample_rate, self.audio.fps)
        src = idx30 * (self.audio.feature_rate / self.audio.resample_rate)
        i0 = np.floor(src).astype(np.int64)
        lam = (src - i0).astype(np.float32)
        i1 = i0 + 1
        end = max(int(i1.max()) * self.hop + self.field, round(stop * self.samples_per_frame) + self.lookahead)
        first = max(0, (int(i0.min()) * self.hop - self.context) // self.hop * self.hop)
        return i0, i1, lam, first, end

    def samples_needed(self, stop: int) -> int:
        """Timeline length needed before the features of frames ``< stop`` can be computed."""
        return self._plan(max(0, stop - 1), stop)[-1]

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Features of video frames ``[start, stop)``; the audio up to ``samples_needed(stop)`` must be there."""
        return self.encode(self.prepare(start, stop))

    def prepare(self, start: int, stop: int) -> tuple:
        """The normalised window and indices for ``frames`` (cheap; callers that share this object between
        threads hold their lock for this part only and run :meth:`encode` outside it)."""
        i0, i1, lam, first, end = self._plan(start, stop)
        if end > self.length:
            raise ValueError(f"frames [{start}, {stop}) need {end} samples of audio, {self.length} received")
        if first < self.base:
            raise ValueError(f"frames [{start}, {stop}) need audio from sample {first}, dropped (kept from {self.base})")
        mean, std = self._stats(end)
        x = (self._buf[first - self.base:end - self.base] - mean) / std
        self._drop_before(first)
        return x, i0 - first // self.hop, i1 - first // self.hop, lam

    def encode(self, prepared: tuple) -> torch.Tensor:
        """wav2vec2 over a prepared window -> ``[1, L, D, n]`` (50 Hz -> per-frame linear interpolation)."""
        x, k0, k1, lam = prepared
        param = next(self.encoder.parameters())
        with torch.inference_mode():
            out = self.encoder(torch.from_numpy(x)[None].to(param.device, param.dtype), output_hidden_states=True)
        hidden = torch.cat(out.hidden_states).float().cpu()  # [L, T, D] over the window
        w = torch.from_numpy(lam)[None, :, None]
        feats = hidden[:, torch.from_numpy(k0)] * (1 - w) + hidden[:, torch.from_numpy(k1)] * w  # [L, n, D]
        return feats.permute(0, 2, 1)[None].contiguous()

    def _stats(self, end: int) -> tuple[float, float]:
        """Mean and std (with the extractor's epsilon) of the real samples in ``[0, end)``; ``end`` never decreases."""
        if end > self._stats_at:
            seg = self._buf[self._stats_at - self.base:end - self.base].astype(np.float64)
            real = self._real[self._stats_at - self.base:end - self.base]
            self._sum += float(seg[real].sum())
            self._sumsq += float((seg[real] ** 2).sum())
            self._count += int(real.sum())
            self._stats_at = end
        n = max(1, self._count)
        mean = self._sum / n
        var = max(0.0, self._sumsq / n - mean * mean)
        return float(mean), float(np.sqrt(var + self.audio.norm_eps))

    def _drop_before(self, position: int) -> None:
        """Forget samples no later window reads (and the caller has taken for the soundtrack)."""
        keep_from = min(position, self._stats_at, position if self.hold_from is None else self.hold_from)
        if keep_from > self.base + 16 * self.audio.sample_rate:  # compact in big steps
            cut = keep_from - self.base
            self._buf, self._real = self._buf[cut:], self._real[cut:]
            self.base = keep_from


__all__ = ["StreamingAudioConfig", "StreamingFeatures"]
