"""Thumbnails of the example workflows, taken from the real ComfyUI frontend (headless Chromium).

ComfyUI's template browser shows ``example_workflows/<name>.jpg`` beside ``<name>.json``. This
loads each workflow into a running ComfyUI (with this pack in ``custom_nodes``) through the
frontend's own ``app.loadGraphData``, fits the view, screenshots the page over the Chrome DevTools
protocol and writes a JPEG. Optionally runs a workflow first (``--run NAME``) so node outputs
(e.g. the VRAM Plan's verdict) show in the picture.

    python docs/thumbnails.py --server http://127.0.0.1:8188 --chromium chromium [--run liveavatar_24gb_low_vram]

Needs ``aiohttp`` (a ComfyUI dependency) and Pillow; run it with ComfyUI's Python.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


# the nodes' bounding box in page pixels (graph -> canvas: (p + offset) * scale), with a margin
BOUNDS = """(() => {
  const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect(), m = 24;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const px = (x) => (x + ds.offset[0]) * ds.scale + rect.left, py = (y) => (y + ds.offset[1]) * ds.scale + rect.top;
  return [Math.max(0, px(x0) - m), Math.max(0, py(y0) - m), Math.min(innerWidth, px(x1) + m),
          Math.min(innerHeight, py(y1) + m)].map(Math.round);
})()"""
# a clean, full-detail picture: no minimap, no canvas statistics, no low-detail rendering when zoomed out
# (the server stores settings per user: the previous values are put back afterwards)
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}


class Page:
    """One Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def call(self, method: str, **params):
        mid = next(self.ids)
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=300)
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression: str):
        res = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await self.js(expression):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(expression)

    async def screenshot(self) -> Image.Image:
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@contextlib.asynccontextmanager
async def open_page(server: str, chromium: str, width: int = 1600, height: int = 1000):
    """A headless Chromium tab with ComfyUI's frontend loaded from ``server`` (closed on exit)."""
    with socket.socket() as s:  # a free DevTools port: two tools (or a tool and a test) may run at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([chromium, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            async with aiohttp.ClientSession() as http:
                targets = []
                for _ in range(100):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                            targets = [t for t in await r.json() if t["type"] == "page"]
                        if targets:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.3)
                if not targets:
                    raise RuntimeError(f"{chromium} opened no DevTools page on port {port}")
                async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.call("Page.enable")
                    await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                                    deviceScaleFactor=1, mobile=False)
                    await page.call("Page.navigate", url=server)
                    await page.wait_for("window.app && window.app.graph && window.app.canvas && true")
                    await asyncio.sleep(3)
                    await page.js("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click())")
                    yield page
        finally:
            proc.terminate()
            proc.wait(30)


async def shoot(server: str, chromium: str, names: list[str], run: set[str], out: Path, width: int, height: int,
                thumb_width: int, raw: Path | None) -> None:
    async with open_page(server, chromium, width, height) as page:
        setting = "app.extensionManager.setting"
        before = {k: await page.js(f"{setting}.get({json.dumps(k)})") for k in SETTINGS}
        for key, value in SETTINGS.items():
            await page.js(f"{setting}.set({json.dumps(key)}, {json.dumps(value)}).then(() => true)")
        try:
            await shoot_all(page, names, run, out, raw, thumb_width)
        finally:
            for key, value in before.items():
                await page.js(f"{setting}.set({json.dumps(key)}, {json.dumps(value)}).then(() => true)")


async def shoot_all(page: Page, names: list[str], run: set[str], out: Path, raw: Path | None, thumb_width: int) -> None:
    for name in names:
        wf = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
        await page.js(f"app.loadGraphData({json.dumps(wf)}).then(() => true)")
        await asyncio.sleep(2)
        if name in run:
            await page.js("app.queuePrompt(0).then(() => true)")
            await asyncio.sleep(2)
            await page.wait_for("fetch('/queue').then(r => r.json()).then(q => "
                                "q.queue_running.length + q.queue_pending.length === 0)", 900)
            await asyncio.sleep(2)
        await page.js("app.canvas.ds && app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        await asyncio.sleep(1.5)
        image = (await page.screenshot()).crop(await page.js(BOUNDS))
        if raw is not None:
            raw.mkdir(parents=True, exist_ok=True)
            image.save(raw / f"{name}.png")
        thumb = image.resize((thumb_width, round(thumb_width * image.height / image.width)), Image.LANCZOS)
        out.mkdir(parents=True, exist_ok=True)
        target = out / f"{name}.jpg"
        thumb.save(target, "JPEG", quality=85, optimize=True)
        print(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--names", nargs="*", help="workflows (default: every example)")
    ap.add_argument("--run", nargs="*", default=[], help="workflows to queue before the screenshot")
    ap.add_argument("--out", type=Path, default=ROOT / "example_workflows")
    ap.add_argument("--raw", type=Path, help="also keep the full-size PNG screenshots here")
    ap.add_argument("--size", default="2400x1500", help="browser window WxH")
    ap.add_argument("--thumb-width", type=int, default=960)
    args = ap.parse_args()
    names = args.names or sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    width, height = (int(v) for v in args.size.split("x"))
    asyncio.run(shoot(args.server, args.chromium, names, set(args.run), args.out, width, height, args.thumb_width,
                      args.raw))


if __name__ == "__main__":
    main()
