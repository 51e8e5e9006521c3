"""``python -m liveavatar demo`` makes a real MP4 with frames and sound from the whole pipeline."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import imageio_ffmpeg
import pytest

from media_probe import probe_media

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_writes_video_with_sound(tmp_path):
    out = tmp_path / "demo.mp4"
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(out), "--size", "128*128", "--seconds", "1.5",
           "--num-clips", "1"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and not (tmp_path / "demo.partial.mp4").exists()
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 45  # one clip of 48 frames minus the first block's 3
    streams, audio_secs = probe_media(out)
    assert ("Video", "h264") in streams and ("Audio", "aac") in streams
    assert 1.5 <= audio_secs <= frames / 25 + 1e-3  # the 1.5 s voice, then silence to the video's end
    assert "45/45 frames" in result.stderr


def test_demo_refuses_bad_frames_per_clip(tmp_path):
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(tmp_path / "x.mp4"), "--frames-per-clip", "50"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "multiple of 12" in result.stderr and "Traceback" not in result.stderr


def test_demo_refuses_an_existing_out_before_building_anything(tmp_path):
    out = tmp_path / "demo.mp4"
    out.write_bytes(b"an earlier video")
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr == f"error: {out} already exists (not overwritten); pass --overwrite to replace it\n"
    assert out.read_bytes() == b"an earlier video" and "demo:" not in result.stdout


@pytest.mark.slow
def test_demo_overwrite_replaces_the_file(tmp_path):
    out = tmp_path / "demo.mp4"
    out.write_bytes(b"an earlier video")
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(out), "--size", "64*64", "--seconds", "1.0",
           "--num-clips", "1", "--steps", "1", "--overwrite"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert imageio_ffmpeg.count_frames_and_secs(str(out))[0] == 45 and not out.is_symlink()


def _decoded(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    next(reader)  # metadata
    return b"".join(reader)


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_on_two_workers_gives_the_same_video(tmp_path):
    outs = []
    for name, extra in (("local.mp4", []), ("workers.mp4", ["--workers", "2", "--mode", "tpp"]),
                        ("decode.mp4", ["--workers", "2", "--mode", "tpp", "--decode-rank"])):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(out), "--size", "128*128", "--seconds", "1.0",
               "--num-clips", "1", *extra]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        outs.append(_decoded(out))
    assert outs[0] == outs[1] == outs[2]


def test_demo_refuses_an_output_name_without_a_video_extension(tmp_path):
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(tmp_path / "clip.txt")]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "found extension '.txt'" in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_keeps_a_partial_with_sound_and_names_it(tmp_path, sig):
    """Ctrl+C and SIGTERM both finalise the partial video with its sound and print its path on a line of its own."""
    out = tmp_path / "long.mp4"
    cmd = [sys.executable, "-m", "liveavatar", "demo", "--out", str(out), "--size", "128*128", "--seconds", "3",
           "--num-clips", "2"]
    # unbuffered: communicate() reads the pipe itself and would miss bytes a buffered reader had taken
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    seen = b""
    try:
        while b"blocks," not in seen:  # the first block is in the file: interrupt now
            byte = proc.stderr.read(1)
            assert byte, f"demo ended before its first block: {seen.decode()[-2000:]}"
            seen += byte
        proc.send_signal(sig)
        _, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    stderr = (seen + rest).decode()
    partial = tmp_path / "long.partial.mp4"
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    lines = stderr.split("\n")
    message = [line for line in lines if line.startswith(f"interrupted by {name} after ")]
    assert message and message[0].endswith(f"the partial video (with sound) is {partial}"), stderr[-2000:]
    assert partial.is_file() and not out.exists()
    streams, _ = probe_media(partial)
    assert ("Video", "h264") in streams and ("Audio", "aac") in streams
