"""Streaming MP4 output: H.264 (yuv420p) frames appended as they are decoded, with sound.

:class:`Mp4Writer` pipes frames into one ffmpeg process, so nothing but the frame being written
is held in memory. While writing, the file is named ``<stem>.partial<suffix>`` (e.g.
``out.partial.mp4``) and holds the video stream only, as a *fragmented* MP4 (an empty ``moov``
first, then a ``moof``+``mdat`` pair per second of video): it is playable at every moment, up to
its last complete fragment, whatever stops the run (a full disk, a kill). ffmpeg writes that
stream to a pipe; this process copies it into a file it created itself (``O_EXCL|O_NOFOLLOW``),
so ffmpeg never opens the predictable partial name, and a full disk is seen here as ``ENOSPC``:
the partial is cut back to its last complete fragment and the error says "no space left on ...".

The final file is made when the video is finished, by a second, cheap ffmpeg pass that copies
the H.264 stream into a normal (``+faststart``) MP4 and encodes the sound as AAC: the audio starts
at t=0 with video frame 0 and is cut to exactly the video's length (``-t frames/fps``; ffmpeg's
``-shortest`` with a piped video overshoots or undershoots by up to half a second). Audio shorter
than the video is padded with silence, so no generated frame is lost. That pass writes to a
``mkstemp`` file (random name, same folder) that is renamed over the final name once checked to be
the regular file that was created; an existing final file is kept unless ``overwrite=True``.

``close()`` gives the result its final name. If the writer is left through an exception
(including ``KeyboardInterrupt``, or SIGTERM where the CLI turns it into one) the frames written so far are finalised, with their sound,
into a playable file that keeps its ``.partial`` name, and the exception propagates.
"""
from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import tempfile
import threading
import wave
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Mp4Writer", "OutputExistsError", "VIDEO_SUFFIXES", "VideoOutputError", "check_writable",
           "partial_path_for", "write_wav"]

# Containers that take H.264 + AAC as written here (ffmpeg picks the container from the suffix).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv")


class VideoOutputError(OSError):
    """The output video cannot be written where it was asked for."""


class OutputExistsError(VideoOutputError):
    """The output file exists and overwriting it was not allowed."""


def _error(message: str, code: int | None = None, cls: type = VideoOutputError) -> VideoOutputError:
    """An error whose text is ``message`` alone (``OSError(code, msg)`` would print ``[Errno N]``),
    with ``errno`` set so callers can still tell a full disk from other failures."""
    err = cls(message)
    err.errno = code
    return err


def _mount_point(path: Path) -> Path:
    path = path.absolute()
    while not os.path.ismount(path) and path.parent != path:
        path = path.parent
    return path


SOUNDTRACK_PREFIX = "liveavatar-audio-"  # + owner pid + "-": the temporary WAV a writer muxes from


def sweep_dead_soundtracks(folder: str | None = None) -> list[str]:
    """Remove this user's temporary soundtrack WAVs whose writing process is gone.

    A writer removes its WAV when it finishes or fails; a process killed by SIGKILL cannot, so
    the next writer cleans up after it. The file name carries the owner's pid.
    """
    folder = folder or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        pid_text = entry.name[len(SOUNDTRACK_PREFIX):].partition("-")[0]
        if not entry.name.startswith(SOUNDTRACK_PREFIX) or not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)  # raises when no such process exists
        except ProcessLookupError:
            try:
                os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:
                pass
        except OSError:  # alive under another user (PermissionError) or unreadable: leave it
            continue
    return removed

def no_space_message(folder: Path) -> str:
    """``no space left on <mount point> (<free> bytes free, writing in <folder>)``: where to make room."""
    try:
        free = os.statvfs(folder)
        left = f"{free.f_bavail * free.f_frsize} bytes free"
    except OSError:
        left = "free space unknown"
    mount = _mount_point(folder)
    where = "" if mount == folder.absolute() else f", writing in {folder}"
    return f"no space left on {mount} ({left}{where})"


def partial_path_for(path: str | Path) -> Path:
    """``out.mp4`` -> ``out.partial.mp4``: the name used while writing or after a failure."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix or '.mp4'}")


def check_writable(path: str | Path, create_dirs: bool = True, overwrite: bool = True) -> Path:
    """Make sure a video file can be created at ``path``; raise :class:`VideoOutputError` if not.

    The suffix must name a container ffmpeg writes H.264 + AAC into (:data:`VIDEO_SUFFIXES`):
    ffmpeg picks the container from it, and without one the mux fails only after the whole
    video was made. Missing parent directories are created when ``create_dirs``. The check
    really creates (and removes) a temporary file in the directory, since permission bits lie
    for root and on some network filesystems. Without ``overwrite`` an existing ``path`` (or a
    link there, even a dangling one) raises :class:`OutputExistsError`. Returns the absolute path.
    """
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise VideoOutputError(f"cannot write the video to {path}: it is a directory")
    if not overwrite and os.path.lexists(path):
        raise OutputExistsError(f"{path} already exists (not overwritten)")
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


def write_wav(path: Any, waveform: Any, sample_rate: int) -> None:
    """Write a float waveform (``[T]``, ``[C, T]`` or ComfyUI's ``[1, C, T]``) as 16-bit PCM
    to a path or an open binary file (a temp file is written through the descriptor that
    created it, never reopened by name)."""
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
    with wave.open(path if hasattr(path, "write") else str(path), "wb") as f:
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


# ffmpeg muxer for the partial file, by suffix: streamable formats, playable when cut anywhere
# after their header (fragmented MP4/MOV up to the last complete fragment; Matroska clusters).
_PARTIAL_FORMATS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
# A fragment per keyframe and at least one per second of video: a cut loses at most a second.
_FRAGMENT_FLAGS = ["-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-frag_duration", "1000000"]
_FOLLOW_SAFE_OPEN = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _create_exclusive(path: Path) -> int:
    """Open a new file at ``path`` for writing, never through a link: whatever is there (a stale
    partial, or a link planted at the predictable name) is removed first, not followed, and a
    name that reappears before the open makes it fail instead of being reused."""
    try:
        if os.path.lexists(path):
            os.unlink(path)  # removes a link itself, never its target
        return os.open(path, _FOLLOW_SAFE_OPEN, 0o666)
    except FileExistsError as err:
        raise VideoOutputError(f"cannot write {path}: something was created at that name while it was being "
                               f"replaced; refusing to follow it") from err
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise _error(no_space_message(path.parent), errno.ENOSPC) from err
        raise VideoOutputError(f"cannot write {path}: {err.strerror or err}") from err


def _same_regular_file(path: Path, ident: tuple[int, int]) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == ident


class _Mp4Boxes:
    """Follows the top-level boxes of an MP4 byte stream as it passes, to know where the file can
    be cut and stay playable: after the ``moov`` and after each fragment's ``mdat``."""

    _CUT_AFTER = (b"moov", b"mdat")

    def __init__(self) -> None:
        self._pos = 0  # stream bytes seen
        self._head = b""  # header bytes of the box being read
        self._left = 0  # body bytes of the current box still to come
        self._type = b""
        self.cuts: deque[int] = deque()  # offsets after complete moov/mdat boxes, in order

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                i += take
                self._pos += take
                self._left -= take
                if not self._left and self._type in self._CUT_AFTER:
                    self.cuts.append(self._pos)
                continue
            want = 16 if len(self._head) >= 8 and int.from_bytes(self._head[:4], "big") == 1 else 8
            take = min(want - len(self._head), n - i)
            self._head += data[i:i + take]
            i += take
            self._pos += take
            if len(self._head) < want or (want == 8 and int.from_bytes(self._head[:4], "big") == 1):
                continue
            size = int.from_bytes(self._head[8:16] if want == 16 else self._head[:4], "big")
            self._type = self._head[4:8]
            # size 0 ("to the end of the file") or a size smaller than its header: no cut inside
            self._left = size - want if size >= want else 1 << 62
            self._head = b""
            if not self._left and self._type in self._CUT_AFTER:
                self.cuts.append(self._pos)


class _FileSink(threading.Thread):
    """Copies ffmpeg's stdout into the partial file. A failed write (``ENOSPC`` above all) is kept
    in :attr:`error`, the file is cut back to the last point where it is playable, and the rest of
    the stream is drained (so ffmpeg finishes normally rather than dying on a broken pipe)."""

    def __init__(self, source, fd: int, path: Path, mp4: bool) -> None:
        super().__init__(name=f"mp4-sink-{path.name}", daemon=True)
        self.source, self.fd, self.path = source, fd, path
        self.boxes = _Mp4Boxes() if mp4 else None
        self.written = 0
        self.playable = 0  # bytes of the file that play (a cut point)
        self.error: OSError | None = None

    def run(self) -> None:
        read = self.source.fileno()
        while True:
            data = os.read(read, 1 << 20)
            if not data:
                return
            if self.error is None:
                try:
                    self._write(data)
                except Exception as err:  # never stop draining: ffmpeg (and the writer) would block on the pipe
                    self.error = err if isinstance(err, OSError) else OSError(f"{type(err).__name__}: {err}")

    def _write(self, data: bytes) -> None:
        if self.boxes is not None:
            self.boxes.feed(data)
        view = memoryview(data)
        try:
            while view:
                k = os.write(self.fd, view)
                view = view[k:]
                self.written += k
        except OSError as err:
            self.error = err
        if self.boxes is None:
            self.playable = self.written
        else:
            while self.boxes.cuts and self.boxes.cuts[0] <= self.written:
                self.playable = self.boxes.cuts.popleft()
        if self.error is not None and self.written > self.playable:
            try:
                os.ftruncate(self.fd, self.playable)  # frees space: a truncate never needs any
            except OSError:
                pass  # keep the first error; players skip a cut-off last fragment anyway


class _StderrTail(threading.Thread):
    """Keeps the last lines ffmpeg printed (it must never block on a full stderr pipe)."""

    def __init__(self, source) -> None:
        super().__init__(name="ffmpeg-stderr", daemon=True)
        self.source = source
        self.lines: deque[str] = deque(maxlen=40)

    def run(self) -> None:
        for line in iter(self.source.readline, b""):
            self.lines.append(line.decode("utf-8", "replace").rstrip())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)[-2000:]


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
        overwrite: replace an existing ``path``. By default an existing file is refused here and,
            should one appear while writing, kept (the new video then stays in the partial file).

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
        overwrite: bool = False,
        ffmpeg_log_level: str = "error",
    ) -> None:
        self.path = check_writable(path, overwrite=overwrite)
        self.partial_path = partial_path_for(self.path)
        if not fps or fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps = fps
        self.crf = int(crf)
        self.preset = preset
        self.audio_bitrate = audio_bitrate
        self.pad_to_even = pad_to_even
        self.overwrite = overwrite
        self.ffmpeg_log_level = ffmpeg_log_level
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (H, W) of the incoming frames
        self.final_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._sink: _FileSink | None = None
        self._stderr: _StderrTail | None = None
        self._fd: int | None = None
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
                sweep_dead_soundtracks()
                fd, tmp = tempfile.mkstemp(prefix=f"{SOUNDTRACK_PREFIX}{os.getpid()}-", suffix=".wav")
                self._tmp_audio = Path(tmp)
                try:
                    with os.fdopen(fd, "wb") as f:  # through mkstemp's descriptor, never reopened by name
                        write_wav(f, audio, int(sample_rate))
                except OSError as err:
                    self._remove_tmp_audio()
                    if err.errno == errno.ENOSPC:
                        raise _error(f"{no_space_message(Path(tmp).parent)} (the soundtrack's temporary WAV)",
                                     errno.ENOSPC) from err
                    raise
                except BaseException:
                    self._remove_tmp_audio()
                    raise
                self._audio_path = str(self._tmp_audio)

    # ------------------------------------------------------------------ writing
    def _start(self, height: int, width: int) -> None:
        import imageio_ffmpeg

        out_h, out_w = height + height % 2, width + width % 2
        fmt = _PARTIAL_FORMATS.get(self.path.suffix.lower(), "mp4")
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", self.ffmpeg_log_level,
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{out_w}x{out_h}", "-r", f"{self.fps}", "-i", "pipe:0",
            "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", self.preset, "-crf", str(self.crf),
            *(_FRAGMENT_FLAGS if fmt != "matroska" else []), "-f", fmt, "pipe:1",
        ]
        # A stale partial from an earlier run is removed (never mistaken for this one's), and a
        # link planted at the name is removed, not followed.
        self._fd = _create_exclusive(self.partial_path)
        # Own session: Ctrl+C reaches this process only, which then finishes ffmpeg cleanly.
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        self._sink = _FileSink(self._proc.stdout, self._fd, self.partial_path, mp4=fmt != "matroska")
        self._stderr = _StderrTail(self._proc.stderr)
        self._sink.start()
        self._stderr.start()
        self.size = (height, width)

    def _raise_sink_error(self) -> None:
        err = self._sink.error if self._sink is not None else None
        if err is None:
            return
        kept = (f"the first frames stay playable in {self.partial_path}" if self._sink.playable
                else f"nothing playable was written")
        if err.errno == errno.ENOSPC:
            raise _error(f"{no_space_message(self.partial_path.parent)} after {self.frames_written} frames; {kept}",
                         errno.ENOSPC)
        raise _error(f"writing {self.partial_path} failed after {self.frames_written} frames: "
                     f"{err.strerror or err}; {kept}", err.errno)

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
            self._raise_sink_error()
            try:
                with _sigint_deferred():  # a frame is handed over whole, or not at all
                    self._proc.stdin.write(np.ascontiguousarray(frame).tobytes())
            except (BrokenPipeError, ValueError) as err:
                self._raise_sink_error()
                self._proc.wait()
                raise VideoOutputError(f"ffmpeg stopped while writing {self.partial_path} (exit "
                                       f"{self._proc.returncode}): {self._stderr.text}") from err
            self.frames_written += 1

    # ------------------------------------------------------------------ finishing
    def _finish_ffmpeg(self) -> None:
        """Close ffmpeg's input and wait until the partial file holds everything ffmpeg made."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with _sigint_deferred():
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            proc.wait()
            self._sink.join()
            self._stderr.join()
            proc.stdout.close()
            proc.stderr.close()
            os.close(self._fd)
            self._fd = None
        self._raise_sink_error()
        if proc.returncode != 0:
            raise VideoOutputError(f"ffmpeg failed writing {self.partial_path} (exit {proc.returncode}): "
                                   f"{self._stderr.text}")

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

    def _remux(self, video: Path, target: Path, overwrite: bool) -> None:
        """``video`` (H.264 only) + the audio if any, cut/padded to the video's length -> a normal
        ``+faststart`` file at ``target``. ffmpeg writes a ``mkstemp`` file (random name, same
        folder, created here); it becomes ``target`` only if it still is that regular file."""
        import imageio_ffmpeg

        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".muxing{target.suffix}", dir=target.parent)
        tmp = Path(tmp_name)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        os.close(fd)
        audio = ["-i", self._audio_path] if self._audio_path is not None else []
        audio_out = (["-map", "1:a:0", "-c:a", "aac", "-b:a", self.audio_bitrate, "-af", "apad"]
                     if self._audio_path is not None else [])
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-y", "-v", self.ffmpeg_log_level,
            "-i", str(video), *audio, "-map", "0:v:0", "-c:v", "copy", *audio_out,
            "-t", f"{self.duration:.6f}", "-movflags", "+faststart", str(tmp),
        ]
        try:
            with _sigint_deferred():
                result = subprocess.run(cmd, capture_output=True, text=True, start_new_session=True)
            if result.returncode != 0:
                what = f"muxing the audio {self._audio_path} into" if self._audio_path else "finishing"
                if os.strerror(errno.ENOSPC) in result.stderr:
                    raise _error(f"{no_space_message(target.parent)} while {what} {target}", errno.ENOSPC)
                raise VideoOutputError(f"{what} {target} failed (ffmpeg exit {result.returncode}): "
                                       f"{result.stderr.strip()[-2000:]}")
            self._place(tmp, ident, target, overwrite)
        finally:
            if os.path.lexists(tmp):
                tmp.unlink()

    @staticmethod
    def _place(tmp: Path, ident: tuple[int, int], target: Path, overwrite: bool) -> None:
        """Rename the checked temp file to ``target`` (a link at ``target`` is replaced, not followed)."""
        if not _same_regular_file(tmp, ident):
            raise VideoOutputError(f"the temporary file {tmp} was replaced while ffmpeg wrote it; refusing to use it")
        wfd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            st = os.fstat(wfd)
            if (st.st_dev, st.st_ino) != ident:
                raise VideoOutputError(f"the temporary file {tmp} was replaced while ffmpeg wrote it; refusing to use it")
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(wfd, 0o666 & ~umask)  # mkstemp's 0600 -> what a normally created file gets
        finally:
            os.close(wfd)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target, follow_symlinks=False)  # fails if target exists: never clobbers
            except FileExistsError as err:
                raise OutputExistsError(f"{target} appeared while the video was being written; it was kept "
                                        f"(not overwritten)") from err
            except OSError:  # no hard links on this filesystem (FAT, some network shares)
                if os.path.lexists(target):
                    raise OutputExistsError(f"{target} appeared while the video was being written; it was kept "
                                            f"(not overwritten)") from None
                os.replace(tmp, target)
        if not _same_regular_file(target, ident):
            raise VideoOutputError(f"{target} is not the regular file that was written")

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
            try:
                self._remux(self.partial_path, self.path, self.overwrite)
            except VideoOutputError as err:  # the partial (video only, playable) stays; say so
                raise _error(f"{err}; the video (without sound) stays in {self.partial_path}", err.errno,
                             type(err)) from err
            self.partial_path.unlink()
            self.final_path = self.path
            return self.path
        finally:
            self._remove_tmp_audio()

    def abort(self) -> Path | None:
        """Finalise what was written, with sound, under the partial name; returns it
        (None when nothing playable was written: then no file is left)."""
        if self._closed:
            return self.partial_path if self.partial_path.is_file() else None
        self._closed = True
        try:
            try:
                self._finish_ffmpeg()
            except VideoOutputError:
                pass  # the error being propagated (or the sink's, already raised) matters more
            if self.frames_written == 0 or (self._sink is not None and not self._sink.playable):
                if self._sink is not None and os.path.lexists(self.partial_path):
                    self.partial_path.unlink()  # only a file this writer created
                return None
            if not self.partial_path.is_file():
                return None
            if self._audio_path is not None:
                try:
                    self._remux(self.partial_path, self.partial_path, overwrite=True)
                except (OSError, subprocess.SubprocessError):
                    pass  # keep the silent (fragmented, playable) partial rather than mask the original error
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
