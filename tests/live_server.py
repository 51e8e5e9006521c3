"""A live server on a free loopback port, in a background thread (for the live-mode tests)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading

import aiohttp
from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app: web.Application):
        self.app, self.port = app, free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def until(ws, want, timeout: float = 300.0) -> list[dict]:
    """Text messages up to (and including) the first for which ``want(msg)``; binary frames skipped;
    a close ends the list with {"type": "closed", "code": ...}."""
    seen = []
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type == aiohttp.WSMsgType.BINARY:
            continue
        if msg.type != aiohttp.WSMsgType.TEXT:
            return seen + [{"type": "closed", "code": ws.close_code}]
        seen.append(json.loads(msg.data))
        if want(seen[-1]):
            return seen
