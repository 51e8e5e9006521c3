"""Frames + PCM in, fragmented MP4 (H.264 + AAC) out, one small fragment per video frame.

One ffmpeg process per live session (the imageio-ffmpeg binary, as :mod:`liveavatar.video` uses):
raw RGB frames on its stdin, 16-bit PCM on a second pipe, fragmented MP4 on its stdout. Each pipe
is fed by its own thread, so ffmpeg can never block on one input while this process blocks writing
the other. The output is split at box boundaries into the *init segment* (``ftyp`` + ``moov``) and
*media segments* (``moof`` + ``mdat``); the video samples each ``moof`` carries are counted, so the
caller learns when a given frame has really left the encoder (per-block "frame to the client" times).

Latency choices: x264 ``ultrafast`` + ``zerolatency`` (no B-frames, no look-ahead: a frame leaves as
soon as it is written); fragments of one frame's duration (``-frag_duration``, rather than one per
GOP: a fragment is closed by the next packet, so all but a block's last frame leave as soon as they
are written, and that one with the next block); ``-max_interleave_delta`` small so video is not held
back waiting for AAC packets (the AAC encoder keeps ~1024 samples, 64 ms at 16 kHz), and the caller
feeds the sound a little ahead of the video for the same reason. ``-avoid_negative_ts disabled``
keeps AAC's priming in the edit list: otherwise ffmpeg stretches video frame 0 to cover it and
every later frame is shown 80 ms late. (``frag_every_frame`` was tried: with the audio track
its fragment times come out wrong, frames overlap and ffmpeg drops some when reading back.)
"""
from __future__ import annotations

import os
import queue
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

AUDIO_RATE = 16000  # the output soundtrack: the 16 kHz mono timeline the features were computed from
_SEGMENT_TAIL = (b"moov", b"mdat")


def _boxes(data: bytes):
    """(type, start, end) of the complete top-level boxes at the start of ``data``."""
    i = 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i:i + 4], "big")
        head = 8
        if size == 1:
            if i + 16 > len(data):
                return
            size, head = int.from_bytes(data[i + 8:i + 16], "big"), 16
        if size < head or i + size > len(data):
            return
        yield data[i + 4:i + 8], i, i + size
        i += size


def _child_boxes(data: bytes, start: int, end: int):
    yield from ((t, start + a, start + b) for t, a, b in _boxes(data[start:end]))


def video_samples_in_moof(moof: bytes, video_track: int) -> int:
    """Samples of track ``video_track`` described by a ``moof`` box (sum of its ``trun`` counts)."""
    count = 0
    for kind, a, b in _child_boxes(moof, 8, len(moof)):
        if kind != b"traf":
            continue
        track, samples = None, 0
        for sub, c, d in _child_boxes(moof, a + 8, b):
            if sub == b"tfhd":
                track = int.from_bytes(moof[c + 12:c + 16], "big")
            elif sub == b"trun":
                samples += int.from_bytes(moof[c + 12:c + 16], "big")
        if track == video_track:
            count += samples
    return count


def codecs_of(init: bytes) -> tuple[str, int]:
    """(MSE codecs string, video track id) of an init segment: ``avc1.PPCCLL`` from the ``avcC`` box."""
    at = init.find(b"avcC")
    if at < 0:
        raise ValueError("init segment has no avcC box (not H.264?)")
    profile, compat, level = init[at + 5], init[at + 6], init[at + 7]
    # the video track is the one whose trak holds avcC: find the tkhd before it
    tkhd = init.rfind(b"tkhd", 0, at)
    version = init[tkhd + 4]
    track = int.from_bytes(init[tkhd + (24 if version == 1 else 16):tkhd + (28 if version == 1 else 20)], "big")
    return f"avc1.{profile:02X}{compat:02X}{level:02X},mp4a.40.2", track


@dataclass
class Segment:
    data: bytes
    init: bool
    video_frames: int  # video frames out of the muxer so far, this segment included


class LiveMuxer:
    """Stream H.264/AAC fragmented MP4. ``on_segment(Segment)`` is called from a reader thread."""

    def __init__(self, width: int, height: int, fps: int, on_segment: Callable[[Segment], None],
                 audio_bitrate: str = "64k", crf: int = 23) -> None:
        import imageio_ffmpeg

        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs even frame sides, got {width}x{height}")
        self.width, self.height, self.fps = width, height, fps
        self.on_segment = on_segment
        self.mime: str | None = None
        self.video_track = 1
        self.frames_in = self.frames_out = 0
        self.audio_samples_in = 0
        self.error: str | None = None
        audio_read, self._audio_write = os.pipe()
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(fps), "-i", "pipe:0",
            "-f", "s16le", "-ar", str(AUDIO_RATE), "-ac", "1", "-i", f"pipe:{audio_read}",
            "-map", "0:v", "-map", "1:a",
            "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-crf", str(crf), "-g", str(2 * fps),
            "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", audio_bitrate,
            "-max_interleave_delta", "50000", "-flush_packets", "1", "-frag_duration", str(1_000_000 // fps),
            "-avoid_negative_ts", "disabled", "-movflags", "empty_moov+default_base_moof", "-f", "mp4", "pipe:1",
        ]
        # own session: a Ctrl+C in the server's terminal reaches the server, which closes this cleanly
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      pass_fds=(audio_read,), start_new_session=True)
        os.close(audio_read)
        self._video_q: queue.Queue = queue.Queue()
        self._audio_q: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(target=self._feed, args=(self._video_q, self._proc.stdin.fileno(), self._proc.stdin),
                             name="mux-video", daemon=True),
            threading.Thread(target=self._feed, args=(self._audio_q, self._audio_write, None),
                             name="mux-audio", daemon=True),
            threading.Thread(target=self._read, name="mux-read", daemon=True),
            threading.Thread(target=self._drain_stderr, name="mux-stderr", daemon=True),
        ]
        self._stderr: list[str] = []
        for t in self._threads:
            t.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    # -- input -------------------------------------------------------------------------------------
    def write(self, frames: np.ndarray, audio: np.ndarray) -> None:
        """uint8 frames ``[n, H, W, 3]`` and the float mono 16 kHz samples that play with them."""
        if frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [n, {self.height}, {self.width}, 3], got {frames.dtype} "
                             f"{tuple(frames.shape)}")
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
        self.frames_in += frames.shape[0]
        self.audio_samples_in += len(pcm)
        self._audio_q.put(pcm.tobytes())
        self._video_q.put(np.ascontiguousarray(frames).tobytes())

    def _feed(self, q: queue.Queue, fd: int, owner) -> None:
        broken = False
        while True:
            data = q.get()
            if data is None:
                break
            view = memoryview(data)
            while view and not broken:
                try:
                    view = view[os.write(fd, view):]
                except OSError:
                    broken = True  # ffmpeg gone: keep draining the queue so writers never block
        try:
            owner.close() if owner is not None else os.close(fd)
        except OSError:
            pass

    # -- output ------------------------------------------------------------------------------------
    def _read(self) -> None:
        buf = b""
        pending = b""
        out = self._proc.stdout.fileno()
        while True:
            data = os.read(out, 1 << 16)
            if not data:
                break
            buf += data
            used = 0
            for kind, a, b in _boxes(buf):
                pending += buf[a:b]
                used = b
                if kind == b"moov":
                    self.mime, self.video_track = codecs_of(pending)
                    self._emit(pending, True)
                    pending = b""
                elif kind == b"mdat":
                    self._emit(pending, False)
                    pending = b""
            buf = buf[used:]

    def _emit(self, data: bytes, init: bool) -> None:
        if not init:
            moof = next((data[a:b] for kind, a, b in _boxes(data) if kind == b"moof"), b"")
            self.frames_out += video_samples_in_moof(moof, self.video_track) if moof else 0
        self.on_segment(Segment(data, init, self.frames_out))

    def _drain_stderr(self) -> None:
        for line in iter(self._proc.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())
            del self._stderr[:-20]

    # -- end -----------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Flush everything written (the last fragments come out) and wait for ffmpeg."""
        self._video_q.put(None)
        self._audio_q.put(None)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for t in self._threads:
            t.join(timeout=2.0)
        if self._proc.returncode not in (0, None) and self._stderr:
            self.error = self._stderr[-1]

    def kill(self) -> None:
        """Stop at once (a session cancelled): nothing more is sent."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._video_q.put(None)
        self._audio_q.put(None)
        for t in self._threads:
            t.join(timeout=2.0)
