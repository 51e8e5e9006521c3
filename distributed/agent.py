"""The other machines of a multi-machine pool: ``python -m liveavatar worker-agent``.

The head (the ComfyUI or CLI process that owns the pool, ``PoolOptions(nnodes=N,
rdzv_endpoint="HEAD:PORT", channel="tcp", channel_host=...)``) runs torchrun as the rendezvous
host. Every other machine runs one agent: torchrun with our worker entry, joining the same
c10d rendezvous as a non-host node (``is_host=0``). Its ranks read the head's job-channel
address and token from torchrun's store and dial it; everything else (model, mode, backend,
timeouts, NCCL settings) comes from the head in the ``init`` message.

A pool lives as long as the head keeps it (released, idle timeout, a failure, a changed
configuration end it). The agent then starts torchrun again and waits for the head's next
pool, until it is stopped (Ctrl-C / SIGTERM stop torchrun and its workers too) or, with
``once``, after one pool.

Security: torch's rendezvous store and the gloo/NCCL traffic are unauthenticated, and the
channel token travels through that store. Run several machines only on a network you trust
(a private LAN or VPN, firewalled ports); anyone who reaches the rendezvous port can join.
Because of that, the agent's ranks build only file-based models (``dit``, ``tiny``) from the
channel's ``init``, never a ``callable`` spec (code to import), unless this machine sets
``LIVEAVATAR_ALLOW_CALLABLE_MODELS=1`` (tests, development).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import protocol
from .launcher import RDZV_ID, SCRUBBED_ENV, WORKER_ENTRY, split_endpoint, torchrun_command

OUR_ENV = (protocol.ENV_CHANNEL, protocol.ENV_TOKEN, protocol.ENV_PARENT_PID)


@dataclass(frozen=True)
class AgentOptions:
    rdzv_endpoint: str  # the head's "HOST:PORT"
    nnodes: int
    nproc_per_node: int = 1
    rdzv_id: str = RDZV_ID
    gpus: tuple[int, ...] | None = None  # None: what CUDA_VISIBLE_DEVICES / the machine offers
    cpu: bool = False  # hide the GPUs (gloo pools, tests)
    nccl_p2p_disable: bool = False  # also sent by the head when its pool has the option
    threads: int = 1  # OMP_NUM_THREADS until the head's init sets torch's threads
    model_dirs: tuple[str, ...] = ()  # where this machine keeps the head's model files (ComfyUI models/ layout)
    join_timeout_s: float = 600.0  # wait for the head's pool this long per attempt
    once: bool = False
    retry_s: float = 2.0

    def __post_init__(self):
        split_endpoint(self.rdzv_endpoint)
        if self.nnodes < 2:
            raise ValueError("an agent is one of several machines: --nnodes must be >= 2")
        if self.nproc_per_node < 1:
            raise ValueError("--nproc-per-node must be >= 1")
        if self.gpus is not None and len(self.gpus) < self.nproc_per_node:
            raise ValueError(f"{self.nproc_per_node} workers need {self.nproc_per_node} GPUs, got {list(self.gpus)}")


def agent_command(opts: AgentOptions, log_dir: str | None = None) -> list[str]:
    """``log_dir``: torchrun's own folder (a round's temporary one; else torchrun leaves ``torchelastic_*``)."""
    return torchrun_command(opts.nproc_per_node, None, WORKER_ENTRY, nnodes=opts.nnodes, rdzv_endpoint=opts.rdzv_endpoint,
                            rdzv_id=opts.rdzv_id, host_store=False, join_timeout_s=opts.join_timeout_s, log_dir=log_dir)


def agent_env(opts: AgentOptions, base: dict | None = None) -> dict:
    """Inherited environment minus rank variables and any channel settings, plus the GPU choice."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in SCRUBBED_ENV + OUR_ENV}
    if opts.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif opts.gpus is not None:
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible and visible.strip() else None
        chosen = opts.gpus[: opts.nproc_per_node]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[g] if ids else str(g) for g in chosen)
    if opts.nccl_p2p_disable:
        env["NCCL_P2P_DISABLE"] = "1"
    if opts.model_dirs:
        env[protocol.ENV_MODEL_DIRS] = os.pathsep.join(str(Path(d).resolve()) for d in opts.model_dirs)
    env.setdefault("OMP_NUM_THREADS", str(opts.threads))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Agent:
    """Runs torchrun rounds until stopped; ``stop()`` (or SIGTERM/SIGINT via ``serve``) ends the current one."""

    def __init__(self, opts: AgentOptions, log: Callable[[str], None] = print):
        self.opts, self.log = opts, log
        self.proc: subprocess.Popen | None = None
        self.rounds = 0
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)

    def serve(self) -> int:
        """Join the head's pools one after another; the last torchrun's exit code."""
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, lambda *_: self.stop())
        rc = 0
        try:
            while not self._stopping.is_set():
                self.rounds += 1
                self.log(f"worker-agent: joining {self.opts.rdzv_endpoint} (rdzv id {self.opts.rdzv_id}, "
                         f"{self.opts.nproc_per_node} worker(s) here, {self.opts.nnodes} machines)")
                rc = self._round()
                if self.opts.once or self._stopping.is_set():
                    break
                self.log(f"worker-agent: torchrun ended ({rc}); waiting for the head's next pool")
                self._stopping.wait(self.opts.retry_s)
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            self._end_round()
        return 0 if self._stopping.is_set() else rc  # stopped on request: a clean exit

    def _round(self) -> int:
        log_dir = tempfile.mkdtemp(prefix="liveavatar-agent-")
        self.proc = subprocess.Popen(agent_command(self.opts, log_dir), env=agent_env(self.opts), stdin=subprocess.DEVNULL,
                                     start_new_session=True)  # its own group: one signal reaches every worker
        try:
            while True:
                try:
                    return self.proc.wait(timeout=0.5)
                except subprocess.TimeoutExpired:
                    if self._stopping.is_set():
                        return self._end_round()
        finally:
            if self.proc.poll() is None:
                self._end_round()
            shutil.rmtree(log_dir, ignore_errors=True)

    def _end_round(self) -> int:
        proc = self.proc
        if proc is None:
            return 0
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            _signal_group(proc, sig)
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)  # workers torchrun may have left behind
        return proc.returncode if proc.returncode is not None else -9


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
