"""What the crash-safe MP4 writer costs: encoding into the fragmented partial, then the final pass
(stream copy into a +faststart MP4, AAC sound). The final pass runs once per video, so its share
is what a run pays for a partial that stays playable. Usage:
  python bench/bench_video_writer.py [--size 704*384] [--seconds 10] [--fps 25]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import _pack

_pack.load()
from liveavatar_pack.liveavatar.video import Mp4Writer  # noqa: E402


def frames(n: int, h: int, w: int, start: int) -> np.ndarray:
    """A moving gradient with a little texture: compresses like a talking head, not like noise."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        t = start + i
        out[i, ..., 0] = (x + 2 * t) % 256
        out[i, ..., 1] = (y + t) % 256
        out[i, ..., 2] = ((x // 8 + y // 8 + t) % 2) * 64
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="704*384")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--fps", type=int, default=25)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("*"))
    n = int(args.seconds * args.fps)
    sr = 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(sr * args.seconds)) / sr)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.mp4"
        writer = Mp4Writer(out, fps=args.fps, audio=tone, sample_rate=sr)
        t0 = time.perf_counter()
        for start in range(0, n, 12):
            writer.write(frames(min(12, n - start), h, w, start))
        writer._finish_ffmpeg()  # encoding done: the partial is complete
        t1 = time.perf_counter()
        partial_bytes = writer.partial_path.stat().st_size
        writer._closed = True
        writer._remux(writer.partial_path, writer.path, overwrite=False)  # what close() adds
        t2 = time.perf_counter()
        writer._remove_tmp_audio()
        final_bytes = out.stat().st_size
    print(f"{n} frames {w}x{h}: encode into the fragmented partial {t1 - t0:.2f} s "
          f"({n / (t1 - t0):.1f} frames/s); final pass (copy + AAC + faststart) {t2 - t1:.2f} s "
          f"= {100 * (t2 - t1) / (t1 - t0):.1f}% of encoding; partial {partial_bytes / 2**10:.0f} KiB, "
          f"final {final_bytes / 2**10:.0f} KiB")


if __name__ == "__main__":
    main()
