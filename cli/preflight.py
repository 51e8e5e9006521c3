"""Checks a run can make before any model loads, all in one pass, one line per problem.

Loading umT5, the VAE and wav2vec2 takes minutes with real weights; a bad option, input or
file found after that wastes them. :class:`Preflight` runs every independent check, collects
each problem as one line and raises them together; warnings (the run can go on, but the
result will disappoint) are printed at once.
"""
from __future__ import annotations

import math
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch

from ..liveavatar.audio import Waveform
from ..liveavatar.config import SamplerConfig
from ..liveavatar.video import OutputExistsError, check_writable
from ..model_loaders.formats import KIND_NAMES, open_checkpoint, open_regular
from .commands import UserError

T = TypeVar("T")

# wav2vec2's conv stack (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2) sees 400 samples per frame
# in every release: fewer samples give no audio feature at all.
MIN_AUDIO_SAMPLES = 400
SILENCE_RMS_DBFS = -50.0  # speech sits around -20 dBFS; below -50 the mouth will hardly move
_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
EXPECTED_KIND = {"dit": "liveavatar_dit", "lora": "lora", "vae": "wan_vae", "text_encoder": "umt5",
                 "audio_encoder": "wav2vec2"}


class PreflightError(UserError):
    """Every problem found before loading, one per line (``main`` prefixes the first with ``error:``)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\nerror: ".join(problems))


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def check(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args)``, or None with its message recorded when it refuses the input."""
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, OSError) as err:
            self.problems.append(str(err))
            return None

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def finish(self, stream=None) -> None:
        """Print the warnings; raise :class:`PreflightError` if anything was refused."""
        stream = stream or sys.stderr  # read at call time: sys.stderr may be replaced after import
        for message in self.warnings:
            print(f"warning: {message}", file=stream, flush=True)
        if self.problems:
            raise PreflightError(self.problems)


def resolve_device(name: str) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device this torch can use, or a one-line UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N; found an unknown device name") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N; {device.type} is not supported")
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:  # ROCm builds say "cuda" too
        raise UserError(f"--device {name}: this torch {torch.__version__} is a CPU-only build (no CUDA); "
                        "install a CUDA build of torch or use --device cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch {torch.__version__} has CUDA but sees no GPU "
                        "(check the driver and CUDA_VISIBLE_DEVICES) or use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: expected an index below {count}; this machine shows {count} CUDA device(s)")
    return device


def _check_pth(path: Path) -> None:
    """A torch.save zip is truncated when its central directory (at the end) is missing."""
    with open_regular(path) as f:  # a FIFO named *.pth must not block the preflight
        magic = f.read(2)
    if magic == b"PK":
        if not zipfile.is_zipfile(path):
            raise UserError(f"{path}: expected a PyTorch weights file (zip); found a truncated or damaged zip "
                            f"({path.stat().st_size} bytes): download it again")
    elif magic[:1] != b"\x80":  # a legacy pickle cannot be checked without reading it
        raise UserError(f"{path}: expected a PyTorch weights file; found {path.stat().st_size} bytes of something else")


def check_model_file(part: str, path: Path) -> None:
    """Headers only: a truncated or foreign file, or a model of another kind, is refused in one line."""
    path = Path(path)
    if part == "tokenizer":
        return
    if path.is_file() and (path.suffix.lower() in _PTH_SUFFIXES):
        return _check_pth(path)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        for weights in sorted(p for p in path.iterdir() if p.suffix.lower() in _PTH_SUFFIXES):
            _check_pth(weights)
        return
    with open_checkpoint(path) as ckpt:
        kind = ckpt.kind
    expected = EXPECTED_KIND.get(part)
    if expected and kind not in (expected, "unknown"):
        raise UserError(f"{path}: expected the {part.replace('_', ' ')} ({KIND_NAMES[expected]}); "
                        f"found a {KIND_NAMES.get(kind, kind)}")


def check_audio(wave: Waveform, cfg: SamplerConfig, pre: Preflight) -> None:
    """Too short to give one feature: refused. Silent, or shorter than one clip: a warning."""
    n = len(wave.samples)
    if n < MIN_AUDIO_SAMPLES:
        rate = wave.sample_rate
        pre.problems.append(f"{wave.source}: audio too short: {n} samples ({1000 * n / rate:.1f} ms) at {rate} Hz; "
                            f"expected at least {MIN_AUDIO_SAMPLES} ({1000 * MIN_AUDIO_SAMPLES / rate:g} ms)")
        return
    rms = float(np.sqrt(np.mean(np.square(wave.samples, dtype=np.float64))))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < SILENCE_RMS_DBFS:
        pre.warn(f"{wave.source} is silent or nearly ({level:.0f} dBFS RMS, peak {float(np.abs(wave.samples).max()):.1e}): "
                 "the mouth will hardly move")
    clip_s = cfg.frames_per_clip / cfg.fps
    if wave.duration < clip_s:
        video_s = (cfg.frames_per_clip - cfg.dropped_first_frames) / cfg.fps
        pre.warn(f"{wave.source} is {wave.duration:.2f} s, shorter than one clip ({cfg.frames_per_clip} frames = "
                 f"{clip_s:.2f} s): the {video_s:.2f} s video is padded with silence after it")


__all__ = ["MIN_AUDIO_SAMPLES", "Preflight", "PreflightError", "check_audio", "check_model_file",
           "resolve_device"]


def check_output(path: str | Path, overwrite: bool) -> Path:
    """``check_writable`` for ``--out``: an existing file is refused unless ``--overwrite`` was given
    (a finished video is never lost to a rerun with the same name)."""
    try:
        return check_writable(path, overwrite=overwrite)
    except OutputExistsError as err:
        raise OutputExistsError(f"{err}; pass --overwrite to replace it") from None
