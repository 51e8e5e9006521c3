"""Live mode on a warm tpp worker pool: same frames as one process, pool reused, cancel, nothing leaked."""
from __future__ import annotations

import time

import pytest

from live_server import ServerThread, until
from liveavatar_pack.live.engine import Engine, demo_models
from liveavatar_pack.live.server import make_app
from liveavatar_pack.live.session import Pacing

SPEECH_SECONDS = 3.0


def _decode_rgb(path, width: int, height: int):
    import subprocess

    import imageio_ffmpeg
    import numpy as np

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def _stream(port: int, wav, out):
    import asyncio

    from liveavatar_pack.live.client import stream_file

    return asyncio.run(stream_file(f"ws://127.0.0.1:{port}/ws", wav, out, speed=2.0))


def _wait_idle(engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.busy:
        assert time.monotonic() < deadline, "the session did not end and free the engine"
        time.sleep(0.05)


def _alive(pids) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.distributed
def test_live_tpp_pool_matches_one_process_is_reused_and_cancels(tmp_path):
    import asyncio
    import json

    import aiohttp
    import numpy as np
    import soundfile as sf

    from liveavatar_pack.distributed.launcher import PoolOptions
    from liveavatar_pack.liveavatar.demo_assets import synth_speech

    wav = tmp_path / "speech.wav"
    sf.write(wav, synth_speech(SPEECH_SECONDS, 16000, seed=1), 16000, subtype="PCM_16")
    pacing = Pacing(grace=30.0)  # no silence padding while a client is merely late (loaded CI machine)

    local = Engine(demo_models("64*64"))
    with ServerThread(make_app(local, pacing)) as srv:
        one = _stream(srv.port, wav, tmp_path / "one.mp4")
    assert not one.errors

    models = demo_models("64*64")
    engine = Engine(models, PoolOptions(model=models.spec, workers=2, mode="tpp", threads=1))
    with ServerThread(make_app(engine, pacing)) as srv:
        assert engine.pool.running  # started with the server, before the first session
        agent = engine.pool.agent_pid
        pids = [agent, *engine.pool.worker_pids.values()]
        got = _stream(srv.port, wav, tmp_path / "tpp.mp4")
        assert not got.errors
        h, w = engine.pixels().shape[1:]
        n = int(SPEECH_SECONDS * 25)
        a = _decode_rgb(tmp_path / "one.mp4", w, h)
        b = _decode_rgb(tmp_path / "tpp.mp4", w, h)
        assert len(a) >= n and len(b) >= n
        diff = np.abs(a[:n].astype(np.int16) - b[:n].astype(np.int16))
        assert diff.max() <= 1, f"tpp live differs from one-process live: max |diff| {diff.max()}, mean {diff.mean()}"
        _wait_idle(engine)

        # a second session on the same warm pool
        again = _stream(srv.port, wav, tmp_path / "again.mp4")
        assert not again.errors and again.frames >= n
        assert engine.pool.agent_pid == agent and engine.pool.running
        _wait_idle(engine)

        # a new reference mid-session (no audio, end of utterance: idle at once, no 30 s grace): the job stops,
        # the next starts on the same pool
        async def new_reference():
            import base64
            import io

            from PIL import Image

            png = io.BytesIO()
            Image.new("RGB", (80, 64), (200, 40, 40)).save(png, "PNG")
            async with aiohttp.ClientSession() as http:
                async with http.ws_connect(f"ws://127.0.0.1:{srv.port}/ws") as ws:
                    await ws.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                    await ws.send_str(json.dumps({"type": "end_utterance"}))
                    msgs = await until(ws, lambda m: m["type"] == "block" and m["index"] >= 1)
                    await ws.send_str(json.dumps({"type": "image", "image": base64.b64encode(png.getvalue()).decode()}))
                    msgs += await until(ws, lambda m: m["type"] == "block" and m["first_frame"] >= 45)
                    await ws.send_str('{"type": "stop"}')
                    return msgs + await until(ws, lambda m: m["type"] == "end")

        msgs = asyncio.run(new_reference())
        assert not [m for m in msgs if m["type"] == "error"]
        firsts = [m["first_frame"] for m in msgs if m["type"] == "block"]
        assert firsts == sorted(firsts) and firsts[-1] >= 45
        assert engine.pool.agent_pid == agent
        _wait_idle(engine)

        # a client that goes away mid-session: its job is cancelled within about a block, the pool stays
        async def disconnect():
            pcm = (synth_speech(20.0, 16000) * 32767).astype("<i2").tobytes()
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(f"ws://127.0.0.1:{srv.port}/ws")
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                for i in range(0, 16000 * 2 * 4, 3200):  # 4 s now, faster than real time
                    await ws.send_bytes(pcm[i:i + 3200])
                deadline = time.monotonic() + 60
                while engine.active is None or engine.active.frames_out == 0:
                    assert time.monotonic() < deadline, "the session never produced a frame"
                    await asyncio.sleep(0.02)
                session = engine.active
                at_close = session.frames_out
                await ws.close()
                return session, at_close

        session, at_close = asyncio.run(disconnect())
        _wait_idle(engine)
        assert session.cancelled.is_set() and not session.thread.is_alive()
        assert session.frames_out - at_close <= 2 * models.cfg.frames_per_block
        assert engine.pool.running and engine.pool.agent_pid == agent and not engine.pool._busy
        third = _stream(srv.port, wav, tmp_path / "third.mp4")  # and the pool still serves the next one
        assert not third.errors and third.frames >= n
        assert engine.pool.agent_pid == agent
    # server shutdown released the pool: no worker process left
    assert not engine.pool.running
    deadline = time.monotonic() + 30
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(pids) == []


@pytest.mark.distributed
def test_pool_streams_each_block_while_the_next_blocks_audio_is_not_there():
    """A polled feed (``try_frames``: None until the audio exists) never holds a finished block back: here block
    g's audio only exists once the consumer has received block g-1, which deadlocks a pool that waits for the
    feed (or sends the feed ahead before receiving); the latents are the one-process sampler's, bitwise."""
    import torch

    from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool
    from liveavatar_pack.distributed.sampler import DistributedSampler
    from liveavatar_pack.liveavatar.sampler import StreamingSampler, TensorAudio

    from liveavatar_pack.liveavatar.sampler import SinkInputs

    models = demo_models("64*64")
    text, cfg = models.text, models.cfg
    g = torch.Generator().manual_seed(0)
    c = models.model.cfg.in_dim  # a 64x64 reference's latents, as the VAE would give them
    sink = SinkInputs(torch.randn(c, 1, 8, 8, generator=g), torch.randn(c, 19, 8, 8, generator=g))
    track = torch.randn(1, 25, 16, 2 * cfg.frames_per_clip, generator=g)  # [1, layers, dim, frames] like the features

    class Gated:
        received = 0
        asked_early = 0

        def try_frames(self, start: int, stop: int):
            if start // cfg.frames_per_block > self.received:
                self.asked_early += 1
                return None
            return track[..., start:stop]

        def frames(self, start: int, stop: int):
            raise AssertionError("a polled source is never waited on")

    gated = Gated()
    with WorkerPool(PoolOptions(model=models.spec, workers=2, mode="tpp", threads=1)) as pool:
        sampler = DistributedSampler(pool, cfg, text, gated, sink, models.seed)
        sampler.poll_s = 0.01
        got = []
        for block in sampler.blocks(2):
            got.append(block.latents)
            gated.received += 1
    assert len(got) == 2 * cfg.blocks_per_clip and gated.asked_early > 0
    want = [b.latents for b in StreamingSampler(models.model, cfg, models.model.embed_text(text), TensorAudio(track),
                                                sink, models.seed).blocks(2)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("flags, message", [
    (["--workers", "2", "--mode", "tpp", "--decode-rank"], "error: live decodes in the server process"),
    (["--workers", "2", "--mode", "tpp", "--sp", "3"], "error: tpp x sp needs workers divisible by sp"),
])
def test_cli_live_worker_flags_are_checked_before_anything_starts(flags, message):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "liveavatar", "live", "--demo", *flags],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
