"""Streaming MP4 writer: H.264 frames + muxed sound, partial files on failure."""
from __future__ import annotations

import subprocess
import time

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from media_probe import probe_media
from liveavatar_pack.liveavatar.video import Mp4Writer, VideoOutputError, check_writable, partial_path_for

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
