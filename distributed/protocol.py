"""The job channel between the launcher (parent) and its torchrun workers.

One stream socket per rank (a unix socket in a fresh 0700 directory, or TCP: loopback, or
for a pool over several machines the address the head exposes deliberately), carrying length-prefixed messages. A message is a dict of plain data (str, int, float,
bool, None, lists, tuples, dicts) and tensors, serialised with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: no pickle of arbitrary objects crosses the
channel in either direction. Every connection starts with a ``hello`` carrying a random
token the parent handed to its workers, so only they can attach.

Message types (``msg["type"]``):
  parent -> rank: ``init`` (pool config), ``job``, ``cancel``, ``shutdown``
  rank -> parent: ``hello``, ``ready``, ``block`` (clean latents, or a decode rank's uint8 frames; also the progress),
                  ``done`` (per-rank stats; ``stopped_at`` when cancelled), ``error``
"""
from __future__ import annotations

import io
import socket
import struct
import threading

import torch

HEADER = struct.Struct("!Q")
MAX_MESSAGE = 1 << 40

ENV_CHANNEL = "LIVEAVATAR_CHANNEL"  # "unix:<path>" or "tcp:<host>:<port>"
ENV_TOKEN = "LIVEAVATAR_CHANNEL_TOKEN"
ENV_PARENT_PID = "LIVEAVATAR_PARENT_PID"
ENV_MODEL_DIRS = "LIVEAVATAR_MODEL_DIRS"  # an agent's --models folders (os.pathsep-separated)
# "1" on another machine: its ranks may run the head's ``callable`` model specs (code named by the channel)
ENV_ALLOW_CALLABLE = "LIVEAVATAR_ALLOW_CALLABLE_MODELS"
ADVISED_ENV = {"NCCL_P2P_DISABLE": ("0", "1")}  # the environment an ``init`` may set on a rank, and its values


class ChannelClosed(ConnectionError):
    """The other end closed the connection (or died)."""


def encode(message: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(message, buf)
    return buf.getvalue()


def decode(payload: bytes) -> dict:
    message = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
    if not isinstance(message, dict) or "type" not in message:
        raise ValueError("malformed channel message")
    return message


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 22))
        if not chunk:
            raise ChannelClosed("channel closed by peer")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Connection:
    """One end of a channel connection; ``send`` is thread-safe, ``recv`` is for one reader."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        payload = encode(message)
        with self._lock:
            self.sock.sendall(HEADER.pack(len(payload)) + payload)

    def recv(self) -> dict:
        (size,) = HEADER.unpack(_recv_exact(self.sock, HEADER.size))
        if size > MAX_MESSAGE:
            raise ValueError(f"channel message of {size} bytes refused")
        return decode(_recv_exact(self.sock, size))

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def keepalive(sock: socket.socket, idle_s: int = 30, interval_s: int = 10, count: int = 3) -> None:
    """TCP keepalive, so a rank notices a head machine that vanished (and vice versa) within minutes."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle_s), ("TCP_KEEPINTVL", interval_s), ("TCP_KEEPCNT", count)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def connect(address: str, timeout: float = 30.0, remote: bool = False) -> Connection:
    """Connect to ``unix:<path>`` or ``tcp:<host>:<port>``.

    TCP stays on loopback unless ``remote``: a rank on another machine, which read the head's
    address from torchrun's rendezvous store (the head exposed it deliberately).
    """
    kind, _, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = rest
    elif kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1") and not remote:
            raise ValueError(f"the job channel stays on loopback, got {host}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = (host, int(port))
    else:
        raise ValueError(f"unknown channel address {address!r}")
    sock.settimeout(timeout)
    sock.connect(target)
    sock.settimeout(None)
    keepalive(sock)
    return Connection(sock)
