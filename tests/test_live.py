"""Live mode: the server, its page, the WebSocket API and its client, pacing and bad input (tiny models, CPU)."""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from live_server import ServerThread, free_port, until
from liveavatar_pack.live.engine import Engine, demo_models
from liveavatar_pack.live.server import make_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine():
    return Engine(demo_models("64*64"))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(make_app(engine)) as srv:
        yield srv


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode("utf-8", "replace")


def test_page_has_a_video_element_and_the_api_reports_settings(server):
    status, kind, body = _get(server.url + "/")
    assert status == 200 and kind.startswith("text/html")
    assert "<video" in body and "/ws" in body and "MediaSource" in body
    import json

    info = json.loads(_get(server.url + "/api/info")[2])
    assert info["latency_floor_ms"] == info["block_ms"] + info["lookahead_ms"] == 480 + 320
    assert info["busy"] is False
    status, kind, _ = _get(server.url + "/reference.png")
    assert kind == "image/png"


def test_cli_live_demo_serves_on_loopback(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar", "live", "--demo", "--size", "64*64", "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                body = _get(f"http://127.0.0.1:{port}/")[2]
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "live --demo did not start listening"
                time.sleep(0.5)
        assert "<video" in body
        import psutil

        listening = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_live_models_without_image_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "liveavatar", "live", "--models", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: --models needs --image (the default reference image)"


# -- the API client against generate ------------------------------------------------------------------

SPEECH_SECONDS = 4.0


def _decode_rgb(path: Path, width: int, height: int):
    import imageio_ffmpeg
    import numpy as np

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v",
                          "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def _offline_frames(engine, wave, audio_source, frames: int):
    """The video ``generate``/``demo`` makes of this audio (same models, seed, image), first ``frames`` frames."""
    import numpy as np
    import torch

    from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream

    m = engine.models
    pixels = engine.pixels()
    cond = Conditioning(m.text, audio_source, engine.encode(pixels), *pixels.shape[1:])
    clips = -(-(frames + m.cfg.dropped_first_frames) // m.cfg.frames_per_clip)
    out = []
    with torch.inference_mode():
        for chunk in VideoStream(m.model, m.vae, cond, m.cfg, seed=m.seed, num_clips=clips):
            out.append(chunk.frames.numpy())
    return np.concatenate(out)[:frames]


def _through_the_live_encoder(frames, path: Path):
    """Offline frames through the live stream's H.264 encoder (same settings, deterministic), decoded back."""
    import numpy as np

    from liveavatar_pack.live.muxer import LiveMuxer

    data = bytearray()
    n, h, w, _ = frames.shape
    mux = LiveMuxer(w, h, 25, lambda seg: data.extend(seg.data))
    for a in range(0, n, 12):
        mux.write(np.ascontiguousarray(frames[a:a + 12]), np.zeros(640 * len(frames[a:a + 12]), np.float32))
    mux.close()
    path.write_bytes(bytes(data))
    return _decode_rgb(path, w, h)


@pytest.fixture(scope="module")
def exact_server(engine):
    """A server that never pads silence while a real-time client is merely late (a loaded CI machine)."""
    from liveavatar_pack.live.session import Pacing

    with ServerThread(make_app(engine, Pacing(grace=30.0))) as srv:
        yield srv


@pytest.mark.slow
def test_client_stream_equals_generate_up_to_the_streaming_features(engine, exact_server, tmp_path):
    import asyncio
    import json

    import numpy as np
    import soundfile as sf
    import torch

    from liveavatar_pack.live.client import stream_file
    from liveavatar_pack.liveavatar.audio import AudioFeatures, Waveform
    from liveavatar_pack.liveavatar.demo_assets import synth_speech
    from liveavatar_pack.liveavatar.sampler import TensorAudio
    from media_probe import probe_media

    wav = tmp_path / "speech.wav"
    sf.write(wav, synth_speech(SPEECH_SECONDS, 16000, seed=1), 16000, subtype="PCM_16")
    wave, _ = sf.read(wav, dtype="float32")  # what the client sends (s16le) and the server decodes
    out, events = tmp_path / "got.mp4", tmp_path / "events.jsonl"
    result = asyncio.run(stream_file(f"ws://127.0.0.1:{exact_server.port}/ws", wav, out, events=events))
    assert not result.errors
    streams, audio_secs = probe_media(out)
    assert ("Video", "h264") in streams and ("Audio", "aac") in streams
    assert audio_secs >= SPEECH_SECONDS
    h, w = engine.pixels().shape[1:]
    got = _decode_rgb(out, w, h)
    n = int(SPEECH_SECONDS * 25)
    assert len(got) >= n and len(got) == result.frames
    got = got[:n].astype(np.float32)

    # the same video offline: with the streaming features of this audio, and with generate's features
    feats = engine.features()
    feats.push(wave)
    stop = n + 3 + 12
    feats.pad_silence(feats.samples_needed(stop) - feats.length)
    streamed = torch.cat([feats.frames(a, a + 12) for a in range(0, stop - stop % 12, 12)], -1)
    with_stream_features = _offline_frames(engine, wave, TensorAudio(streamed), n).astype(np.float32)
    generate = _offline_frames(engine, wave, AudioFeatures(engine.models.audio_encoder, Waveform(wave, 16000, "speech")),
                               n).astype(np.float32)
    codec = np.abs(got - with_stream_features).mean()  # what H.264 changes
    # through the same encoder, the same frames give the same bytes: compare like with like
    with_stream_features = _through_the_live_encoder(with_stream_features.astype(np.uint8), tmp_path / "s.mp4")
    generate = _through_the_live_encoder(generate.astype(np.uint8), tmp_path / "g.mp4").astype(np.float32)
    same = np.abs(got - with_stream_features).mean()
    live_vs_generate = np.abs(got - generate).mean()
    features_effect = np.abs(with_stream_features - generate).mean()
    blocks = [json.loads(line) for line in events.read_text().splitlines()]
    lat = [b["client_latency_ms"] for b in blocks if b["client_latency_ms"] is not None]
    print(f"\n{SPEECH_SECONDS:g} s at real-time pace: {len(blocks)} blocks, first frame after {result.ttff_ms:.0f} ms, "
          f"client block latency ms min/median/max {min(lat):.0f}/{sorted(lat)[len(lat) // 2]:.0f}/{max(lat):.0f}; "
          f"mean |frame diff| (0-255, all through the live H.264 encoder): live vs offline with the streaming features "
          f"{same:.3f}, live vs generate {live_vs_generate:.2f} (= the streaming features' effect "
          f"{features_effect:.2f}); H.264 itself {codec:.2f}")
    assert same < 0.05  # the live stream is the streaming-feature video ...
    assert abs(live_vs_generate - features_effect) <= 0.05  # ... so it differs from generate by the features only
    assert len(lat) == len([b for b in blocks if not b["idle"]]) and all(x > 0 for x in lat)


# -- protocol, pacing, bad input ----------------------------------------------------------------------

def _ws(server) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def _pcm(seconds: float, rate: int, channels: int = 1) -> bytes:
    import numpy as np

    from liveavatar_pack.liveavatar.demo_assets import synth_speech

    x = synth_speech(seconds, rate)
    x = np.repeat(x[:, None], channels, axis=1)
    return (x * 32767).astype("<i2").tobytes()


def _run(coro):
    import asyncio

    return asyncio.run(coro)


def _wait_idle(engine, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.busy:
        assert time.monotonic() < deadline, "the session did not end and free the engine"
        time.sleep(0.1)


def _no_ffmpeg_children() -> list[str]:
    import psutil

    return [p.name() for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]


def test_garbage_and_oversized_messages_get_errors_and_the_server_stays_up(server, engine):
    import aiohttp

    from liveavatar_pack.live.protocol import MAX_MESSAGE_BYTES

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(server)) as ws:
                await ws.send_str("{not json")
                err = (await until(ws, lambda m: True))[-1]
                assert err["type"] == "error" and "expected a JSON control message" in err["message"]
                await ws.send_bytes(b"\x00\x01\x02")
                err = (await until(ws, lambda m: True))[-1]
                assert err == {"type": "error", "message": "PCM before a start message (send start with "
                                                           "sample_rate, channels, format first)"}
                await ws.send_str('{"type": "dance"}')
                assert "needs a running session" in (await until(ws, lambda m: True))[-1]["message"]
                await ws.send_str('{"type": "start", "sample_rate": 1000}')
                assert "sample_rate must be an integer in 8000..192000" in (await until(ws, lambda m: True))[-1]["message"]
            async with http.ws_connect(_ws(server), max_msg_size=0) as ws:
                try:
                    await ws.send_bytes(b"\x00" * (MAX_MESSAGE_BYTES + 1))
                except ConnectionError:
                    pass  # the server hung up while the rest of the message was still being written
                closed = (await until(ws, lambda m: False))[-1]
                assert closed["type"] == "closed" and closed["code"] in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
                assert ws.closed

    _run(go())
    assert "<video" in _get(server.url + "/")[2]
    assert not engine.busy


def test_non_image_upload_is_refused_without_starting(server, engine):
    import base64
    import json

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(server)) as ws:
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 16000,
                                              "image": base64.b64encode(b"%PDF-1.4 not an image").decode()}))
                return (await until(ws, lambda m: True))[-1]

    err = _run(go())
    assert err["type"] == "error"
    assert err["message"] == "image: the upload (21 bytes, starting 25 50 44 46 2d 31 2e 34) is not an image PIL can read"
    assert not engine.busy


@pytest.mark.parametrize("rate,channels", [(8000, 1), (96000, 2)])
def test_audio_at_8_and_96_khz_is_resampled_and_streams(server, engine, rate, channels):
    import json

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(server)) as ws:
                await ws.send_str(json.dumps({"type": "start", "sample_rate": rate, "channels": channels}))
                await until(ws, lambda m: m["type"] == "accepted")
                await ws.send_bytes(_pcm(1.0, rate, channels))  # 1 s at once: queued, not dropped
                await ws.send_str('{"type": "end_utterance"}')
                msgs = await until(ws, lambda m: m["type"] == "block" and m["first_frame"] >= 25)
                await ws.send_str('{"type": "stop"}')
                msgs += await until(ws, lambda m: m["type"] == "end")
                return msgs

    msgs = _run(go())
    assert not [m for m in msgs if m["type"] == "error"]
    blocks = [m for m in msgs if m["type"] == "block"]
    assert not blocks[0]["idle"] and blocks[0]["client_audio_s"] == 0.0
    # the second sent at once was queued whole: real audio up to 1 s, silence padding only after it
    assert [b["idle"] for b in blocks] == [b["audio_s"] >= 1.0 for b in blocks] and blocks[-1]["idle"]
    assert msgs[-1]["type"] == "end" and msgs[-1]["error"] is None
    _wait_idle(engine)


def test_disconnect_mid_block_frees_the_engine_and_leaks_nothing(server, engine, tmp_path):
    """A client killed (like a closed tab) while its session generates: the session stops within a block."""
    import signal
    import threading

    import soundfile as sf

    from liveavatar_pack.liveavatar.demo_assets import synth_speech

    wav = tmp_path / "speech.wav"
    sf.write(wav, synth_speech(30.0, 16000), 16000)
    proc = subprocess.Popen([sys.executable, "-m", "liveavatar", "live-client", "--url", _ws(server), "--audio",
                             str(wav), "--out", str(tmp_path / "got.mp4")], cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while engine.active is None or engine.active.frames_out == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "the client's session never produced a frame"
            time.sleep(0.05)
        session = engine.active
        at_kill = session.frames_out
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_idle(engine)
    assert session.cancelled.is_set() and not session.thread.is_alive()
    assert session.frames_out - at_kill <= 2 * engine.models.cfg.frames_per_block  # the block under way, at most one more
    assert _no_ffmpeg_children() == []
    assert [t.name for t in threading.enumerate() if t.name.startswith(("live-session", "mux-"))] == []


def test_second_session_gets_busy_while_one_generates(server, engine):
    import json

    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(server)) as first, http.ws_connect(_ws(server)) as second:
                await first.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                await until(first, lambda m: m["type"] == "accepted")
                await second.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                answer = await until(second, lambda m: m["type"] in ("busy", "accepted"))
                closed = await until(second, lambda m: False)
                await first.send_str('{"type": "stop"}')
                await until(first, lambda m: m["type"] == "end")
                return answer[-1], closed[-1]

    answer, closed = _run(go())
    assert answer["type"] == "busy" and "one at a time" in answer["message"]
    assert closed == {"type": "closed", "code": 1013}
    _wait_idle(engine)


def test_idle_without_audio_and_a_new_reference_mid_session(server, engine):
    import base64
    import io
    import json

    import aiohttp
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (80, 64), (200, 40, 40)).save(png, "PNG")

    async def go():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(server)) as ws:
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                msgs = await until(ws, lambda m: m["type"] == "block" and m["index"] >= 1)
                await ws.send_str(json.dumps({"type": "image", "image": base64.b64encode(png.getvalue()).decode()}))
                msgs += await until(ws, lambda m: m["type"] == "block" and m["first_frame"] >= 45)
                await ws.send_str('{"type": "stop"}')
                return msgs + await until(ws, lambda m: m["type"] == "end")

    msgs = _run(go())
    blocks = [m for m in msgs if m["type"] == "block"]
    assert not [m for m in msgs if m["type"] == "error"]
    assert all(b["idle"] for b in blocks)  # silence conditioning, no audio was sent
    assert [b["first_frame"] for b in blocks] == sorted(b["first_frame"] for b in blocks)
    _wait_idle(engine)


def test_generation_behind_real_time_is_reported(engine):
    """A DiT made slower than real time (a sleep per call): the events say how far behind, growing."""
    import json

    import aiohttp

    model = engine.models.model
    original = model.forward_block

    def slow(*args, **kwargs):
        time.sleep(0.25)  # 4 calls per 480 ms block: 1 s per block, twice slower than real time
        return original(*args, **kwargs)

    async def go(srv):
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(_ws(srv)) as ws:
                await ws.send_str(json.dumps({"type": "start", "sample_rate": 16000}))
                await until(ws, lambda m: m["type"] == "accepted")
                await ws.send_bytes(_pcm(4.0, 16000))
                msgs = await until(ws, lambda m: m["type"] == "block" and m["index"] >= 4)
                await ws.send_str('{"type": "stop"}')
                return msgs + await until(ws, lambda m: m["type"] == "end")

    model.forward_block = slow
    try:
        with ServerThread(make_app(engine)) as srv:
            msgs = _run(go(srv))
    finally:
        del model.forward_block
    blocks = [m for m in msgs if m["type"] == "block"]
    assert blocks[-1]["behind_ms"] > 0 and blocks[-1]["late_ms"] > blocks[1]["late_ms"]
    _wait_idle(engine)


def test_live_client_errors_are_one_line(tmp_path):
    port = free_port()  # nothing listens there
    r = subprocess.run([sys.executable, "-m", "liveavatar", "live-client", "--url", f"ws://127.0.0.1:{port}", "--audio",
                        str(tmp_path / "none.wav"), "--out", str(tmp_path / "x.mp4")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: cannot read audio file {tmp_path / 'none.wav'}")
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "a.wav", np.zeros(1600, "float32"), 16000)
    r = subprocess.run([sys.executable, "-m", "liveavatar", "live-client", "--url", f"ws://127.0.0.1:{port}", "--audio",
                        str(tmp_path / "a.wav"), "--out", str(tmp_path / "x.mp4")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: cannot reach the live server at ws://127.0.0.1:{port}/ws")
