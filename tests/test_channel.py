"""The job channel against hostile local clients and faults (issue 11): loopback only, time-bounded.

Timeouts here are hang guards only; no test asserts how long something took (the latency of a
kill -9 report is measured by bench/bench_fault.py).
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import torch

from liveavatar_pack.distributed import protocol
from liveavatar_pack.distributed.launcher import PoolOptions, WorkerError, WorkerPool
from liveavatar_pack.distributed.sampler import DistributedSampler
from liveavatar_pack.liveavatar.config import SamplerConfig

from test_distributed import inputs

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK_IPS = ("127.0.0.1", "::1")


def _dial(address: str) -> socket.socket:
    kind, _, rest = address.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(rest)
    else:
        host, _, port = rest.rpartition(":")
        sock = socket.create_connection((host, int(port)))
    return sock


def _listener_address(pool: WorkerPool, guard_s: float = 60) -> str:
    """The channel address while ``pool`` is starting (read from its listening socket)."""
    end = time.monotonic() + guard_s
    while time.monotonic() < end:
        listener = pool._listener
        if listener is not None:
            try:
                name = listener.getsockname()
            except OSError:
                name = None
            if isinstance(name, str) and name:
                return f"unix:{name}"
            if isinstance(name, tuple):
                return f"tcp:{name[0]}:{name[1]}"
        time.sleep(0.01)
    raise AssertionError("the pool never opened its channel listener")


def _start_in_background(pool: WorkerPool) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def start():
        try:
            pool.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    return thread, outcome


def _cut_off(sock: socket.socket, data_iter, guard_s: float) -> tuple[bool, int]:
    """Send chunks until the head closes the connection: (cut off by the head, bytes sent)."""
    sent, end = 0, time.monotonic() + guard_s
    sock.settimeout(guard_s)
    try:
        for chunk in data_iter:
            if time.monotonic() > end:
                return False, sent
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as exc:
        return not isinstance(exc, socket.timeout), sent
    return False, sent


def _eof_within(sock: socket.socket, guard_s: float) -> bool:
    sock.settimeout(guard_s)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, OSError):
        return False


def _deflated(obj) -> bytes:
    """``torch.save`` output with every zip entry deflate-compressed (a ~1000x bomb for zeros)."""
    raw = io.BytesIO()
    torch.save(obj, raw)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


# ----------------------------------------------------------------------------- memory before authentication
@pytest.mark.distributed
def test_a_compressed_message_is_refused_not_inflated():
    bomb = _deflated({"type": "hello", "rank": 0, "pid": 1, "pad": torch.zeros(8 << 20, dtype=torch.uint8)})
    assert len(bomb) < 64 << 10  # 8 MiB of zeros in a few KiB
    with pytest.raises(ValueError, match="compressed"):  # protocol.MessageRefused, before torch.load inflates it
        protocol.decode(bomb)
    plain = protocol.decode(protocol.encode({"type": "hello", "x": torch.arange(4)}))  # torch.save's own output
    assert torch.equal(plain["x"], torch.arange(4))


@pytest.mark.distributed
@pytest.mark.parametrize("channel", ["unix", "tcp"])
def test_a_huge_length_prefix_before_the_token_is_dropped_unread(channel):
    """2^40-byte length prefix then a stream of bytes: the head must close before buffering them (it had
    read 400 MiB). The client sends up to 256 MiB; the head must cut it off before that."""
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2, channel=channel, start_timeout_s=120))
    thread, outcome = _start_in_background(pool)
    try:
        sock = _dial(_listener_address(pool))
        chunk = b"\0" * (1 << 20)
        cut, sent = _cut_off(sock, [struct.pack("!Q", 1 << 40)] + [chunk] * 256, guard_s=120)
        sock.close()
        thread.join(timeout=180)
        assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
        assert cut, f"the head read {sent} bytes of an unauthenticated connection without closing it"
        assert sent < 64 << 20
        assert pool.running and len(pool.worker_pids) == 2
    finally:
        pool.close()


@pytest.mark.distributed
def test_wrong_token_or_oversized_hello_is_dropped_before_decoding():
    """The gate compares the raw token frame first, then takes a hello of at most HELLO_MAX bytes."""
    from liveavatar_pack.distributed.handshake import Gate

    token = "ab" * 16
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    gate = Gate(listener, token)
    address = listener.getsockname()
    bomb = _deflated({"type": "hello", "rank": 0, "pid": 1, "pad": torch.zeros(8 << 20, dtype=torch.uint8)})
    hostile = [
        protocol.MAGIC + b"cd" * 16 + struct.pack("!Q", len(bomb)) + bomb,  # wrong token, then a bomb
        protocol.auth_frame(token) + struct.pack("!Q", protocol.HELLO_MAX + 1) + b"\0" * 64,  # oversized hello
        protocol.auth_frame(token) + struct.pack("!Q", len(bomb)) + bomb,  # right token, compressed hello
    ]
    clients = []
    for data in hostile:
        c = socket.create_connection(address)
        c.sendall(data[: 1 << 16])
        clients.append(c)
    good = socket.create_connection(address)
    good.sendall(protocol.auth_frame(token) + protocol.frame({"type": "hello", "rank": 3, "pid": 42}))
    got = []
    end = time.monotonic() + 30
    while not got and time.monotonic() < end:
        got = gate.poll(0.2)
    assert [h["rank"] for _, h in got] == [3]
    assert all(_eof_within(c, 30) for c in clients)
    gate.close()
    listener.close()
    for s in [good, *clients, *(s for s, _ in got)]:
        s.close()


@pytest.mark.distributed
def test_after_authentication_a_message_is_bounded_by_what_the_job_can_carry():
    """A rank's reply may be at most ~2x the job's largest block (plus stats): a larger length prefix is
    refused before any of it is read (the old bound was 2^40 bytes)."""
    from liveavatar_pack.distributed.launcher import reply_bound

    text, audio, sink = inputs(2)
    job = DistributedSampler(PoolOptions(), SamplerConfig(), text, audio, sink, seed=0).job(2)
    bound = reply_bound(job)
    block = {"type": "block", "job": 1, "clip": 1, "block": 3, "latents": torch.randn(16, 3, *sink.ref_latent.shape[-2:])}
    assert len(protocol.encode(block)) < bound < 16 << 20  # a real block fits; a tiny job's bound stays small
    a, b = socket.socketpair()
    try:
        a.settimeout(30)  # hang guard: reading the claimed payload would block here
        conn = protocol.Connection(a, limit=bound)
        b.sendall(protocol.frame(block))
        assert torch.equal(conn.recv()["latents"], block["latents"])
        b.sendall(struct.pack("!Q", bound + 1) + b"\0" * 16)
        with pytest.raises(ValueError, match="refused"):  # protocol.MessageRefused, on the length prefix alone
            conn.recv()
    finally:
        a.close()
        b.close()


# ----------------------------------------------------------------------------- stalling the start
@pytest.mark.distributed
def test_idle_and_trickling_clients_do_not_stall_the_start():
    """11 idle TCP connections, a half-sent hello and a client trickling one byte every 0.2 s: the start
    completes, and the head closes every one of them (it had waited 30 s per recv, for ever on a trickle)."""
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2, channel="tcp", start_timeout_s=60))
    thread, outcome = _start_in_background(pool)
    stop = threading.Event()
    trickle: dict = {}
    try:
        address = _listener_address(pool)
        idle = [_dial(address) for _ in range(11)]
        half = _dial(address)
        half.sendall(struct.pack("!Q", 200)[:5])  # the start of a frame, never finished

        def trickler():
            sock = _dial(address)
            data = struct.pack("!Q", 100) + b"\0" * 10_000

            def drip():
                for i in range(len(data)):
                    if stop.is_set():
                        return
                    yield data[i : i + 1]
                    time.sleep(0.2)

            trickle["cut"], trickle["sent"] = _cut_off(sock, drip(), guard_s=90)
            sock.close()

        dripper = threading.Thread(target=trickler, daemon=True)
        dripper.start()
        thread.join(timeout=180)
        assert not thread.is_alive(), "the start did not end"
        assert "error" not in outcome, f"the start failed: {outcome.get('error')}"
        dripper.join(timeout=120)
        assert trickle.get("cut"), f"the trickling client was never dropped ({trickle})"
        assert all(_eof_within(s, 30) for s in [*idle, half]), "an idle connection was kept open"
        for s in [*idle, half]:
            s.close()
        assert pool.running and len(pool.worker_pids) == 2
    finally:
        stop.set()
        pool.close()


# ----------------------------------------------------------------------------- listening sockets
@pytest.mark.distributed
@pytest.mark.parametrize("channel", ["unix", "tcp"])
def test_a_one_machine_pool_listens_on_loopback_only(channel):
    """torchrun's rendezvous store listened on *:<port>; gloo's sockets on the host name's address."""
    with WorkerPool(PoolOptions(model="tiny:1", workers=2, channel=channel)) as pool:
        pids = [pool.agent_pid, *pool.worker_pids.values()]
        listening = []
        for pid in pids:
            for conn in psutil.Process(pid).net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((pid, conn.laddr.ip, conn.laddr.port))
        assert listening, "the pool should at least host torchrun's store"
        outside = [entry for entry in listening if entry[1] not in LOOPBACK_IPS]
        assert not outside, f"listening beyond loopback: {outside}"
        assert pool._listener is None  # the channel stops listening once every rank is in


# ----------------------------------------------------------------------------- a rank killed mid-job
@pytest.mark.distributed
def test_a_killed_rank_is_reported_ahead_of_queued_blocks_naming_it_and_its_signal():
    """kill -9 of rank 1 while blocks wait unconsumed: the next read raises, naming rank 1 and SIGKILL
    (the death queued behind every received block, and rank 0, whose collective failed, was named)."""
    with WorkerPool(PoolOptions(model="tiny:1", workers=2, collective_timeout_s=60)) as pool:
        text, audio, sink = inputs(6)
        blocks = DistributedSampler(pool, SamplerConfig(), text, audio, sink, seed=0).blocks(6)
        next(blocks)
        end = time.monotonic() + 120
        while pool._events.qsize() < 4 and time.monotonic() < end:
            time.sleep(0.01)
        queued = pool._events.qsize()
        assert queued >= 4, "the workers did not get ahead of the consumer"
        victim = psutil.Process(pool.worker_pids[1])
        victim.send_signal(signal.SIGKILL)
        try:
            victim.wait(timeout=30)
        except psutil.TimeoutExpired:
            pass
        time.sleep(0.5)  # the parent's reader sees the channel close
        consumed = 0
        with pytest.raises(WorkerError) as err:
            for _ in blocks:
                consumed += 1
        assert consumed < queued, f"the failure came after all {queued} queued blocks ({consumed} consumed)"
        assert err.value.rank == 1, str(err.value)
        assert "SIGKILL" in str(err.value).splitlines()[0], str(err.value)
        assert not pool.running


# ----------------------------------------------------------------------------- what a dead head leaves
HEAD_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    spec = importlib.util.spec_from_file_location("_b", {bootstrap!r})
    b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); b.load_pack({root!r})
    from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2)).start()
    print(json.dumps({{"dir": pool._dir, "pids": [pool.agent_pid, *pool.worker_pids.values()]}}), flush=True)
    if sys.argv[1] == "stay":
        time.sleep(300)
    pool.close()
    """
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.distributed
def test_a_killed_heads_pool_folder_is_swept_and_torchrun_leaves_no_folder(tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="la-", dir="/tmp"))  # short: the channel socket lives under it
    try:
        _killed_head_then_a_new_pool(tmp_path, temp)
        left = sorted(p.name for p in temp.iterdir())
        assert not left, f"left in the temp folder: {left}"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _killed_head_then_a_new_pool(tmp_path: Path, temp: Path) -> None:
    script = tmp_path / "head.py"
    script.write_text(HEAD_SCRIPT.format(bootstrap=str(ROOT / "liveavatar" / "bootstrap.py"), root=str(ROOT)))
    env = {**os.environ, "TMPDIR": str(temp)}
    head = subprocess.Popen([sys.executable, str(script), "stay"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(head.stdout.readline())
    finally:
        head.send_signal(signal.SIGKILL)
        head.wait()
    end = time.monotonic() + 30
    while time.monotonic() < end and not all(_gone(pid) for pid in first["pids"]):
        time.sleep(0.2)
    assert Path(first["dir"]).exists()  # SIGKILL ran no teardown
    second = subprocess.run([sys.executable, str(script), "close"], capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
