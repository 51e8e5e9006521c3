"""Streaming MP4 writer: H.264 frames + muxed sound, partial files on failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from media_probe import probe_media
from liveavatar_pack.liveavatar.video import (Mp4Writer, OutputExistsError, VideoOutputError, check_writable,
                                               partial_path_for)

FPS = 25
SR = 16000


def _frames(n, h=48, w=64, start=0):
    """Distinct frames: a moving bright bar over a gradient."""
    out = np.zeros((n, h, w, 3), np.uint8)
    out[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, None]
    for i in range(n):
        out[i, :, ((start + i) * 2) % w, 1] = 255
    return out


def _tone(seconds, freq=440.0):
    t = np.arange(int(SR * seconds)) / SR
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_writes_h264_with_sound(tmp_path):
    out = tmp_path / "out.mp4"
    wave = torch.from_numpy(_tone(2.0))[None, None]  # ComfyUI AUDIO layout [1, C, T], longer than the video
    with Mp4Writer(out, fps=FPS, audio=wave, sample_rate=SR) as writer:
        assert writer.partial_path == tmp_path / "out.partial.mp4"
        writer.write(_frames(12))
        deadline = time.monotonic() + 10  # ffmpeg opens its output once it has frames
        while not writer.partial_path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.partial_path.exists() and not out.exists()
        writer.write(torch.from_numpy(_frames(18, start=12)))
    assert out.is_file() and not partial_path_for(out).exists()
    nframes, secs = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert nframes == 30
    streams, audio_secs = probe_media(out)
    assert ("Video", "h264") in streams and ("Audio", "aac") in streams
    video_secs = 30 / FPS
    assert audio_secs is not None and audio_secs <= video_secs + 1e-6
    assert audio_secs > video_secs - 0.1  # cut at the video's end, not dropped


def test_short_audio_keeps_all_frames(tmp_path):
    out = tmp_path / "short.mp4"
    with Mp4Writer(out, fps=FPS, audio=_tone(0.4), sample_rate=SR) as writer:
        writer.write(_frames(30))
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 30
    _, audio_secs = probe_media(out)
    assert audio_secs <= 30 / FPS + 1e-6


def test_audio_file_input_and_no_audio(tmp_path):
    from liveavatar_pack.liveavatar.video import write_wav

    wav = tmp_path / "a.wav"
    write_wav(wav, np.stack([_tone(1.0), _tone(1.0, 660)]), SR)
    with Mp4Writer(tmp_path / "f.mp4", fps=FPS, audio=wav) as writer:
        writer.write(_frames(10))
    streams, audio_secs = probe_media(tmp_path / "f.mp4")
    assert ("Audio", "aac") in streams and audio_secs <= 10 / FPS + 1e-6
    with Mp4Writer(tmp_path / "silent.mp4", fps=FPS) as writer:
        writer.write(_frames(5))
    streams, audio_secs = probe_media(tmp_path / "silent.mp4")
    assert audio_secs is None and ("Video", "h264") in streams


def test_exception_leaves_playable_partial(tmp_path):
    out = tmp_path / "clip.mp4"
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(out, fps=FPS, audio=_tone(3.0), sample_rate=SR) as writer:
            writer.write(_frames(12))
            writer.write(_frames(8, start=12))
            raise RuntimeError("boom")
    partial = tmp_path / "clip.partial.mp4"
    assert not out.exists() and partial.is_file()
    assert imageio_ffmpeg.count_frames_and_secs(str(partial))[0] == 20
    streams, audio_secs = probe_media(partial)
    assert ("Audio", "aac") in streams and audio_secs <= 20 / FPS + 1e-6


def test_keyboard_interrupt_leaves_partial(tmp_path):
    out = tmp_path / "ki.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(out, fps=FPS) as writer:
            writer.write(_frames(7))
            raise KeyboardInterrupt
    assert not out.exists()
    assert imageio_ffmpeg.count_frames_and_secs(str(partial_path_for(out)))[0] == 7


def test_failure_before_any_frame_leaves_nothing(tmp_path):
    out = tmp_path / "none.mp4"
    with pytest.raises(ValueError):
        with Mp4Writer(out, fps=FPS, audio=_tone(1.0), sample_rate=SR):
            raise ValueError("early")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_directory_fails_early(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(VideoOutputError, match="file.txt"):
        check_writable(blocker / "out.mp4")
    with pytest.raises(VideoOutputError):
        Mp4Writer(blocker / "sub" / "out.mp4", fps=FPS)
    with pytest.raises(VideoOutputError, match="directory"):
        Mp4Writer(tmp_path, fps=FPS)
    assert check_writable(tmp_path / "new" / "dir" / "o.mp4").parent.is_dir()


def test_odd_sizes_and_bad_frames(tmp_path):
    out = tmp_path / "odd.mp4"
    with Mp4Writer(out, fps=FPS) as writer:
        writer.write(_frames(3, h=33, w=47))
        with pytest.raises(ValueError, match="size changed"):
            writer.write(_frames(1, h=32, w=48))
        with pytest.raises(TypeError):
            writer.write(_frames(1, h=33, w=47).astype(np.float32))
    info = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(out)], capture_output=True, text=True).stderr
    assert "48x34" in info
    with pytest.raises(ValueError, match="even"):
        with Mp4Writer(tmp_path / "strict.mp4", fps=FPS, pad_to_even=False) as writer:
            writer.write(_frames(1, h=33, w=48))


def _decode_check(path):
    """(frames ffmpeg decodes, ffmpeg's complaints) for a file, by a full decode."""
    result = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0",
                             "-f", "framemd5", "-"], capture_output=True, text=True)
    frames = sum(1 for line in result.stdout.splitlines() if line and not line.startswith("#"))
    return frames, result.stderr.strip()


def test_partial_plays_while_the_video_is_being_written(tmp_path):
    """A copy of the partial taken mid-run (as after a kill) decodes: at least its first second, cleanly."""
    out = tmp_path / "live.mp4"
    snapshot = tmp_path / "snapshot.mp4"
    with Mp4Writer(out, fps=FPS) as writer:
        writer.write(_frames(4 * FPS))  # x264 holds back ~2 s of lookahead; a fragment is at most 1 s
        frames, complaints = 0, "not tried"
        deadline = time.monotonic() + 30  # bounded wait for ffmpeg to flush its first fragment
        while frames < FPS and time.monotonic() < deadline:
            time.sleep(0.05)
            if writer.partial_path.exists():
                shutil.copyfile(writer.partial_path, snapshot)
                frames, complaints = _decode_check(snapshot)
        assert frames >= FPS and complaints == "", complaints
        assert not out.exists()
    assert _decode_check(out) == (4 * FPS, "")


def test_planted_links_are_never_followed(tmp_path):
    """Links at every name the writer could use point at a victim file: none is written through,
    and the result is a regular file."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    folder = tmp_path / "videos"
    folder.mkdir()
    out = folder / "out.mp4"
    for name in ("out.partial.mp4", "out.muxing.mp4", "out.partial.muxing.mp4"):
        (folder / name).symlink_to(victim)
    with Mp4Writer(out, fps=FPS, audio=_tone(1.0), sample_rate=SR) as writer:
        writer.write(_frames(10))
    assert victim.read_bytes() == b"precious"
    assert out.is_file() and not out.is_symlink()
    assert _decode_check(out) == (10, "")
    assert probe_media(out)[1] is not None  # with its sound
    # a link at the final name itself: refused by default, replaced (never followed) with overwrite
    out.unlink()
    out.symlink_to(victim)
    with pytest.raises(OutputExistsError, match="already exists"):
        Mp4Writer(out, fps=FPS)
    with Mp4Writer(out, fps=FPS, overwrite=True) as writer:
        writer.write(_frames(4))
    assert victim.read_bytes() == b"precious" and out.is_file() and not out.is_symlink()
    # a failed run: the partial (with sound) is made the same way
    (folder / "bad.partial.mp4").symlink_to(victim)
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(folder / "bad.mp4", fps=FPS, audio=_tone(1.0), sample_rate=SR) as writer:
            writer.write(_frames(6))
            raise RuntimeError("boom")
    partial = folder / "bad.partial.mp4"
    assert victim.read_bytes() == b"precious" and partial.is_file() and not partial.is_symlink()
    assert _decode_check(partial) == (6, "")
    # nothing else left behind: no temp or muxing files
    leftovers = {p.name for p in folder.iterdir()} - {"out.mp4", "bad.partial.mp4"}
    assert all((folder / n).is_symlink() for n in leftovers), leftovers


def test_existing_output_is_never_overwritten_by_default(tmp_path):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"an earlier video")
    with pytest.raises(OutputExistsError, match="keep.mp4 already exists"):
        Mp4Writer(out, fps=FPS)
    # one that appears while the video is being made is kept too; the new video stays in the partial
    late = tmp_path / "late.mp4"
    with pytest.raises(OutputExistsError, match="not overwritten"):
        with Mp4Writer(late, fps=FPS) as writer:
            writer.write(_frames(5))
            late.write_bytes(b"made meanwhile")
    assert late.read_bytes() == b"made meanwhile"
    assert _decode_check(partial_path_for(late)) == (5, "")
    with Mp4Writer(out, fps=FPS, overwrite=True) as writer:
        writer.write(_frames(3))
    assert _decode_check(out) == (3, "")
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file's mode, not mkstemp's 0600


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only; CI runs as root), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", f"liveavatar-test-{uuid.uuid4().hex[:8]}",
                           str(mnt)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill(folder, leave):
    """Fill ``folder``'s filesystem until ``leave`` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    (folder / "filler.bin").write_bytes(b"\0" * (free - leave))
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def test_disk_full_keeps_the_partial_playable_and_says_so(small_disk):
    free = _fill(small_disk, 48 * 1024)
    assert 32 * 1024 <= free <= 64 * 1024
    out = small_disk / "full.mp4"
    rng = np.random.default_rng(0)
    with pytest.raises(VideoOutputError) as caught:
        with Mp4Writer(out, fps=FPS, audio=_tone(60.0), sample_rate=SR) as writer:
            for i in range(3000):  # ~3 KiB a frame: the disk is full long before
                frames = _frames(1, h=64, w=96, start=i)
                frames[:, 16:32, 16:48] = rng.integers(0, 256, (1, 16, 32, 3), dtype=np.uint8)
                writer.write(frames)
    message = str(caught.value)
    assert caught.value.errno == 28
    assert f"no space left on {small_disk}" in message and "full.partial.mp4" in message, message
    assert "\n" not in message and "muxing" not in message
    partial = partial_path_for(out)
    assert partial.is_file() and not out.exists()
    frames, complaints = _decode_check(partial)
    assert frames >= FPS and complaints == "", complaints  # at least the first second, cleanly
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin", "full.partial.mp4"]


def test_disk_full_while_muxing_says_so_and_keeps_the_video(small_disk):
    out = small_disk / "late.mp4"
    with pytest.raises(VideoOutputError) as caught:
        with Mp4Writer(out, fps=FPS, audio=_tone(2.0), sample_rate=SR) as writer:
            writer.write(_frames(30))
            _fill(small_disk, 4096)  # the disk fills up before the video is finished
    message = str(caught.value)
    assert caught.value.errno == 28 and f"no space left on {small_disk}" in message, message
    assert f"the video (without sound) stays in {partial_path_for(out)}" in message
    assert _decode_check(partial_path_for(out)) == (30, "") and not out.exists()
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler.bin", "late.partial.mp4"]  # no temp file left


def test_a_killed_writers_soundtrack_is_swept_by_the_next_writer(tmp_path, monkeypatch):
    """A SIGKILLed process cannot remove its temporary WAV; the next writer removes it (its pid is gone),
    and leaves a living process's WAV alone."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["sleep", "0"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        orphan = tmp_path / f"liveavatar-audio-{dead.pid}-x1.wav"
        living = tmp_path / f"liveavatar-audio-{alive.pid}-x2.wav"
        orphan.write_bytes(b"RIFF")
        living.write_bytes(b"RIFF")
        with Mp4Writer(tmp_path / "next.mp4", fps=FPS, audio=_tone(0.4), sample_rate=SR) as writer:
            writer.write(_frames(10))
        assert not orphan.exists() and living.exists()
        assert not list(tmp_path.glob(f"liveavatar-audio-{os.getpid()}-*"))  # its own WAV is gone after the run
    finally:
        alive.kill()
        alive.wait()
