"""The WebSocket protocol: control messages (JSON text) and PCM (binary) from the client.

Client -> server (text frames are JSON objects with a ``type``; binary frames are PCM):

* ``{"type": "start", "sample_rate": 48000, "channels": 1, "format": "s16le" | "f32le", "image": "<base64>"?}``
  opens a session (the image is optional: the server's reference is used without it).
  Sample rates 8000..192000 Hz, mono or interleaved stereo (averaged), little-endian.
* binary frames: PCM in the declared format, any length (a whole number of sample frames).
* ``{"type": "end_utterance"}``: the audio so far is complete; do not wait for the look-ahead.
* ``{"type": "image", "image": "<base64 PNG/JPEG/...>"}``: new reference from the next block on.
* ``{"type": "stop"}``: stop generating, flush the stream, answer ``end``.

Server -> client: ``accepted`` (settings), ``init`` (the MSE mime type; the next binary frame is
the init segment), binary fMP4 media segments, ``block`` timing events, ``error`` (the session goes
on unless followed by ``end``), ``busy`` (then the socket closes, code 1013), ``end``.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

import numpy as np

from ..liveavatar.image import MAX_IMAGE_PIXELS

MIN_RATE, MAX_RATE = 8000, 192000
FORMATS = {"s16le": ("<i2", 32768.0), "f32le": ("<f4", 1.0)}
MAX_MESSAGE_BYTES = 16 << 20  # one WebSocket message (an image in base64, or a PCM chunk)


class ProtocolError(ValueError):
    """A message the server cannot use; its text goes back to the client as an ``error``."""


def parse_control(text: str) -> dict:
    try:
        msg = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError(f"expected a JSON control message, got {text[:40]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError('a control message is a JSON object with a "type" (start, end_utterance, image, stop)')
    return msg


@dataclass(frozen=True)
class AudioFormat:
    sample_rate: int
    channels: int
    format: str

    @classmethod
    def from_start(cls, msg: dict) -> "AudioFormat":
        rate, channels, fmt = msg.get("sample_rate"), msg.get("channels", 1), msg.get("format", "s16le")
        if not isinstance(rate, int) or isinstance(rate, bool) or not MIN_RATE <= rate <= MAX_RATE:
            raise ProtocolError(f"start: sample_rate must be an integer in {MIN_RATE}..{MAX_RATE} Hz, got {rate!r}")
        if channels not in (1, 2) or isinstance(channels, bool):
            raise ProtocolError(f"start: channels must be 1 or 2, got {channels!r}")
        if fmt not in FORMATS:
            raise ProtocolError(f"start: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return cls(rate, channels, fmt)


class PcmDecoder:
    """Binary PCM chunks at any rate -> mono float32 at 16 kHz, resampled as one continuous stream
    (soxr, the resampler librosa uses offline), so chunk boundaries leave no trace."""

    def __init__(self, fmt: AudioFormat, target_rate: int = 16000):
        self.fmt, self.target = fmt, target_rate
        self.dtype, self.scale = FORMATS[fmt.format]
        self.frame_bytes = np.dtype(self.dtype).itemsize * fmt.channels
        self._stream = None

    def _resampler(self):
        if self._stream is None and self.fmt.sample_rate != self.target:
            import soxr

            self._stream = soxr.ResampleStream(self.fmt.sample_rate, self.target, 1, dtype="float32", quality="HQ")
        return self._stream

    def decode(self, data: bytes) -> np.ndarray:
        if len(data) % self.frame_bytes:
            raise ProtocolError(f"PCM chunk of {len(data)} bytes is not a whole number of {self.fmt.channels}-channel "
                                f"{self.fmt.format} sample frames ({self.frame_bytes} bytes each)")
        x = np.frombuffer(data, self.dtype).astype(np.float32) / self.scale
        if self.fmt.channels == 2:
            x = x.reshape(-1, 2).mean(axis=1)
        if not np.isfinite(x).all():
            raise ProtocolError("PCM chunk contains NaN or infinite samples")
        stream = self._resampler()
        return stream.resample_chunk(x) if stream is not None else x

    def flush(self) -> np.ndarray:
        """The resampler's tail (end of utterance); the next chunk starts a fresh stream."""
        stream, self._stream = self._stream, None
        return stream.resample_chunk(np.zeros(0, np.float32), last=True) if stream is not None else np.zeros(0, np.float32)


def decode_image(data) -> "PIL.Image.Image":  # noqa: F821
    """A base64 image from a message -> PIL RGB, with the same pixel limit as image files."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(data, str):
        raise ProtocolError("image: expected a base64 string")
    try:
        raw = base64.b64decode(data.split(",", 1)[1] if data.startswith("data:") else data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("image: not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ProtocolError(f"image: {img.width}x{img.height} is over the {MAX_IMAGE_PIXELS} pixel limit")
            img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError):
        head = raw[:8].hex(" ")
        raise ProtocolError(f"image: the upload ({len(raw)} bytes, starting {head}) is not an image PIL can read") \
            from None
    return ImageOps.exif_transpose(img).convert("RGB")
