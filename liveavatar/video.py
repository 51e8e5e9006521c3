"""Streaming MP4 output: H.264 (yuv420p) frames appended as they are decoded, with sound.

:class:`Mp4Writer` pipes frames into one ffmpeg process (``imageio_ffmpeg.write_frames``), so
nothing but the frame being written is held in memory. While writing, the file is named
``<stem>.partial<suffix>`` (e.g. ``out.partial.mp4``) and holds the video stream only.

Sound (a waveform or an audio file) is muxed when the video is finished, in a second, cheap
ffmpeg pass that copies the H.264 stream and encodes AAC: the audio starts at t=0 with video
frame 0 and is cut to exactly the video's length (``-t frames/fps``; ffmpeg's ``-shortest``
with a piped video overshoots or undershoots by up to half a second). Audio shorter than the
video is padded with silence, so no generated frame is lost.

``close()`` gives the result its final name. If the writer is left through an exception
(including ``KeyboardInterrupt``, or SIGTERM where the CLI turns it into one) the frames written so far are finalised, with their sound,
into a playable file that keeps its ``.partial`` name, and the exception propagates.
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import wave
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Mp4Writer", "VIDEO_SUFFIXES", "VideoOutputError", "check_writable", "partial_path_for", "write_wav"]

# Containers that take H.264 + AAC as written here (ffmpeg picks the container from the suffix).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")


class VideoOutputError(OSError):
    """The output video cannot be written where it was asked for."""


def partial_path_for(path: str | Path) -> Path:
    """``out.mp4`` -> ``out.partial.mp4``: the name used while writing or after a failure."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix or '.mp4'}")


def check_writable(path: str | Path, create_dirs: bool = True) -> Path:
    """Make sure a video file can be created at ``path``; raise :class:`VideoOutputError` if not.

    The suffix must name a container ffmpeg writes H.264 + AAC into (:data:`VIDEO_SUFFIXES`):
    ffmpeg picks the container from it, and without one the mux fails only after the whole
    video was made. Missing parent directories are created when ``create_dirs``. The check
    really creates (and removes) a temporary file in the directory, since permission bits lie
    for root and on some network filesystems. Returns the absolute path.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise VideoOutputError(f"cannot write the video to {path}: it is a directory")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        found = f"'{path.suffix}'" if path.suffix else "none"
        raise VideoOutputError(f"cannot write the video to {path}: expected a video file name ending in "
                               f"{', '.join(VIDEO_SUFFIXES)}; found extension {found}")
    parent = path.parent
    if create_dirs and not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise VideoOutputError(f"cannot write the video to {path}: cannot create {parent} ({err})") from err
    if not parent.is_dir():
        raise VideoOutputError(f"cannot write the video to {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise VideoOutputError(f"cannot write the video to {path}: directory {parent} is not writable ({err})") from err
    return path


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def write_wav(path: str | Path, waveform: Any, sample_rate: int) -> None:
    """Write a float waveform (``[T]``, ``[C, T]`` or ComfyUI's ``[1, C, T]``) as 16-bit PCM."""
    w = _to_numpy(waveform).astype(np.float32, copy=False)
    if w.ndim == 3:
        if w.shape[0] != 1:
            raise ValueError(f"waveform batch must be 1, got shape {w.shape}")
        w = w[0]
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2:
        raise ValueError(f"waveform must be [T], [C, T] or [1, C, T], got shape {w.shape}")
    if w.shape[0] > 8 and w.shape[1] <= 8:  # [T, C] given
        w = w.T
    pcm = (np.clip(np.nan_to_num(w), -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(np.ascontiguousarray(pcm.T).tobytes())


_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _sigint_deferred():
    """Hold back Ctrl+C and SIGTERM while a frame is handed to ffmpeg or ffmpeg finishes (an
    exception inside imageio-ffmpeg's generator would kill ffmpeg and leave an unplayable file).
    A signal that arrived meanwhile is delivered again, to the restored handler, on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for sig in _DEFERRED_SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: caught.append(signum))
    except ValueError:  # not allowed here (e.g. embedded interpreter)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


class Mp4Writer:
    """Append uint8 frames ``[n, H, W, 3]`` (or ``[H, W, 3]``) to an H.264 MP4 with sound.

    Args:
        path: final file name. While writing, :func:`partial_path_for` (``*.partial.mp4``).
        fps: frames per second (LiveAvatar: 25).
        audio: optional waveform (``[T]``, ``[C, T]``, ``[1, C, T]``; float in [-1, 1]) with
            ``sample_rate``, or the path of an audio file ffmpeg can read.
        sample_rate: required with a waveform.
        crf: x264 constant rate factor (lower = better; 18 is visually lossless-ish).
        pad_to_even: H.264 yuv420p needs even sides; pad odd frames by repeating the last
            row/column (default) or, with False, refuse them.

    The output directory is checked (and created) in the constructor, before any frame
    exists. ffmpeg starts with the first frame. Use as a context manager::

        with Mp4Writer("out.mp4", fps=25, audio=wave, sample_rate=16000) as w:
            for block in blocks:
                w.write(to_uint8(frames))
        # -> out.mp4; on an exception -> out.partial.mp4 (playable) and the error propagates
    """

    def __init__(
        self,
        path: str | Path,
        fps: float = 25,
        audio: Any = None,
        sample_rate: int | None = None,
        *,
        crf: int = 18,
        preset: str = "medium",
        audio_bitrate: str = "192k",
        pad_to_even: bool = True,
        ffmpeg_log_level: str = "error",
    ) -> None:
        self.path = check_writable(path)
        self.partial_path = partial_path_for(self.path)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.crf = int(crf)
        self.preset = preset
        self.audio_bitrate = audio_bitrate
        self.pad_to_even = pad_to_even
        self.ffmpeg_log_level = ffmpeg_log_level
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the incoming frames
        self.final_path: Path | None = None
        self._gen = None
        self._closed = False
        self._tmp_audio: Path | None = None
        self._audio_path: str | None = None
        if audio is not None:
            if isinstance(audio, (str, Path)):
                audio_file = Path(audio)
                if not audio_file.is_file():
                    raise FileNotFoundError(f"audio file {audio_file} does not exist")
                self._audio_path = str(audio_file)
            else:
                if not sample_rate:
                    raise ValueError("a waveform needs its sample_rate")
                fd, tmp = tempfile.mkstemp(prefix="liveavatar-audio-", suffix=".wav")
                os.close(fd)
                self._tmp_audio = Path(tmp)
                try:
                    write_wav(self._tmp_audio, audio, int(sample_rate))
                except BaseException:
                    self._remove_tmp_audio()
                    raise
                self._audio_path = str(self._tmp_audio)

    # ------------------------------------------------------------------ writing
    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        out_h, out_w = height + height % 2, width + width % 2
        output_params = ["-preset", self.preset, "-crf", str(self.crf), "-movflags", "+faststart"]
        # Keep a stale partial from an earlier run from being mistaken for this one's.
        if self.partial_path.exists():
            self.partial_path.unlink()
        self._gen = imageio_ffmpeg.write_frames(
            str(self.partial_path),
            (out_w, out_h),
            fps=self.fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            ffmpeg_log_level=self.ffmpeg_log_level,
            output_params=output_params,
        )
        self._gen.send(None)
        self.size = (height, width)

    def write(self, frames: Any) -> None:
        """Append ``uint8 [n, H, W, 3]`` or ``[H, W, 3]`` (numpy or torch) frames."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        arr = _to_numpy(frames)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [n, H, W, 3], got shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise TypeError(f"frames must be uint8 (see liveavatar.vae.to_uint8), got {arr.dtype}")
        n, height, width, _ = arr.shape
        if n == 0:
            return
        if self.size is None:
            if (height % 2 or width % 2) and not self.pad_to_even:
                raise ValueError(f"H.264 yuv420p needs even frame sides, got {height}x{width}")
            self._start(height, width)
        elif self.size != (height, width):
            raise ValueError(f"frame size changed from {self.size[0]}x{self.size[1]} to {height}x{width}")
        if height % 2 or width % 2:
            arr = np.pad(arr, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        for frame in arr:
            with _sigint_deferred():
                self._gen.send(np.ascontiguousarray(frame))
            self.frames_written += 1

    # ------------------------------------------------------------------ finishing
    def _finish_ffmpeg(self) -> None:
        gen, self._gen = self._gen, None
        if gen is not None:
            with _sigint_deferred():
                gen.close()  # closes ffmpeg's stdin and waits: the file is complete

    def _remove_tmp_audio(self) -> None:
        if self._tmp_audio is not None:
            try:
                self._tmp_audio.unlink()
            except FileNotFoundError:
                pass
            self._tmp_audio = None

    @property
    def duration(self) -> float:
        """Seconds of video written so far."""
        return self.frames_written / float(self.fps)

    def _mux_audio(self, video: Path, target: Path) -> None:
        """``video`` (H.264 only) + the audio, cut/padded to the video's length -> ``target``."""
        import imageio_ffmpeg

        tmp = target.with_name(f"{target.stem}.muxing{target.suffix}")
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", self.ffmpeg_log_level,
            "-i", str(video), "-i", self._audio_path,
            "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "copy", "-c:a", "aac", "-b:a", self.audio_bitrate,
            "-af", "apad", "-t", f"{self.duration:.6f}",
            "-movflags", "+faststart", str(tmp),
        ]
        try:
            with _sigint_deferred():
                result = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
            if result.returncode != 0 or not tmp.is_file():
                raise VideoOutputError(
                    f"muxing the audio {self._audio_path} into {target} failed (ffmpeg exit {result.returncode}): "
                    f"{result.stderr.strip()[-2000:]}"
                )
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                tmp.unlink()

    def close(self) -> Path:
        """Finish the file (with sound) and give it its final name; returns that path."""
        if self._closed:
            if self.final_path is None:
                raise RuntimeError(f"writer for {self.path} was aborted")
            return self.final_path
        self._closed = True
        try:
            if self.frames_written == 0:
                raise ValueError(f"no frames were written to {self.path}")
            self._finish_ffmpeg()
            if not self.partial_path.is_file():
                raise VideoOutputError(f"ffmpeg did not produce {self.partial_path}")
            if self._audio_path is not None:
                self._mux_audio(self.partial_path, self.path)
                self.partial_path.unlink()
            else:
                os.replace(self.partial_path, self.path)
            self.final_path = self.path
            return self.path
        finally:
            self._remove_tmp_audio()

    def abort(self) -> Path | None:
        """Finalise what was written, with sound, under the partial name; returns it
        (None when no frame was written: then no file is left)."""
        if self._closed:
            return self.partial_path if self.partial_path.is_file() else None
        self._closed = True
        try:
            self._finish_ffmpeg()
            if self.frames_written == 0:
                if self.partial_path.exists():
                    self.partial_path.unlink()
                return None
            if not self.partial_path.is_file():
                return None
            if self._audio_path is not None:
                try:
                    self._mux_audio(self.partial_path, self.partial_path)
                except (OSError, subprocess.SubprocessError):
                    pass  # keep the silent partial video rather than mask the original error
            return self.partial_path
        finally:
            self._remove_tmp_audio()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def __del__(self) -> None:  # last resort: never leave ffmpeg or the temp WAV behind
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass
