"""Audio track -> one wav2vec2 feature per video frame, as LiveAvatar's DiT reads it.

Pipeline (upstream ``AudioEncoder.extract_audio_feat`` + ``get_audio_embed_bucket_fps``):

1. load any file librosa reads, or an in-memory waveform, as 16 kHz mono float32 (soxr_hq);
2. normalise like ``Wav2Vec2FeatureExtractor``: ``(x - mean) / sqrt(var + 1e-7)`` over the whole track;
3. wav2vec2 with all hidden states: ``[L = layers + 1, T50, D]`` at 50 Hz;
4. linear resampling 50 Hz -> 30 Hz with ``align_corners=True``, ``T30 = int(T50 / 50 * 30)``;
5. video frame ``i`` (25 fps) takes 30 Hz frame ``round(i * 30 / 25)``, zeros when that is ``>= T30``.

Long tracks: wav2vec2 attention is quadratic in length and the features cost 25 x 1024 floats per
frame, so nothing here holds the whole track's features. :class:`AudioFeatures` keeps only the
normalised waveform (64 kB per second) and encodes fixed windows of ``window_seconds`` on demand,
each with ``context_seconds`` of real audio on both sides, keeping the ``cached_windows`` most
recent ones (in the encoder's dtype). A track that fits in one window plus its context (90 s with
the defaults) is encoded in one pass, exactly as upstream does. Longer tracks deviate from a
one-shot encode (which upstream would attempt and run out of memory on). Measured with the tiny
golden wav2vec2 (24 layers, random weights) on a 64 s speech-like signal, max |windowed - one-shot|
/ max |one-shot| over all per-frame features, 10 s windows: 5.0e-2 with 2 s context, 2.3e-2 with
5 s, 1.4e-2 with 10 s (mean |diff| / mean |x|: 1.4e-2 at 5 s). Random attention weights spread over
the whole track, so these figures are pessimistic for a trained model, whose attention is mostly
local. ``tests/test_audio.py::test_windowed_long_audio_close_to_one_shot`` re-measures the 5 s case
on the tests' own tiny wav2vec2 (``tiny_audio_encoder(0)``, hidden 16), where it is 1.7e-3.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class AudioConfig:
    """Rates and windowing of the audio features (upstream's constants, plus our windowing)."""

    sample_rate: int = 16000  # wav2vec2 input rate
    feature_rate: int = 50  # wav2vec2 frames per second, as upstream assumes when resampling
    resample_rate: int = 30  # upstream's intermediate "video rate" of the features
    fps: int = 25  # output video frames per second
    norm_eps: float = 1e-7  # Wav2Vec2FeatureExtractor's variance epsilon
    resample_type: str = "soxr_hq"  # librosa.load's default resampler, as upstream
    window_seconds: float = 60.0  # span of audio whose features one encoder pass keeps
    context_seconds: float = 15.0  # extra audio fed on each side of a window, then dropped
    cached_windows: int = 2  # encoded windows kept in memory (sequential reads need 2)

    def validate(self) -> None:
        if min(self.sample_rate, self.feature_rate, self.resample_rate, self.fps) <= 0:
            raise ValueError("audio rates must be positive")
        if self.window_seconds <= 0 or self.context_seconds < 0 or self.cached_windows < 1:
            raise ValueError("window_seconds > 0, context_seconds >= 0 and cached_windows >= 1 are required")


DEFAULT_AUDIO = AudioConfig()


@dataclass(frozen=True)
class Waveform:
    """Mono float32 samples at ``sample_rate``; ``source`` names the input in error messages."""

    samples: np.ndarray
    sample_rate: int
    source: str

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def _to_mono(array: Any, source: str) -> np.ndarray:
    """[T], [C, T] or [1, C, T] (ComfyUI AUDIO) -> [T]; channels are averaged like librosa.to_mono."""
    if isinstance(array, torch.Tensor):
        array = array.detach().to("cpu", torch.float32).numpy()
    y = np.asarray(array, dtype=np.float32)
    if y.ndim == 3:
        if y.shape[0] != 1:
            raise ValueError(f"{source}: a batch of {y.shape[0]} audio tracks was given; LiveAvatar takes one")
        y = y[0]
    if y.ndim == 2:
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise ValueError(f"{source}: expected a waveform [T], [C, T] or [1, C, T], got shape {array.shape}")
    return y


_MAGIC = ((b"ID3", "MP3"), (b"\xff\xfb", "MP3"), (b"\xff\xf3", "MP3"), (b"fLaC", "FLAC"), (b"OggS", "Ogg"),
          (b"FORM", "AIFF"), (b"\x1aE\xdf\xa3", "Matroska/WebM"))


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """What the file holds and what the decoders said, for a one-line error.

    librosa tries libsndfile, then audioread, whose ``NoBackendError`` has an empty message; the
    useful words are libsndfile's (``error_string``, earlier in the chain) and the file's first bytes.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as err:
        return f"{err.strerror or err}"
    if size == 0:
        found = "an empty file (0 bytes)"
    elif head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        found = f"a WAV header ({size} bytes) without decodable audio (truncated, or an encoding libsndfile cannot read)"
    elif any(head.startswith(magic) for magic, _ in _MAGIC):
        kind = next(name for magic, name in _MAGIC if head.startswith(magic))
        found = f"{kind} data ({size} bytes) that no installed decoder could read (install ffmpeg for audioread)"
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
            found = f"text, not audio ({size} bytes, starting {text[:40].strip()!r})"
        else:
            found = f"{size} bytes in no audio format libsndfile recognises (starting {head[:8].hex(' ')})"
    details = []
    seen = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        said = str(getattr(err, "error_string", "") or "").strip() or str(err).strip().rstrip(":").strip()
        if said and not said.endswith(f"'{path}'") and said not in details:
            details.append(said)
        err = err.__cause__ or err.__context__
    return f"found {found}" + (f" ({'; '.join(details)[:200]})" if details else "")


def load_audio(audio: Any, sample_rate: int | None = None, config: AudioConfig = DEFAULT_AUDIO) -> Waveform:
    """A path, a ComfyUI AUDIO dict, or an array plus its ``sample_rate`` -> mono waveform at 16 kHz."""
    import librosa

    target = config.sample_rate
    if isinstance(audio, (str, Path)):
        source = str(audio)
        if not Path(audio).exists():
            raise ValueError(f"audio file {source} does not exist")
        if not Path(audio).is_file():  # a FIFO or device would block or never end
            raise ValueError(f"audio file {source}: expected a regular file; found a directory, FIFO or device")
        try:
            with warnings.catch_warnings():  # librosa warns before its audioread fallback; the error says it all
                warnings.simplefilter("ignore")
                y, _ = librosa.load(source, sr=target, mono=True, res_type=config.resample_type)
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes one clear message
            raise ValueError(f"cannot read audio file {source}: {_why_unreadable(Path(source), exc)}") from exc
    else:
        if isinstance(audio, dict):
            source = "AUDIO input"
            sample_rate = audio.get("sample_rate", sample_rate)
            audio = audio.get("waveform")
        else:
            source = "waveform"
        if audio is None or sample_rate is None:
            raise ValueError(f"{source}: need a waveform and its sample_rate")
        y = _to_mono(audio, source)
        if int(sample_rate) != target and len(y):
            y = librosa.resample(y, orig_sr=int(sample_rate), target_sr=target, res_type=config.resample_type)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if len(y) == 0:
        raise ValueError(f"{source}: the audio is empty (zero samples)")
    if not np.isfinite(y).all():
        raise ValueError(f"{source}: the audio contains NaN or infinite samples")
    return Waveform(y, target, source)


def normalize_waveform(samples: np.ndarray, eps: float = DEFAULT_AUDIO.norm_eps) -> np.ndarray:
    """Zero mean, unit variance in float32, exactly as the wav2vec2 feature extractor does it."""
    x = np.asarray(samples, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + eps)


def _round_half_even(num: np.ndarray, den: int) -> np.ndarray:
    """round(num / den) for integers, ties to even (numpy's rule), without float error."""
    q, r = np.divmod(num, den)
    return q + (2 * r > den) + ((2 * r == den) & (q % 2 == 1))


def _conv_geometry(model_config) -> tuple[int, int]:
    """(hop, receptive field) in samples of the wav2vec2 conv stack: (320, 400) for every release."""
    hop, field = 1, 1
    for kernel, stride in zip(reversed(model_config.conv_kernel), reversed(model_config.conv_stride)):
        field = (field - 1) * stride + kernel
    for stride in model_config.conv_stride:
        hop *= stride
    return hop, field


class AudioFeatures:
    """Per-video-frame wav2vec2 features of one track, computed window by window on demand.

    ``frames(a, b)`` is what the sampler feeds the DiT: ``[1, L, D, b - a]`` for video frames
    ``a..b-1``. It is upstream's ``audio_emb`` sliced, with zeros wherever the audio has ended.
    """

    def __init__(self, encoder: torch.nn.Module, waveform: Waveform, config: AudioConfig = DEFAULT_AUDIO):
        config.validate()
        if waveform.sample_rate != config.sample_rate:
            raise ValueError(
                f"{waveform.source}: waveform is at {waveform.sample_rate} Hz, expected {config.sample_rate}"
            )
        self.encoder = encoder.eval()
        self.config = config
        self.source = waveform.source
        self.hop, self.field = _conv_geometry(encoder.config)
        n = len(waveform.samples)
        if n < self.field:
            raise ValueError(
                f"{self.source}: audio too short to hold one wav2vec2 frame: {n} samples at "
                f"{config.sample_rate} Hz, at least {self.field} ({1000 * self.field / config.sample_rate:g} ms) needed"
            )
        self.input_values = torch.from_numpy(normalize_waveform(waveform.samples, config.norm_eps))
        self.duration = n / config.sample_rate
        self.num_layers = encoder.config.num_hidden_layers + 1
        self.dim = encoder.config.hidden_size
        self.num_50hz = (n - self.field) // self.hop + 1
        self.num_30hz = int(self.num_50hz / float(config.feature_rate) * config.resample_rate)
        window = max(1, round(config.window_seconds * config.feature_rate))
        context = round(config.context_seconds * config.feature_rate)
        if self.num_50hz <= window + 2 * context:
            window, context = self.num_50hz, 0  # one pass over the whole track: exact
        self._window, self._context = window, context
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.num_frames = self._count_frames_with_audio()

    @classmethod
    def from_hidden_states(cls, states: torch.Tensor, config: AudioConfig = DEFAULT_AUDIO,
                           source: str = "hidden states") -> "AudioFeatures":
        """Features over wav2vec2 hidden states computed elsewhere, ``[L, T50, D]`` at 50 Hz (e.g.
        ComfyUI's ``AUDIO_ENCODER_OUTPUT``): the same 30 Hz resampling and per-frame indexing."""
        if states.dim() != 3 or states.shape[1] < 1:
            raise ValueError(f"{source}: expected hidden states [layers, frames, dim], got {tuple(states.shape)}")
        self = cls.__new__(cls)
        config.validate()
        self.encoder, self.config, self.source = None, config, source
        self.num_layers, self.num_50hz, self.dim = (int(n) for n in states.shape)
        self.duration = self.num_50hz / config.feature_rate
        self.num_30hz = int(self.num_50hz / float(config.feature_rate) * config.resample_rate)
        self._window, self._context = self.num_50hz, 0
        self._cache = OrderedDict({0: states.detach().to("cpu", torch.float32).contiguous()})
        self.num_frames = self._count_frames_with_audio()
        return self

    # -- public API ---------------------------------------------------------------------------

    def num_clips(self, frames_per_clip: int) -> int:
        """Clips the audio allows: ``int(T30 / (frames_per_clip * 30 / 25)) + 1`` (upstream's rule).

        ``frames_per_clip * 30/25`` is a clip's length in 30 Hz feature frames. Upstream always adds one
        clip, so the track's tail is generated (its missing features are zeros) and a track that ends
        exactly on a clip boundary still gets one extra, silent clip. Callers cap it with the clips
        they want (upstream: ``min(num_repeat, nr)``).
        """
        scale = self.config.resample_rate / self.config.fps
        return int(self.num_30hz / (frames_per_clip * scale)) + 1

    def frame_indices(self, start: int, stop: int) -> np.ndarray:
        """The 30 Hz feature frame each video frame in ``[start, stop)`` reads (may be >= T30)."""
        i = np.arange(start, stop, dtype=np.int64)
        return _round_half_even(i * self.config.resample_rate, self.config.fps)

    def frames(self, start: int, stop: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Features of video frames ``[start, stop)`` as ``[1, L, D, stop - start]``; zeros past the end."""
        if not 0 <= start <= stop:
            raise ValueError(f"bad frame range [{start}, {stop})")
        out = torch.zeros(1, self.num_layers, self.dim, stop - start, dtype=torch.float32)
        idx = torch.from_numpy(self.frame_indices(start, stop))
        valid = idx < self.num_30hz
        if valid.any():
            out[0][..., valid] = self.features_30hz(idx[valid]).permute(0, 2, 1)
        return out.to(device=device, dtype=dtype)

    def features_30hz(self, indices: torch.Tensor) -> torch.Tensor:
        """30 Hz features ``[L, len(indices), D]`` (float32): F.interpolate(linear, align_corners=True)."""
        t50, t30 = self.num_50hz, self.num_30hz
        idx = torch.as_tensor(indices, dtype=torch.int64)
        scale = torch.tensor(float(t50 - 1), dtype=torch.float32) / (t30 - 1) if t30 > 1 else torch.tensor(0.0)
        src = scale * idx.to(torch.float32)
        i0 = src.floor().to(torch.int64).clamp(max=t50 - 1)
        lam1 = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
        i1 = torch.where(i0 < t50 - 1, i0 + 1, i0)
        needed = torch.unique(torch.cat([i0, i1]))
        hidden = self.hidden_50hz(needed)
        h0 = hidden[:, torch.searchsorted(needed, i0)]
        h1 = hidden[:, torch.searchsorted(needed, i1)]
        lam1 = lam1[None, :, None]
        lam0 = 1.0 - lam1
        # torch's CPU kernel evaluates fma(h0, lam0, h1 * lam1); float64 emulates that single rounding
        return (h0.double() * lam0.double() + (h1 * lam1).double()).float()

    def hidden_50hz(self, indices: torch.Tensor) -> torch.Tensor:
        """All hidden states ``[L, len(indices), D]`` (float32) of the given 50 Hz frames."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        out = torch.empty(self.num_layers, len(idx), self.dim, dtype=torch.float32)
        windows = idx // self._window
        for w in torch.unique(windows).tolist():
            sel = windows == w
            out[:, sel] = self._window_states(w)[:, idx[sel] - w * self._window].float()
        return out

    def release_encoder(self, offload_device: str | torch.device = "cpu") -> None:
        """Let the encoder's device memory go before sampling (what the VRAM plan assumes).

        A track encoded in one pass is encoded now and the encoder reference is dropped (the caller's
        last reference then frees it); a longer track keeps the encoder for its later windows, moved
        to ``offload_device`` (the plan's host copy), where those windows are then encoded.
        """
        if self.encoder is None:
            return
        if self._window >= self.num_50hz:
            self._window_states(0)
            self.encoder = None
        else:
            self.encoder.to(offload_device)

    # -- internals ----------------------------------------------------------------------------

    def _count_frames_with_audio(self) -> int:
        """Video frames whose feature index is < T30 (indices grow with the frame number)."""
        rate, fps = self.config.resample_rate, self.config.fps
        n = max(0, self.num_30hz * fps // rate - 2)
        while int(self.frame_indices(n, n + 1)[0]) < self.num_30hz:
            n += 1
        return n

    @torch.inference_mode()
    def _window_states(self, w: int) -> torch.Tensor:
        """Hidden states of window ``w``'s own frames, encoded with context on both sides (LRU cached)."""
        if w in self._cache:
            self._cache.move_to_end(w)
            return self._cache[w]
        first, last = w * self._window, min((w + 1) * self._window, self.num_50hz)
        a, b = max(0, first - self._context), min(self.num_50hz, last + self._context)
        chunk = self.input_values[a * self.hop:(b - 1) * self.hop + self.field]
        param = next(self.encoder.parameters())
        result = self.encoder(chunk[None].to(param.device, param.dtype), output_hidden_states=True)
        states = torch.cat(result.hidden_states)  # [L, b - a, D]
        if states.shape[1] != b - a:
            raise RuntimeError(f"wav2vec2 returned {states.shape[1]} frames for {b - a}; is its conv stack standard?")
        states = states[:, first - a:last - a].to("cpu").contiguous()
        self._cache[w] = states
        while len(self._cache) > self.config.cached_windows:
            self._cache.popitem(last=False)
        return states


def encode_audio(encoder: torch.nn.Module, audio: Any, sample_rate: int | None = None,
                 config: AudioConfig = DEFAULT_AUDIO) -> AudioFeatures:
    """Load ``audio`` (path, ComfyUI AUDIO dict or array + rate) and wrap it for on-demand encoding."""
    return AudioFeatures(encoder, load_audio(audio, sample_rate, config), config)


__all__ = ["AudioConfig", "AudioFeatures", "DEFAULT_AUDIO", "Waveform", "encode_audio", "load_audio",
           "normalize_waveform"]
