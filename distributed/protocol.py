"""The job channel between the launcher (parent) and its torchrun workers.

One stream socket per rank (a unix socket in a fresh 0700 directory, or TCP: loopback, or
for a pool over several machines the address the head exposes deliberately), carrying length-prefixed messages. A message is a dict of plain data (str, int, float,
bool, None, lists, tuples, dicts) and tensors, serialised with ``torch.save`` and read
back with ``torch.load(weights_only=True)``: no pickle of arbitrary objects crosses the
channel in either direction.

Authentication comes first and costs the head almost nothing: a connection opens with a
fixed-size raw frame (``MAGIC`` + the random token the parent handed to its workers), which
the head compares before it decodes a single byte of a message; a wrong or slow frame closes
the connection (``HELLO_DEADLINE_S`` in total, see ``launcher``). Only then comes the
``hello`` message, itself bounded to ``HELLO_MAX`` bytes. Every later message is bounded by
what the protocol can carry at that moment (``Connection.limit``; the launcher derives it
from the job), and ``decode`` refuses compressed zip entries, so no message inflates: the
memory a peer can cost is the size of the frame it actually sent.

Message types (``msg["type"]``):
  parent -> rank: ``init`` (pool config), ``job``, ``audio`` (one block's features ``[1, L, D, frames]``
                  with its ``index`` and video frames ``[start, stop)``, sent to the DiT ranks a bounded number
                  of blocks ahead: a job never carries the whole track), ``cancel``, ``shutdown``
  rank -> parent: ``hello``, ``ready``, ``block`` (clean latents, or a decode rank's uint8 frames; also the progress),
                  ``done`` (per-rank stats; ``stopped_at`` when cancelled), ``error``
"""
from __future__ import annotations

import io
import os
import socket
import struct
import threading
import zipfile

import torch

HEADER = struct.Struct("!Q")
MAGIC = b"LIVEAVATAR-CH1\n"
TOKEN_BYTES = 32  # secrets.token_hex(16)
AUTH_FRAME = len(MAGIC) + TOKEN_BYTES  # the raw frame read (and compared) before anything is decoded
HELLO_MAX = 4096  # a hello is a few small fields; its torch.save zip is ~1.5 KiB
CONTROL_MAX = 1 << 20  # ready / done / error / init / cancel: plain data and tracebacks (4 KiB tails)
# Messages from the parent (a job carries injected noise for every clip when a test injects it; audio comes
# per block): the parent is the one peer a rank dialled itself, so this is a sanity cap, configurable.
FROM_PARENT_MAX = int(os.environ.get("LIVEAVATAR_CHANNEL_MAX_JOB_BYTES", str(64 << 30)))

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


class MessageRefused(ValueError):
    """A message over its bound, compressed, or not a message: the connection is dropped."""


def check_stored(payload: bytes) -> None:
    """Refuse a ``torch.save`` zip whose entries are compressed (or claim more than the payload holds).

    ``torch.save`` stores entries uncompressed, but its reader inflates deflated ones: a 262 KB
    payload inflated to 256 MiB (~1000x). Refusing compression keeps a message's memory at its size.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise MessageRefused(f"channel message is not a torch.save archive ({exc})") from None
    total = 0
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            raise MessageRefused(f"channel message entry {info.filename!r} is compressed "
                                 f"({info.compress_size} -> {info.file_size} bytes); only stored entries are read")
        total += info.file_size
    if total > len(payload):
        raise MessageRefused(f"channel message entries claim {total} bytes in a {len(payload)}-byte payload")


def decode(payload: bytes) -> dict:
    check_stored(payload)
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


def auth_frame(token: str) -> bytes:
    """The raw frame a rank sends first: ``MAGIC`` + its token (ASCII hex, ``TOKEN_BYTES`` long)."""
    raw = token.encode("ascii")
    if len(raw) != TOKEN_BYTES:
        raise ValueError(f"channel token must be {TOKEN_BYTES} ASCII characters, got {len(raw)}")
    return MAGIC + raw


def frame(message: dict) -> bytes:
    payload = encode(message)
    return HEADER.pack(len(payload)) + payload


class Connection:
    """One end of a channel connection; ``send`` is thread-safe, ``recv`` is for one reader.

    ``limit``: the largest message ``recv`` accepts (bytes), checked on the length prefix before
    any of the payload is read; the owner raises or lowers it as the protocol state changes.
    """

    def __init__(self, sock: socket.socket, limit: int = CONTROL_MAX):
        self.sock = sock
        self.limit = limit
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        self.send_raw(frame(message))

    def send_raw(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def recv(self) -> dict:
        (size,) = HEADER.unpack(_recv_exact(self.sock, HEADER.size))
        if size > self.limit:
            raise MessageRefused(f"channel message of {size} bytes refused (at most {self.limit} expected here)")
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


def connect(address: str, timeout: float = 30.0, remote: bool = False, first: bytes = b"") -> Connection:
    """Connect to ``unix:<path>`` or ``tcp:<host>:<port>``.

    TCP stays on loopback unless ``remote``: a rank on another machine, which read the head's
    address from torchrun's rendezvous store (the head exposed it deliberately). ``first`` (the
    prepared auth frame and hello) goes out right after connecting: the head gives a new connection
    ``HELLO_DEADLINE_S`` in total, so nothing slow (encoding) may sit between connect and send.
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
    if first:
        sock.sendall(first)
    sock.settimeout(None)
    keepalive(sock)
    return Connection(sock, limit=FROM_PARENT_MAX)
