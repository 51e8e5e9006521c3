"""HTTP routes and the WebSocket handler (aiohttp).

``GET /`` the page, ``GET /reference.png`` the server's default reference, ``GET /api/info`` the
settings as JSON, ``GET /ws`` the WebSocket API (see :mod:`.protocol`). One connection holds at
most one session; a second connection that starts while the engine is generating gets ``busy``.
"""
from __future__ import annotations

import asyncio
import io
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from .engine import Engine
from .protocol import MAX_MESSAGE_BYTES, AudioFormat, PcmDecoder, ProtocolError, decode_image, parse_control
from .session import LiveSession, Pacing

STATIC = Path(__file__).resolve().parent / "static"
ENGINE = web.AppKey("engine", Engine)
CONNECTIONS = web.AppKey("connections", set)


class Connection:
    """One WebSocket: parses messages, owns at most one :class:`LiveSession`."""

    def __init__(self, engine: Engine, ws: web.WebSocketResponse, pacing: Pacing):
        self.engine, self.ws, self.pacing = engine, ws, pacing
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.session: LiveSession | None = None
        self.decoder: PcmDecoder | None = None
        self.sender = asyncio.ensure_future(self._send_loop())

    # -- outgoing ------------------------------------------------------------------------------------
    def post(self, item) -> None:
        """From any thread: queue a dict (JSON event) or bytes (media) for the client."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def _send_loop(self) -> None:
        while True:
            item = await self.queue.get()
            if self.ws.closed:
                continue  # keep draining: the session may still post until it has stopped
            try:
                if isinstance(item, (bytes, bytearray)):
                    await self.ws.send_bytes(bytes(item))
                else:
                    await self.ws.send_json(item)
            except (ConnectionError, RuntimeError):
                pass

    async def error(self, message: str) -> None:
        await self.ws.send_json({"type": "error", "message": message})

    # -- incoming ------------------------------------------------------------------------------------
    async def on_text(self, text: str) -> None:
        msg = parse_control(text)
        kind = msg["type"]
        if kind == "start":
            await self.start(msg)
        elif self.session is None or not self.session.thread.is_alive():
            raise ProtocolError(f'"{kind}" needs a running session: send a start message first')
        elif kind == "end_utterance":
            self.session.audio.push(self.decoder.flush())
            self.session.audio.end_utterance()
        elif kind == "image":
            pil = decode_image(msg.get("image"))
            self.session.new_reference(self.engine.pixels(pil, (self.session.height, self.session.width)))
        elif kind == "stop":
            self.session.stop()
        else:
            raise ProtocolError(f"unknown message type {kind!r} (start, end_utterance, image, stop)")

    def on_pcm(self, data: bytes) -> None:
        if self.session is None or not self.session.thread.is_alive():
            raise ProtocolError("PCM before a start message (send start with sample_rate, channels, format first)")
        self.session.audio.push(self.decoder.decode(data))

    async def start(self, msg: dict) -> None:
        if self.session is not None and self.session.thread.is_alive():
            raise ProtocolError("a session is already running on this connection; send stop first")
        fmt = AudioFormat.from_start(msg)
        image = decode_image(msg["image"]) if msg.get("image") is not None else None
        pixels = await self.loop.run_in_executor(None, self.engine.pixels, image)
        if not self.engine.try_acquire():
            await self.ws.send_json({"type": "busy", "message": "the avatar is generating for another session "
                                     "(one at a time per model); try again when it ends"})
            await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return
        try:
            self.decoder = PcmDecoder(fmt)
            self.session = LiveSession(self.engine, pixels, self.post, self.pacing, on_done=self.engine.release)
        except BaseException:
            self.engine.release()
            raise
        m = self.engine.models
        block_ms = 1000 * m.cfg.frames_per_block / m.cfg.fps
        await self.ws.send_json({
            "type": "accepted", "width": self.session.width, "height": self.session.height, "fps": m.cfg.fps,
            "block_ms": block_ms, "lookahead_ms": m.stream.lookahead_ms,
            "latency_floor_ms": block_ms + m.stream.lookahead_ms, "models": m.name,
        })
        self.engine.active = self.session
        self.session.start()
        self.engine.sessions_started += 1

    async def close(self) -> None:
        """The socket is gone (or done): stop the session within one block and free the engine."""
        if self.session is not None and self.session.thread.is_alive():
            self.session.cancel()
            await self.loop.run_in_executor(None, self.session.thread.join, 60.0)
        await asyncio.sleep(0)
        self.sender.cancel()


def make_app(engine: Engine, pacing: Pacing | None = None) -> web.Application:
    pacing = pacing or Pacing()
    app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
    app[ENGINE] = engine
    app[CONNECTIONS] = set()

    async def index(request: web.Request) -> web.Response:
        return web.FileResponse(STATIC / "index.html")

    async def reference(request: web.Request) -> web.Response:
        from ..liveavatar.image import to_pil

        buf = io.BytesIO()
        to_pil(engine.models.image).save(buf, "PNG")
        return web.Response(body=buf.getvalue(), content_type="image/png")

    async def info(request: web.Request) -> web.Response:
        m = engine.models
        block_ms = 1000 * m.cfg.frames_per_block / m.cfg.fps
        return web.json_response({"models": m.name, "size": m.size, "fps": m.cfg.fps, "block_ms": block_ms,
                                  "lookahead_ms": m.stream.lookahead_ms,
                                  "latency_floor_ms": block_ms + m.stream.lookahead_ms, "busy": engine.busy,
                                  "sessions_started": engine.sessions_started})

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=20.0)
        await ws.prepare(request)
        conn = Connection(engine, ws, pacing)
        app[CONNECTIONS].add(conn)
        try:
            async for msg in ws:
                try:
                    if msg.type == WSMsgType.TEXT:
                        await conn.on_text(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        conn.on_pcm(msg.data)
                    elif msg.type == WSMsgType.ERROR:
                        break
                except (ProtocolError, ValueError) as err:
                    await conn.error(str(err))
        finally:
            await conn.close()
            app[CONNECTIONS].discard(conn)
        return ws

    async def on_shutdown(app: web.Application) -> None:
        for conn in list(app[CONNECTIONS]):
            await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")

    async def start_workers(app: web.Application) -> None:  # before listening: the first session finds them warm
        await asyncio.get_running_loop().run_in_executor(None, engine.start)

    async def release_workers(app: web.Application) -> None:  # after the sockets closed: sessions are stopping
        await asyncio.get_running_loop().run_in_executor(None, engine.close)

    app.router.add_get("/", index)
    app.router.add_get("/reference.png", reference)
    app.router.add_get("/api/info", info)
    app.router.add_get("/ws", websocket)
    app.on_shutdown.append(on_shutdown)
    app.on_startup.append(start_workers)
    app.on_cleanup.append(release_workers)
    return app


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8765, pacing: Pacing | None = None,
          print_fn=print) -> None:
    """Run until Ctrl+C."""
    app = make_app(engine, pacing)
    print_fn(f"live: {engine.models.name} on http://{host}:{port}/ (WebSocket ws://{host}:{port}/ws); Ctrl+C stops")
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)
