"""Live mode in a real browser: headless Chromium, its fake microphone playing a speech file.

Drives Chromium through the DevTools protocol over its WebSocket (aiohttp, no extra dependency):
opens the page, presses "Speak", and reads the page back - the <video> plays (currentTime advances,
the picture changes, sound is decoded) and the page's own latency readout shows a value.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import pytest

from live_server import ServerThread, free_port
from liveavatar_pack.live.engine import Engine, demo_models
from liveavatar_pack.live.server import make_app

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="no chromium / chrome on PATH"), pytest.mark.slow]

PROBE = """(() => {
  const v = document.getElementById('video');
  let sum = null;
  if (v.readyState >= 2 && v.videoWidth) {
    const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
    const g = c.getContext('2d'); g.drawImage(v, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data; sum = 0;
    for (let i = 0; i < d.length; i += 7) sum = (sum * 31 + d[i]) % 1000000007;
  }
  return JSON.stringify({t: v.currentTime, paused: v.paused, ready: v.readyState, sum,
    audio: v.webkitAudioDecodedByteCount || 0, frames: v.getVideoPlaybackQuality().totalVideoFrames,
    latency: document.getElementById('latency').textContent, fps: document.getElementById('fps').textContent,
    live: window.live});
})()"""


class Cdp:
    def __init__(self, ws):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


def test_page_plays_the_avatar_from_the_fake_microphone(tmp_path):
    import aiohttp
    import soundfile as sf

    from liveavatar_pack.liveavatar.demo_assets import synth_speech

    wav = tmp_path / "mic.wav"
    sf.write(wav, synth_speech(8.0, 16000), 16000, subtype="PCM_16")
    engine = Engine(demo_models("64*64"))
    port = free_port()

    async def drive(url: str) -> list[dict]:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                        pages = [t for t in await r.json() if t["type"] == "page"]
                    if pages:
                        break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "chromium's DevTools endpoint never came up"
                await asyncio.sleep(0.3)
            async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = Cdp(ws)
                await cdp.call("Page.enable")
                await cdp.call("Page.navigate", url=url)
                while await cdp.eval("typeof window.startMicrophone") != "function":
                    await asyncio.sleep(0.2)
                await cdp.eval("window.startMicrophone()")
                samples = []
                deadline = time.monotonic() + 240
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    samples.append(json.loads(await cdp.eval(PROBE)))
                    s = samples[-1]
                    if s["t"] > 3.0 and s["live"]["blocks"] >= 4 and len({x["sum"] for x in samples} - {None}) >= 3:
                        break
                await cdp.eval("document.getElementById('stop').click()")
                await cdp.call("Page.captureScreenshot")  # the page renders (and keeps rendering) while playing
                shot = await cdp.call("Page.captureScreenshot", format="png")
                import base64

                (tmp_path / "live_page.png").write_bytes(base64.b64decode(shot["data"]))
                return samples

    with ServerThread(make_app(engine)) as srv:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio",
                                 f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
                                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                                 f"--use-file-for-fake-audio-capture={wav}", "--autoplay-policy=no-user-gesture-required",
                                 "--window-size=1100,700", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            samples = asyncio.run(drive(srv.url + "/"))
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    last = samples[-1]
    print(f"\nbrowser: currentTime {last['t']:.2f} s, {last['frames']} frames decoded, audio bytes {last['audio']}, "
          f"readout latency {last['latency']!r}, fps {last['fps']!r}, blocks {last['live']['blocks']}")
    assert not last["live"]["errors"], last["live"]["errors"]
    assert last["t"] > 3.0 and not last["paused"]  # the video element plays and its clock advances
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert len({s["sum"] for s in samples} - {None}) >= 3  # the picture changes
    assert last["audio"] > 0  # sound is decoded
    assert last["latency"].endswith(" ms") and last["live"]["latencyMs"] > 0  # the page's own readout
    assert engine.sessions_started == 1
