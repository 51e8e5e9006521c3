"""Probe an MP4 with the imageio ffmpeg binary (argument lists only): streams and audio length."""
from __future__ import annotations

import re
import subprocess

import imageio_ffmpeg


def probe_media(path, sample_rate: int = 16000):
    """(stream descriptions, audio seconds) via the imageio ffmpeg binary, argument lists only."""
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    info = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    streams = re.findall(r"Stream #\d+:\d+.*?: (Video|Audio): (\S+)", info)
    audio_secs = None
    if any(kind == "Audio" for kind, _ in streams):
        pcm = subprocess.run(
            [exe, "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1", "-ar", str(sample_rate), "-f", "s16le", "-"],
            capture_output=True,
            check=True,
        ).stdout
        audio_secs = len(pcm) / 2 / sample_rate
    return streams, audio_secs
