"""Launcher: a warm pool of torchrun workers and the parent's end of the job channel.

``WorkerPool(PoolOptions(...))`` starts torchrun (``torchrun.py``: its stores bound to
127.0.0.1; argument list, no shell) with a free loopback rendezvous port, a scrubbed environment
(no inherited RANK/WORLD_SIZE/MASTER_*), ``CUDA_VISIBLE_DEVICES`` from the chosen GPUs (gloo on
the CPU when there are none), and one channel connection per rank on a unix socket inside a fresh
0700 directory ``liveavatar-pool-<pid>-*`` (or loopback TCP), authenticated by a random token
before anything is decoded (``handshake.Gate``; the listener closes once every rank is in). The
folder also holds torchrun's log and log folder; a dead owner's folder is swept at the next start
(``sweep_dead_pools``). A rank's error or death reaches the caller ahead of queued blocks. The pool stays warm
across jobs, restarts when its options change (``reconfigure``) or after a failure, and is
shut down by ``close()``, at interpreter exit, after ``idle_timeout_s`` without jobs, and -
from the workers' side - when this process dies (channel EOF / parent PID poll).

Several machines (``nnodes > 1``): this process is the head. Its torchrun joins a c10d
rendezvous at ``rdzv_endpoint`` (an address of this machine the others reach) and hosts
the rendezvous store; the other machines run ``python -m liveavatar worker-agent`` (see
``distributed/agent.py``), whose torchrun joins the same rendezvous. The job channel stays
here: it is TCP, listening on ``channel_host`` (loopback unless you expose it), and the
head's local rank 0 publishes its address and token in torchrun's store, where the other
machines' ranks read them (they have no parent PID to watch; they stop on channel EOF,
TCP keepalive included). The parent only signals processes on its own machine.

``pool.run(job, check_cancel, feed)`` streams the job's block messages; ``DistributedSampler``
(``distributed/sampler.py``) wraps it in the engine's sampler interface. Per-block inputs (each
block's audio features) are not in the job: ``feed(g)`` makes block g's message, sent to the DiT
ranks at most ``feed_ahead`` blocks ahead of the blocks delivered, so what a rank holds (and what
the parent computes) stays flat in the video's length.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from . import protocol
from .handshake import Gate
from .torchrun import ENV_STORE_HOST

WORKER_ENTRY = Path(__file__).resolve().parent / "worker.py"
TORCHRUN_ENTRY = Path(__file__).resolve().parent / "torchrun.py"  # torchrun with its stores bound to one address
POOL_PREFIX = "liveavatar-pool-"  # + "<owner pid>-"; a folder whose owner is gone is swept at the next start
SCRUBBED_ENV = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)
LOG_TAIL = 3000
RDZV_ID = "liveavatar"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


class WorkerError(RuntimeError):
    """A rank raised or died; ``rank`` and ``traceback_tail`` say which and why."""

    def __init__(self, message: str, rank: int | None = None, traceback_tail: str = ""):
        super().__init__(message if not traceback_tail else f"{message}\n--- rank {rank} traceback (tail) ---\n{traceback_tail}")
        self.rank, self.traceback_tail = rank, traceback_tail


class GPUsNotFound(ValueError):
    """The GPUs a pool asks for are not on this machine (found before anything is started)."""


# ComfyUI prints an error's type as ``module.qualname``; ours live in a pack imported by its folder
# path, which made it ``/path/to/custom_nodes/ComfyUI-LiveAvatar.distributed.launcher.WorkerError``.
for _cls in (WorkerError, GPUsNotFound):
    _cls.__module__ = "liveavatar"


def model_spec(spec: str | dict) -> dict:
    """Normalise a model description to plain data.

    ``"tiny:<seed>"`` -> the tiny random DiT; ``"callable:<module or file.py>:<function>"``;
    a path -> the DiT loader (``model_loaders/dit.py``); dicts pass through
    (``{"kind": "tiny"|"callable"|"dit", ...}``, optional ``"dtype"``).
    """
    if isinstance(spec, dict):
        if "kind" not in spec:
            raise ValueError(f"model spec {spec} lacks 'kind'")
        return dict(spec)
    if spec.startswith("tiny:") or spec == "tiny":
        return {"kind": "tiny", "seed": int(spec.partition(":")[2] or 0)}
    if spec.startswith("callable:"):
        return {"kind": "callable", "target": spec.partition(":")[2]}
    return {"kind": "dit", "path": spec}


@dataclass(frozen=True)
class PoolOptions:
    """Everything that defines a pool; a pool is reused while these stay equal."""

    model: str | dict = "tiny:0"
    workers: int = 2
    mode: str = "tpp"  # "tpp" | "sp"
    gpus: tuple[int, ...] | None = None  # None: the first ``workers`` visible GPUs, or the CPU without CUDA
    backend: str | None = None  # None: nccl with GPUs, gloo on the CPU
    threads: int = 1  # torch threads per worker
    collective_timeout_s: float = 300.0
    start_timeout_s: float = 300.0
    idle_timeout_s: float | None = None  # close an idle pool after this long
    channel: str = "unix"  # "unix" (0700 directory) or "tcp" (loopback + token)
    nccl_p2p_disable: bool = False  # NCCL_P2P_DISABLE=1 on every rank (agents' included), for some consumer cards
    env: tuple[tuple[str, str], ...] = field(default=())  # extra environment for this machine's workers
    # several machines: this process is the head; the others run ``python -m liveavatar worker-agent``
    nnodes: int = 1  # machines taking part (``workers`` is this machine's share)
    rdzv_endpoint: str | None = None  # "HOST:PORT" of the c10d rendezvous, an address of THIS machine; None: loopback
    rdzv_id: str = RDZV_ID  # the agents pass the same --rdzv-id
    channel_host: str = "127.0.0.1"  # where the tcp channel listens; other machines need e.g. "0.0.0.0" (see README)
    # tpp only: one more rank (the last) that holds the VAE, decodes each clean block and streams frames
    decode_rank: bool = False
    # Ulysses sequence parallel group size (distributed/ulysses.py): mode "sp" puts all workers in one group
    # (sp 1 or = workers); mode "tpp" with sp N runs workers / N step groups of N ranks each (tpp x sp)
    sp: int = 1
    shard_weights: bool = True  # sp groups hold FSDP2 shards of the weights (False: the whole model per rank)

    def __post_init__(self):
        if self.mode not in ("tpp", "sp"):
            raise ValueError(f"mode must be 'tpp' or 'sp', got {self.mode!r}")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.channel not in ("unix", "tcp"):
            raise ValueError(f"channel must be 'unix' or 'tcp', got {self.channel!r}")
        if self.nnodes < 1:
            raise ValueError("nnodes must be >= 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("a pool over several machines needs rdzv_endpoint='HOST:PORT' (an address of this machine)")
        if self.rdzv_endpoint:
            split_endpoint(self.rdzv_endpoint)
        if self.nnodes > 1 and self.channel != "tcp":
            raise ValueError("a pool over several machines needs channel='tcp' (other machines cannot reach a unix socket)")
        if self.channel_host not in LOOPBACK and self.channel != "tcp":
            raise ValueError("channel_host applies to the tcp channel; set channel='tcp'")
        if self.decode_rank and (self.mode != "tpp" or self.nnodes != 1):
            raise ValueError("decode_rank needs mode='tpp' on one machine")
        check_sp_layout(self.mode, self.workers, self.sp)

    @property
    def sp_size(self) -> int:
        """Ranks per sequence-parallel group (1: none)."""
        return self.workers * self.nnodes if self.mode == "sp" else self.sp

    @property
    def step_groups(self) -> int:
        """Groups the tpp steps are spread over (1 in mode sp)."""
        return self.workers * self.nnodes // self.sp_size

    @property
    def procs(self) -> int:
        """Processes on this machine: the DiT workers, plus the decode rank when there is one."""
        return self.workers + int(self.decode_rank)

    def key(self) -> str:
        raw = dataclasses.asdict(self)
        raw["model"] = model_spec(self.model)
        raw.pop("idle_timeout_s")
        return json.dumps(raw, sort_keys=True, default=str)


def check_sp_layout(mode: str, workers: int, sp: int, steps: int | None = None) -> None:
    """One-line errors for impossible (mode, workers, sp[, steps]) combinations."""
    if sp < 1:
        raise ValueError(f"sp must be >= 1, got {sp}")
    if mode == "sp" and sp not in (1, workers):
        raise ValueError(f"mode sp runs all {workers} workers as one sp group (sp {workers}), got sp {sp}; "
                         f"for step groups of {sp} ranks use mode tpp with sp {sp}")
    if mode == "tpp" and workers % sp:
        raise ValueError(f"tpp x sp needs workers divisible by sp: {workers} workers do not split into groups of {sp}")
    groups = workers // sp if mode == "tpp" else 1
    if steps is not None and groups > steps:
        raise ValueError(f"{groups} step groups ({workers} workers / sp {sp}) for {steps} steps: "
                         f"use at most {steps * sp} workers or a larger sp")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[v6]:PORT"`` -> (host, port)."""
    host, sep, port = endpoint.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rendezvous endpoint must look like HOST:PORT, got {endpoint!r}")
    return host, int(port)


def channel_address(options: PoolOptions, port: int) -> str:
    """The channel address the ranks dial: ``channel_host``, or for a wildcard the rendezvous host."""
    host = options.channel_host
    if host in WILDCARD:
        host = split_endpoint(options.rdzv_endpoint)[0] if options.rdzv_endpoint else "127.0.0.1"
    return f"tcp:{host}:{port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def check_gpus(options: PoolOptions, cuda_count: int | None = None, visible: str | None = None) -> None:
    """Refuse GPU ids this machine does not have, before a process is spawned (torchrun would fail in 20-30 s).

    Ids are relative to this process's ``CUDA_VISIBLE_DEVICES``, as ``worker_env`` maps them.
    """
    if options.gpus is None:
        return  # the first visible GPUs, or gloo on the CPU without CUDA
    count = _cuda_count() if cuda_count is None else cuda_count
    missing = [g for g in options.gpus[: options.procs] if g >= count]
    if not missing:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    shown = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    asked = ",".join(str(g) for g in options.gpus[: options.procs])
    if count == 0:
        found = f"this machine's torch sees no CUDA GPU{shown} (a CPU-only torch, no driver, or none installed)"
        fix = "set gpus to 'cpu' to run the workers on the CPU (gloo: slow, for trying it out)"
    else:
        ids = ",".join(str(i) for i in range(count))
        found = f"this machine's torch sees {count} CUDA GPU{'s' * (count > 1)}{shown}: ids {ids}"
        fix = (f"set gpus to ids among {ids} (e.g. '{ids}') and at most {count} workers, or 'cpu'"
               if count >= 2 or options.mode != "tpp" else "use 'LiveAvatar Model Loader' on the one GPU, or 'cpu'")
    raise GPUsNotFound(f"gpus {asked}: GPU {','.join(map(str, missing))} not found; {found}; {fix}")


def worker_env(options: PoolOptions, channel: str, token: str, base: dict | None = None) -> tuple[dict, str]:
    """(environment, backend) of the torchrun agent: inherited minus rank variables, plus ours."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in SCRUBBED_ENV}
    gpus = options.gpus
    procs = options.procs
    if gpus is None and options.backend != "gloo" and _cuda_count() >= procs:
        gpus = tuple(range(procs))
    backend = options.backend or ("nccl" if gpus else "gloo")
    if gpus:
        if len(gpus) < procs:
            raise ValueError(f"{procs} workers need {procs} GPUs, got {list(gpus)}")
        visible = env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and visible.strip():  # chosen indices are relative to what we see
            ids = [v.strip() for v in visible.split(",") if v.strip()]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] for g in gpus[:procs])
        else:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus[:procs])
    elif backend == "gloo":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(
        {
            protocol.ENV_CHANNEL: channel,
            protocol.ENV_TOKEN: token,
            protocol.ENV_PARENT_PID: str(os.getpid()),
            "OMP_NUM_THREADS": str(options.threads),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(nccl_env(options))
    env.update(listen_env(options, env))
    env.update(dict(options.env))
    return env, backend


def loopback_interface() -> str | None:
    """This machine's loopback interface name (``lo`` on Linux, ``lo0`` on macOS), if it has one."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return None
    return next((n for n in ("lo", "lo0") if n in names), None)


def listen_env(options: PoolOptions, env: dict) -> dict[str, str]:
    """Where the pool's own listening sockets go.

    torchrun's stores bind ``127.0.0.1`` on one machine (``torchrun.py``), the given endpoint otherwise.
    On one machine gloo's and NCCL's bootstrap sockets are kept on the loopback interface too (they
    otherwise bind the address of the host name), unless the user chose an interface.
    """
    multi = options.nnodes > 1 or options.rdzv_endpoint is not None
    out = {ENV_STORE_HOST: "given" if multi else "127.0.0.1"}
    lo = None if multi else loopback_interface()
    if lo:
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if not env.get(name):
                out[name] = lo
    return out


def nccl_env(options: PoolOptions) -> dict[str, str]:
    """NCCL settings every rank applies before joining the process group (sent to agents in ``init``)."""
    return {"NCCL_P2P_DISABLE": "1"} if options.nccl_p2p_disable else {}


def torchrun_command(workers: int, port: int | None = None, entry: Path = WORKER_ENTRY, *, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str = RDZV_ID, host_store: bool = True,
                     join_timeout_s: float | None = None, log_dir: str | None = None) -> list[str]:
    """torchrun's argument list: loopback static rendezvous on one machine, else c10d at ``rdzv_endpoint``.

    ``host_store``: this agent hosts the rendezvous store (the head); agents on other machines pass False.
    Run through ``torchrun.py`` (the same arguments), which binds the stores it hosts (``ENV_STORE_HOST``).
    ``log_dir``: torchrun's own folder (else it leaves an empty ``torchelastic_*`` tree in the temp folder).
    """
    cmd = [sys.executable, str(TORCHRUN_ENTRY), "--nnodes", str(nnodes), "--nproc-per-node", str(workers)]
    if log_dir:
        cmd += ["--log-dir", log_dir]
    if rdzv_endpoint is None:
        if nnodes != 1 or port is None:
            raise ValueError("several machines need a rendezvous endpoint; one machine needs a port")
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        split_endpoint(rdzv_endpoint)
        conf = f"is_host={int(host_store)}"
        if join_timeout_s:
            conf += f",join_timeout={max(1, int(join_timeout_s))}"
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", rdzv_id, "--rdzv-conf", conf]
    return cmd + ["--max-restarts", "0", "--monitor-interval", "0.2", str(entry)]


_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()


class WorkerPool:
    """A warm set of torchrun workers holding one model configuration."""

    def __init__(self, options: PoolOptions):
        self.options = options
        self.last_stats: dict[int, dict] = {}
        self.ready_info: dict[int, dict] = {}
        self.worker_pids: dict[int, int] = {}
        self.worker_hosts: dict[int, str] = {}
        self.remote_ranks: set[int] = set()  # ranks on other machines (their pids are not ours to signal)
        self.world = options.procs * options.nnodes  # every rank's hello confirms it
        self.starts = 0
        self._proc: subprocess.Popen | None = None
        self._dir: str | None = None
        self._log = None
        self._listener: socket.socket | None = None
        self._conns: dict[int, protocol.Connection] = {}
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self._jobs = 0
        self._busy = False
        self._last_used = time.monotonic()
        self._idle_watcher: threading.Thread | None = None
        _POOLS.add(self)
        self._watch_idle()

    def _watch_idle(self) -> None:
        """An idle timeout may also arrive later, through ``reconfigure`` (e.g. a node's setting)."""
        if self.options.idle_timeout_s and (self._idle_watcher is None or not self._idle_watcher.is_alive()):
            self._idle_watcher = threading.Thread(target=_idle_watch, args=(weakref.ref(self),), daemon=True)
            self._idle_watcher.start()

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def agent_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def reconfigure(self, options: PoolOptions) -> bool:
        """Adopt new options; restarts the workers only if the model configuration changed."""
        with self._lock:
            if options.key() == self.options.key():
                self.options = options
                self._watch_idle()
                return False
            self.close()
            self.options = options
            self._watch_idle()
            return True

    def start(self) -> "WorkerPool":
        with self._lock:
            if not self.running:
                self._teardown()
                try:
                    self._launch()
                except BaseException:
                    self._teardown()
                    raise
            return self

    def _launch(self) -> None:
        opts = self.options
        check_gpus(opts)  # before any process, socket or folder exists
        sweep_dead_pools()
        self._dir = tempfile.mkdtemp(prefix=f"{POOL_PREFIX}{os.getpid()}-")
        os.chmod(self._dir, 0o700)
        Path(self._dir, OWNER_FILE).write_text(owner_stamp(os.getpid()) or "")
        if opts.channel == "unix":
            path = os.path.join(self._dir, "channel.sock")
            self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._listener.bind(path)
            os.chmod(path, 0o600)
            address = f"unix:{path}"
        else:
            family = socket.AF_INET6 if ":" in opts.channel_host else socket.AF_INET
            self._listener = socket.socket(family, socket.SOCK_STREAM)
            self._listener.bind((opts.channel_host, 0))
            address = channel_address(opts, self._listener.getsockname()[1])
        self._listener.listen(128)
        token = secrets.token_hex(16)
        env, backend = worker_env(opts, address, token)
        self._log = open(os.path.join(self._dir, "torchrun.log"), "wb")
        self._events = queue.Queue()
        self._failures = queue.Queue()
        self.world = opts.procs * opts.nnodes
        self.remote_ranks, self.worker_hosts = set(), {}
        multi = opts.nnodes > 1 or opts.rdzv_endpoint is not None
        command = torchrun_command(
            opts.procs, None if multi else free_port(), nnodes=opts.nnodes,
            rdzv_endpoint=opts.rdzv_endpoint if multi else None, rdzv_id=opts.rdzv_id, host_store=True,
            join_timeout_s=opts.start_timeout_s, log_dir=os.path.join(self._dir, "torchelastic"),
        )
        self._proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so teardown reaches every worker
        )
        self.starts += 1
        deadline = time.monotonic() + opts.start_timeout_s  # one deadline for the whole start, whoever connects
        gate = Gate(self._listener, token)
        try:
            while len(self._conns) < self.world:
                self._check_agent()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerError(f"{len(self._conns)} of {self.world} workers connected within "
                                      f"{opts.start_timeout_s} s{self._waiting_hint()}{self._log_tail()}")
                for sock, hello in gate.poll(min(left, 0.2)):
                    self._attach(sock, hello)
        finally:
            gate.close()
            self._listener.close()  # every rank is in: nothing listens for the channel any more
            self._listener = None
        init = {
            "type": "init", "model": model_spec(opts.model), "mode": opts.mode, "backend": backend,
            "threads": opts.threads, "collective_timeout_s": opts.collective_timeout_s, "env": nccl_env(opts),
            "decode_rank": opts.decode_rank, "sp": opts.sp_size if opts.mode == "tpp" else 1,
            "shard_weights": opts.shard_weights,
        }
        self._send_all(init)
        ready: dict[int, dict] = {}
        while len(ready) < self.world:
            rank, msg = self._next(deadline - time.monotonic(), "starting")
            if msg is not None and msg["type"] == "ready":
                ready[rank] = msg
        self.ready_info = ready
        self._last_used = time.monotonic()

    def _attach(self, sock: socket.socket, hello: dict) -> None:
        """An authenticated rank: its connection, read by a thread that reports failures on a fast path."""
        protocol.keepalive(sock)
        rank = int(hello["rank"])
        conn = protocol.Connection(sock, limit=protocol.CONTROL_MAX)
        old = self._conns.pop(rank, None)
        if old is not None:
            old.close()
        self.world = int(hello.get("world", self.world))
        self._conns[rank] = conn
        self.worker_pids[rank] = int(hello["pid"])
        self.worker_hosts[rank] = str(hello.get("host", ""))
        if not hello.get("head", True):
            self.remote_ranks.add(rank)
        pid = None if rank in self.remote_ranks else int(hello["pid"])
        threading.Thread(target=_reader, args=(rank, conn, self._events, self._failures, pid), daemon=True).start()

    def close(self, grace_s: float = 10.0) -> None:
        """Shut the workers down (politely, then by signal) and remove the channel directory."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                try:
                    self._send_all({"type": "shutdown"})
                    self._proc.wait(timeout=grace_s)
                except Exception:
                    pass
            self._teardown()

    def _teardown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        # in case one left the group: only this pool's session, never another machine's ranks, and never
        # again on a later teardown (by then a pid may belong to another process)
        for rank, pid in self.worker_pids.items():
            if proc is None or rank in self.remote_ranks:
                continue
            try:
                if os.getsid(pid) == proc.pid:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.worker_pids = {}
        for conn in self._conns.values():
            conn.close()
        self._conns = {}
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._busy = False

    # ------------------------------------------------------------------ messages
    def _send_all(self, message: dict) -> None:
        for rank in sorted(self._conns):
            self._conns[rank].send(message)

    def _dit_ranks(self) -> list[int]:
        """The ranks that run the DiT (all but a tpp decode rank, which is the last)."""
        ranks = sorted(self._conns)
        return ranks[:-1] if self.options.decode_rank and self.options.mode == "tpp" else ranks

    def feed_ahead(self) -> int:
        """Blocks the DiT ranks may hold beyond the delivered ones: a tpp rank runs ahead of the next by up
        to ~2 blocks (one in flight, one sent), so 2 per rank keeps the pipeline full."""
        return 2 * self.world + 2

    def _feed(self, job_id: int, feed: Callable[[int], dict] | None, state: dict, delivered: int, doing: str) -> None:
        """Send the per-block messages up to ``delivered + feed_ahead`` (``state["next"]``: the next to send)."""
        if feed is None:
            return
        upto = min(state["total"], delivered + self.feed_ahead())
        while state["next"] < upto:
            message = feed(state["next"])
            if message is None:  # not ready yet (live audio still arriving): tried again on the next poll
                return
            message = {**message, "job": job_id}
            data = protocol.frame(message)
            try:
                for rank in self._dit_ranks():
                    self._conns[rank].send_raw(data)
            except OSError:  # a rank's channel is gone: report that rank's failure, not the pipe
                self._fail(doing)
            state["next"] += 1

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            text = Path(self._dir, "torchrun.log").read_bytes()[-LOG_TAIL:].decode(errors="replace")
        except OSError:
            return ""
        return f"\n--- torchrun log (tail) ---\n{text}" if text.strip() else ""

    def _waiting_hint(self) -> str:
        opts = self.options
        if opts.nnodes <= 1:
            return ""
        return (f"; {opts.nnodes - 1} other machine(s) must run `python -m liveavatar worker-agent --rdzv-endpoint "
                f"{opts.rdzv_endpoint} --nnodes {opts.nnodes} --rdzv-id {opts.rdzv_id} --nproc-per-node K`, and reach "
                f"this machine's channel (channel_host={opts.channel_host!r}; loopback only serves this machine)")

    def _check_agent(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise WorkerError(f"torchrun exited with code {self._proc.returncode}{self._log_tail()}")

    def _next(self, timeout: float, doing: str) -> tuple[int, dict | None]:
        """Next (rank, message); (-1, None) on timeout; raises WorkerError on a rank's error or death.

        Failures come on their own queue and are checked first: a rank's death must not wait
        behind the blocks already received (a slow consumer took 27-54 s to reach it).
        """
        if not self._failures.empty():
            self._fail(doing)
        try:
            rank, msg = self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            self._check_agent()
            if doing == "starting":
                raise WorkerError(f"workers not ready within {self.options.start_timeout_s} s{self._log_tail()}")
            return -1, None
        if msg is None or msg["type"] == "error" or not self._failures.empty():
            self._fail(doing)
        return rank, msg

    def _fail(self, doing: str, grace_s: float = 0.5) -> None:
        """Raise for the root failure among the ranks' failures (those of a short grace period too).

        Once one rank fails the others usually fail too (a peer's socket closed, torchrun's SIGTERM),
        so the cause is chosen: first a rank killed by a signal other than SIGTERM (or that broke the
        protocol) - nothing a peer does kills a process that way, while the peers' own errors are then
        often its consequence (their collective saw its socket close); a rank whose exit status was
        missed counts when its channel closed before the first error; else the earliest error a rank
        reported; else the first rank that ended without a report.
        """
        found: list[Failure] = []
        deadline = time.monotonic() + grace_s
        while True:
            try:
                found.append(self._failures.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if found or time.monotonic() >= deadline:
                    break
        reported = {f.rank for f in found if f.report is not None}
        errors = sorted((f for f in found if f.report is not None), key=lambda f: f.report.get("time", f.seen))
        dead = sorted((f for f in found if f.report is None and f.rank not in reported), key=lambda f: f.seen)
        for f in dead:
            if f.signal is None and f.code is None and f.refused is None:
                f.signal, f.code = self._status_from_log(f.pid)
        first_error = errors[0].report.get("time", errors[0].seen) if errors else float("inf")
        hard = [f for f in dead if f.refused is not None or (f.signal is not None and f.signal != signal.SIGTERM)
                or (f.signal is None and f.code is None and f.seen < first_error)]  # status missed: the earlier wins
        if hard:
            cause = hard[0]
        elif errors:
            err = errors[0]
            also = [f.rank for f in dead]
            also_text = f" (rank(s) {also} exited without a report)" if also else ""
            raise WorkerError(f"rank {err.rank} failed while {doing}{also_text}", err.rank, err.report["traceback"])
        elif dead:
            cause = dead[0]
        else:
            self._check_agent()
            raise WorkerError(f"the workers failed while {doing}{self._log_tail()}")
        where = f" on {self.worker_hosts[cause.rank]}" if cause.rank in self.remote_ranks and self.worker_hosts.get(cause.rank) else ""
        others = sorted({f.rank for f in found} - {cause.rank})
        also_text = f"; rank(s) {others} failed after it" if others else ""
        raise WorkerError(f"rank {cause.rank} (pid {cause.pid}{where}) {cause.describe()} while {doing}{also_text}"
                          f"{self._log_tail()}", cause.rank)

    def _status_from_log(self, pid: int | None) -> tuple[int | None, int | None]:
        """(signal, exit code) of a local rank from torchrun's failure summary, when /proc had none."""
        if pid is None or self._dir is None:
            return None, None
        try:
            text = Path(self._dir, "torchrun.log").read_text(errors="replace")
        except OSError:
            return None, None
        found = re.findall(rf"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*{pid}\)", text)
        if not found:
            return None, None
        code = int(found[-1])
        return (-code, None) if code < 0 else (None, code)

    # ------------------------------------------------------------------ jobs
    def run(self, job: dict, check_cancel: Callable[[], None] | None = None, poll_s: float = 0.05,
            feed: Callable[[int], dict] | None = None) -> Iterator[dict]:
        """Send ``job`` to every rank; yield its ``block`` messages in arrival order.

        ``feed(g)``: block g's per-block message (e.g. ``{"type": "audio", ...}``), sent to the DiT ranks
        while the job runs, ``feed_ahead()`` blocks ahead of the blocks delivered. It may return None when
        block g's input is not there yet (live audio): it is asked again every ``poll_s`` while the blocks
        already made keep being received, so a live feed never holds back a finished block.

        ``check_cancel`` is polled while waiting; when it raises, every rank is told to stop
        at the next agreed block, the pool is drained (stays warm) and the exception is
        re-raised. Per-rank stats land in ``last_stats``. A rank that raises or dies makes
        this raise ``WorkerError`` and tears the pool down; the next job starts a fresh one.
        """
        with self._lock:
            self.start()
            self._busy = True
            self._jobs += 1
            job_id = self._jobs
            done: dict[int, dict] = {}
            interrupt: BaseException | None = None
            finished = False
            fed = {"next": 0, "total": job_blocks(job), "delivered": 0}
            try:
                bound = reply_bound(job)
                for conn in self._conns.values():
                    conn.limit = bound
                self._send_all({**job, "type": "job", "job": job_id})
                self._feed(job_id, feed, fed, 0, "running")
                while len(done) < self.world:
                    if interrupt is None and check_cancel is not None:
                        try:
                            check_cancel()
                        except BaseException as exc:  # noqa: BLE001 - any interrupt type of the host
                            interrupt = exc
                            self._send_all({"type": "cancel", "job": job_id})
                    rank, msg = self._next(poll_s, "running")
                    ours = msg is not None and msg.get("job") == job_id
                    if ours and msg["type"] == "block":
                        fed["delivered"] += 1
                    self._feed(job_id, feed, fed, fed["delivered"], "running")  # every poll: a feed may wait for input
                    if not ours:
                        continue
                    if msg["type"] == "block" and interrupt is None:
                        yield msg
                    elif msg["type"] == "done":
                        done[rank] = msg["stats"]
                finished = True
                self.last_stats = done
                if interrupt is not None:
                    raise interrupt
            except GeneratorExit:  # the consumer stopped early: stop the ranks, keep the pool
                if not finished:
                    self._drain(job_id, done, lambda: self._feed(job_id, feed, fed, fed["delivered"], "stopping"), fed)
            except WorkerError:
                self._teardown()
                raise
            except BaseException:
                if not finished and interrupt is None:
                    self._teardown()
                raise
            finally:
                self._busy = False
                self._last_used = time.monotonic()

    def _drain(self, job_id: int, done: dict, top_up: Callable[[], None] = lambda: None, fed: dict | None = None) -> None:
        """Stop the job's ranks and wait for their ``done``; blocks still finishing keep getting their inputs."""
        try:
            self._send_all({"type": "cancel", "job": job_id})
            deadline = time.monotonic() + self.options.collective_timeout_s
            while len(done) < self.world and time.monotonic() < deadline:
                rank, msg = self._next(0.1, "stopping")
                if msg is not None and msg.get("job") == job_id and msg["type"] == "done":
                    done[rank] = msg["stats"]
                elif msg is not None and msg.get("job") == job_id and msg["type"] == "block" and fed is not None:
                    fed["delivered"] += 1
                if fed is not None:
                    top_up()  # every poll: a rank may be waiting for the input of a block it started
            if len(done) < self.world:
                self._teardown()
            self.last_stats = done
        except Exception:
            self._teardown()

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def job_blocks(job: dict) -> int:
    """Blocks in ``job`` (clips x blocks per clip)."""
    cfg = job["cfg"]
    nf, stride = int(cfg["latent_frames_per_block"]), int(cfg["vae_temporal_stride"])
    return int(job["num_clips"]) * (int(cfg["frames_per_clip"]) // stride // nf)


def reply_bound(job: dict) -> int:
    """The largest message a rank may send the parent during ``job`` (checked on each length prefix).

    A rank sends one block at a time: float32 latents [C, frames, h, w], or a decode rank's uint8
    frames [n, H, W, 3] (n <= frames_per_block + one temporal stride for the causal first block;
    H, W <= 16x the latent size, twice the Wan VAE's 8x), then per-rank stats that grow with the
    number of blocks (timings, per-block byte counts). Twice the largest of those, plus
    ``CONTROL_MAX`` for the plain-data parts, is generous for every legitimate reply and still
    bounded by the job the parent chose, not by what a peer claims.
    """
    cfg = job["cfg"]
    c, _, h, w = job["ref_latent"].shape
    nf, stride = int(cfg["latent_frames_per_block"]), int(cfg["vae_temporal_stride"])
    blocks = job_blocks(job)
    largest = c * nf * h * w * 4
    if job.get("vae") is not None:
        largest = max(largest, (nf * stride + stride) * (16 * h) * (16 * w) * 3)
    return 2 * (largest + 512 * blocks) + protocol.CONTROL_MAX


@dataclass
class Failure:
    """A rank's end as its reader saw it: an error report, or the channel closing (and how it ended)."""

    rank: int
    seen: float  # time.time() when the parent saw it
    pid: int | None = None
    report: dict | None = None  # the rank's ``error`` message
    signal: int | None = None  # the signal that ended the process, when known
    code: int | None = None  # its exit code, when known
    refused: str | None = None  # the parent dropped the connection: a message broke the protocol

    def describe(self) -> str:
        if self.refused is not None:
            return f"broke the channel protocol ({self.refused})"
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"died of {name} (signal {self.signal}) without a report"
        if self.code is not None:
            return f"died with exit code {self.code} without a report"
        return "died without a report"


def exit_status(pid: int | None, wait_s: float = 0.3) -> tuple[int | None, int | None]:
    """(signal, exit code) of a local process that just closed its channel, read while it is a zombie.

    Its parent is torchrun, not us, so there is no ``waitpid``; ``/proc/<pid>/stat`` keeps the
    wait status (field 52) until torchrun reaps it (its monitor polls every 0.2 s). None when missed.
    """
    if pid is None:
        return None, None
    end = time.monotonic() + wait_s
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None, None
        if fields[0] in ("Z", "X") and len(fields) >= 50:
            status = int(fields[49])
            return (status & 0x7F, None) if status & 0x7F else (None, (status >> 8) & 0xFF)
        if time.monotonic() >= end:
            return None, None
        time.sleep(0.005)


def _reader(rank: int, conn: protocol.Connection, events: queue.Queue, failures: queue.Queue, pid: int | None) -> None:
    """Reads one rank's messages. Errors and the channel's end also go to ``failures``, read before the data."""
    while True:
        try:
            msg = conn.recv()
        except Exception as exc:  # noqa: BLE001 - closed, reset, or refused: the rank is gone for this pool
            seen = time.time()
            refused = str(exc) if isinstance(exc, protocol.MessageRefused) else None
            sig, code = (None, None) if refused else exit_status(pid)
            failures.put(Failure(rank, seen, pid, signal=sig, code=code, refused=refused))
            events.put((rank, None))
            return
        if msg["type"] == "error":
            failures.put(Failure(rank, time.time(), pid, report=msg))
        events.put((rank, msg))


OWNER_FILE = "owner"


def owner_stamp(pid: int) -> str | None:
    """``"<pid> <start time>"``: a pid is reused, a pid with its start time is not."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f"{pid} {f.read().rpartition(')')[2].split()[19]}"
    except (OSError, IndexError):
        return None


def sweep_dead_pools(root: str | None = None) -> list[str]:
    """Remove the pool folders (channel socket, torchrun log and its torchelastic tree) of dead owners.

    A head killed by SIGKILL runs no teardown; its workers stop on their own (channel EOF, parent
    PID poll) but its folder stays. Each folder is named after its owner's pid and records the
    owner's start time; it is removed when that process is gone (or the pid now belongs to another).
    Only this user's folders are touched.
    """
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(POOL_PREFIX):
            continue
        pid_text = entry.name[len(POOL_PREFIX):].partition("-")[0]
        try:
            if not pid_text.isdigit() or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            recorded = Path(entry.path, OWNER_FILE).read_text().strip()
        except OSError:
            recorded = ""
        pid = int(pid_text) if pid_text.isdigit() else None
        if pid is None or pid == os.getpid():
            continue
        current = owner_stamp(pid)
        if current is None or (recorded and current != recorded):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _idle_watch(ref) -> None:
    while True:
        time.sleep(1.0)
        pool = ref()
        if pool is None:
            return
        limit = pool.options.idle_timeout_s
        if limit and pool.running and not pool._busy and time.monotonic() - pool._last_used > limit:
            if pool._lock.acquire(blocking=False):
                try:
                    if not pool._busy:
                        pool.close()
                finally:
                    pool._lock.release()
        del pool


_SHARED: dict[str, WorkerPool] = {}


def shared_pool(options: PoolOptions) -> WorkerPool:
    """The process-wide pool for nodes/CLI: reused while ``options`` describe the same workers."""
    pool = _SHARED.get("pool")
    if pool is None:
        pool = _SHARED["pool"] = WorkerPool(options)
    else:
        pool.reconfigure(options)
    return pool


def release_shared_pool() -> None:
    """Free the workers (and their GPUs) of the shared pool now."""
    pool = _SHARED.pop("pool", None)
    if pool is not None:
        pool.close()
