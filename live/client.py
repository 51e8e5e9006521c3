"""``python -m liveavatar live-client``: stream an audio file at real-time pace, save what comes back.

The received bytes (init segment + media segments) are a fragmented MP4 with sound, written as is.
Per-block timing (the server's events plus this client's own latency: receive time of a block's
event minus the send time of the audio at its first frame) goes to ``--events`` as JSON lines.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ClientResult:
    path: Path
    frames: int
    blocks: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ttff_ms: float | None = None


def read_pcm(path: str | Path) -> tuple[np.ndarray, int]:
    """int16 samples [T, C] and the rate of a file soundfile reads (WAV, FLAC, OGG...)."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    except (RuntimeError, OSError) as err:  # soundfile raises LibsndfileError (a RuntimeError)
        raise ValueError(f"cannot read audio file {path}: {err}") from None
    if data.shape[1] > 2:
        data = data[:, :2]
    return data, int(rate)


async def stream_file(url: str, audio: str | Path, out: str | Path, chunk_ms: float = 40.0, speed: float = 1.0,
                      image: str | Path | None = None, events: str | Path | None = None,
                      tail_seconds: float = 0.0, timeout: float = 600.0) -> ClientResult:
    """Send ``audio`` at ``speed`` x real time, then ``end_utterance``; stop once the video covers the
    audio (+ ``tail_seconds``) and write everything received to ``out``."""
    import base64

    import aiohttp

    pcm, rate = read_pcm(audio)
    seconds = len(pcm) / rate
    out = Path(out)
    result = ClientResult(out, 0)
    media = bytearray()
    sent_log: list[tuple[float, float]] = []  # (audio seconds sent so far, wall time)
    start_msg = {"type": "start", "sample_rate": rate, "channels": pcm.shape[1], "format": "s16le"}
    if image is not None:
        start_msg["image"] = base64.b64encode(Path(image).read_bytes()).decode()
    want_frames = None
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, max_msg_size=64 << 20) as ws:
            await ws.send_str(json.dumps(start_msg))
            t0 = time.monotonic()

            async def sender() -> None:
                step = max(1, int(rate * chunk_ms / 1000))
                for i, a in enumerate(range(0, len(pcm), step)):
                    target = t0 + a / rate / speed
                    await asyncio.sleep(max(0.0, target - time.monotonic()))
                    chunk = pcm[a:a + step]
                    await ws.send_bytes(chunk.astype("<i2").tobytes())
                    sent_log.append(((a + len(chunk)) / rate, time.monotonic()))
                await ws.send_str(json.dumps({"type": "end_utterance"}))

            send_task = None
            deadline = t0 + timeout
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    media.extend(msg.data)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                event = json.loads(msg.data)
                kind = event.get("type")
                now = time.monotonic()
                if kind == "accepted":
                    want_frames = int(np.ceil((seconds + tail_seconds) * event["fps"]))
                    send_task = asyncio.ensure_future(sender())
                elif kind == "block":
                    if result.ttff_ms is None:
                        result.ttff_ms = 1000 * (now - t0)
                    sent = next((t for s, t in sent_log if s >= event["client_audio_s"]), None)
                    event["client_latency_ms"] = None if sent is None or event["idle"] else round(1000 * (now - sent), 1)
                    event["received_s"] = round(now - t0, 3)
                    result.blocks.append(event)
                    result.frames = event["first_frame"] + event["frames"]
                    if want_frames is not None and result.frames >= want_frames or now > deadline:
                        await ws.send_str(json.dumps({"type": "stop"}))
                        want_frames = None
                elif kind in ("error", "busy"):
                    result.errors.append(event["message"])
                    if kind == "busy":
                        break
                elif kind == "end":
                    result.frames = event["frames"]
                    if event.get("error"):
                        result.errors.append(event["error"])
                    break
            if send_task is not None:
                send_task.cancel()
    out.write_bytes(bytes(media))
    if events is not None:
        Path(events).write_text("".join(json.dumps(b) + "\n" for b in result.blocks))
    return result
