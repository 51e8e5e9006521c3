"""The head's side of a new channel connection: authenticate many at once, cheaply, on one thread.

A pool start must not wait on a client that connects and says nothing, trickles bytes, or
sends a huge length: every accepted socket is non-blocking and gets ``HELLO_DEADLINE_S`` in
total (not per ``recv``) to deliver the raw auth frame (``protocol.MAGIC`` + token, compared
byte by byte as it arrives, before anything is decoded) and then a hello of at most
``protocol.HELLO_MAX`` bytes. A rank sends both in one ``sendall`` right after connecting
(``protocol.connect(first=...)``), so a second is ample even on a loaded machine. Connections
are served together by one selector, so a stalled one delays nobody; beyond ``MAX_PENDING``
unauthenticated connections the oldest is dropped (a real rank finishes in milliseconds).
"""
from __future__ import annotations

import secrets
import selectors
import socket
import time
from dataclasses import dataclass, field

from . import protocol

HELLO_DEADLINE_S = 1.0
MAX_PENDING = 256


@dataclass
class _Pending:
    sock: socket.socket
    deadline: float
    stage: str = "auth"  # auth -> header -> hello
    need: int = protocol.AUTH_FRAME
    buf: bytearray = field(default_factory=bytearray)
    waiting: bool = False  # the last recv would have blocked


class Gate:
    """Accepts on ``listener`` and yields ``(socket, hello)`` for every connection that authenticates."""

    def __init__(self, listener: socket.socket, token: str, deadline_s: float = HELLO_DEADLINE_S,
                 max_pending: int = MAX_PENDING):
        self.listener = listener
        self.expected = protocol.auth_frame(token)
        self.deadline_s, self.max_pending = deadline_s, max_pending
        self.dropped = 0  # unauthenticated, slow or malformed connections closed
        self._pending: dict[int, _Pending] = {}
        self._selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ, None)

    def poll(self, timeout: float) -> list[tuple[socket.socket, dict]]:
        """Serve connections for up to ``timeout`` seconds; returns as soon as one authenticated."""
        end = time.monotonic() + max(0.0, timeout)
        done: list[tuple[socket.socket, dict]] = []
        while not done:
            now = time.monotonic()
            wait = end - now
            if self._pending:
                wait = min(wait, min(p.deadline for p in self._pending.values()) - now)
            for key, _ in self._selector.select(max(0.0, wait)):
                if key.data is None:
                    self._accept()
                else:
                    result = self._read(key.data)
                    if result is not None:
                        done.append(result)
            # expired only after what already arrived was read: a slow head does not drop a prompt rank
            self._expire(time.monotonic())
            if time.monotonic() >= end:
                break
        return done

    def close(self) -> None:
        for pending in list(self._pending.values()):
            self._drop(pending)
        self._selector.close()

    # ------------------------------------------------------------------ internals
    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of descriptors: make room by dropping the oldest stranger
                if not self._pending:
                    return
                self._drop(min(self._pending.values(), key=lambda p: p.deadline))
                continue
            sock.setblocking(False)
            if len(self._pending) >= self.max_pending:
                self._drop(min(self._pending.values(), key=lambda p: p.deadline))
            pending = _Pending(sock, time.monotonic() + self.deadline_s)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _read(self, p: _Pending) -> tuple[socket.socket, dict] | None:
        """Read what has arrived, stage after stage, until the socket would block or the hello is complete."""
        while p.sock.fileno() in self._pending:
            result = self._step(p)
            if result is not None or p.waiting:
                p.waiting = False
                return result
        return None

    def _step(self, p: _Pending) -> tuple[socket.socket, dict] | None:
        try:
            chunk = p.sock.recv(p.need - len(p.buf))
        except (BlockingIOError, InterruptedError):
            p.waiting = True
            return None
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(p)
            return None
        p.buf += chunk
        if p.stage == "auth":
            # compared as it arrives: a wrong first byte ends the connection at once
            if not secrets.compare_digest(bytes(p.buf), self.expected[: len(p.buf)]):
                self._drop(p)
                return None
        if len(p.buf) < p.need:
            return None
        if p.stage == "auth":
            p.stage, p.need, p.buf = "header", protocol.HEADER.size, bytearray()
            return None
        if p.stage == "header":
            (size,) = protocol.HEADER.unpack(bytes(p.buf))
            if not 0 < size <= protocol.HELLO_MAX:
                self._drop(p)
                return None
            p.stage, p.need, p.buf = "hello", size, bytearray()
            return None
        try:
            hello = protocol.decode(bytes(p.buf))
            if hello.get("type") != "hello":
                raise ValueError("not a hello")
            int(hello["rank"]), int(hello["pid"])
        except Exception:  # noqa: BLE001 - anything malformed is one more dropped connection
            self._drop(p)
            return None
        self._forget(p)
        p.sock.setblocking(True)
        return p.sock, hello

    def _expire(self, now: float) -> None:
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._drop(pending)

    def _forget(self, p: _Pending) -> None:
        self._pending.pop(p.sock.fileno(), None)
        try:
            self._selector.unregister(p.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, p: _Pending) -> None:
        self._forget(p)
        self.dropped += 1
        try:
            p.sock.close()
        except OSError:
            pass
