"""What a torchrun worker does: connect to the parent, build the model, serve jobs.

Modes
-----
``tpp`` (timestep-forcing pipeline parallelism): the sampler's steps are spread over the
ranks in contiguous runs (``assign_steps``); each rank runs its steps with one KV cache
per step and its own sink store. A block flows rank 0 -> 1 -> ... -> last by point-to-
point sends (non-blocking, so rank 0 starts block b+1 while later ranks still work on
block b); the last rank streams clean blocks to the parent. Before every block a small
control message ``[g, stop]`` runs down the chain first, so a cancel that rank 0 reads
from the channel stops every rank at the same block g. At the start of clip 1 the last
rank broadcasts clip 0's first latent frame, the new sink reference (TPP rule). With a
decode rank (``PoolOptions(decode_rank=True)``) the world has one more rank, last, that
holds only the VAE: the last DiT rank hands it the stop decisions and clean blocks the same
way, and it streams decoded uint8 frames to the parent (``DecodeRank``).

``tpp`` x ``sp`` (``init["sp"] = N > 1``): the DiT ranks form step groups of N consecutive ranks;
each group is one pipeline stage whose ranks run its steps with Ulysses (``ulysses.py``) over
their own process group. Member i of group g receives from member i of group g-1 and sends to
member i of group g+1 (every member holds the whole block after the head's all-gather); group 0
agrees on a cancel by a broadcast inside the group; member 0 of the last group streams the
blocks (or feeds the decode rank) and is the source of the clip-1 sink broadcast.

``sp`` (Ulysses sequence parallel, ``ulysses.py``): every rank runs the whole sampler on the same
inputs, but every layer only on its 1/N of the tokens, with two all-to-alls around each
self-attention; it caches only its share of the heads and (``shard_weights``) holds only a
shard of the weights (FSDP2, resharded after each unit's forward, next block prefetched).
Rank 0 streams the blocks; a one-element broadcast from rank 0 before every step (DiT call)
agrees on a cancel.

The math is the engine's (``StepWorker``/``StreamingSampler``); nothing here changes it.

Ranks on the head machine find the job channel in their environment; ranks started by a
``worker-agent`` on another machine read its address and token from torchrun's store
(``MASTER_ADDR:MASTER_PORT``), where the head's local rank 0 published them.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..liveavatar.config import DiTConfig, SamplerConfig
from ..liveavatar.kv_cache import CacheStorage
from ..liveavatar.sampler import (
    Cancelled,
    SeededRopeOffsets,
    SinkInputs,
    StepWorker,
    StreamingSampler,
    TableRopeOffsets,
    clip_noise,
    flow_schedule,
)
from ..liveavatar.schedule import SinkAction, assign_steps, schedule  # noqa: F401 - assign_steps: re-exported
from . import protocol
from .sharding import parameter_bytes, shard_model
from .ulysses import enable_ulysses, sp_groups

EXIT_PARENT_GONE = 3
TRACEBACK_TAIL = 4000
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def sampler_config(raw: dict) -> SamplerConfig:
    return SamplerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def rope_from_job(spec: dict):
    if spec["kind"] == "seeded":
        return SeededRopeOffsets(int(spec["seed"]), int(spec["low"]), int(spec["high"]))
    if spec["kind"] == "table":
        return TableRopeOffsets(spec["table"].tolist() if torch.is_tensor(spec["table"]) else spec["table"])
    raise ValueError(f"unknown rope offsets {spec['kind']!r}")


# ----------------------------------------------------------------------------- model
def _load_callable(target: str):
    """``package.module:function`` or ``/path/to/file.py:function``."""
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"callable model spec {target!r} must look like 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        name = f"_liveavatar_model_{abs(hash(str(path)))}"
        module = sys.modules.get(name)
        if module is None:
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return getattr(module, attr)


def local_file(path: str | None, name: str | None, folder: str) -> str | None:
    """The file on this machine: ``path`` when it exists (one machine, or the same layout everywhere),
    else ``name`` (its name in ComfyUI's ``folder``) under an agent's ``--models`` folders."""
    if path is None or os.path.exists(path):
        return path
    name = name or Path(path).name
    roots = [r for r in os.environ.get(protocol.ENV_MODEL_DIRS, "").split(os.pathsep) if r]
    for root in roots:
        for candidate in (Path(root, folder, name), Path(root, name), Path(root, folder, Path(name).name)):
            if candidate.is_file() or candidate.is_dir():
                return str(candidate)
    raise FileNotFoundError(
        f"{path} is not on this machine ({socket.gethostname()}): put the same file at that path, or start the "
        f"agent with --models DIR where DIR/{folder}/{name} exists (searched: {roots or 'no --models given'})")


def build_model(spec: dict, device: torch.device, allow_callable: bool = True):
    """The DiT described by a model spec (see ``launcher.model_spec``), on ``device``.

    ``allow_callable``: a ``callable`` spec imports and runs the module or file it names. A rank on the
    head machine got its spec from the parent that started it; a rank on another machine got it from
    whoever published a channel in torchrun's unauthenticated store, so it refuses unless that
    machine opted in (``LIVEAVATAR_ALLOW_CALLABLE_MODELS=1``, for tests and development).
    """
    kind = spec["kind"]
    if kind == "callable" and not allow_callable:
        raise PermissionError(f"this rank does not run callable model specs ({spec.get('target')!r}) from another "
                              f"machine; set {protocol.ENV_ALLOW_CALLABLE}=1 on this machine's agent to allow them")
    if kind == "tiny":
        from ..liveavatar.config import TINY
        from ..liveavatar.tiny import tiny_transformer

        cfg = DiTConfig.from_dict(spec["config"]) if spec.get("config") else TINY
        model = tiny_transformer(int(spec.get("seed", 0)), cfg)
    elif kind == "callable":
        model = _load_callable(spec["target"])(**dict(spec.get("kwargs") or {}))
    elif kind == "dit":
        from ..model_loaders.dit import load_dit

        path = local_file(spec["path"], spec.get("name"), "diffusion_models")
        lora = local_file(spec.get("lora"), spec.get("lora_name"), "loras")
        model, _report = load_dit(path, lora=lora, precision=spec.get("precision") or "bf16",
                                  device=device, config=spec.get("config"))
    else:
        raise ValueError(f"unknown model spec kind {kind!r}")
    if spec.get("dtype"):
        model.cast(DTYPES[spec["dtype"]])
    return model.to(device).eval()


def advised_env(env: dict) -> dict[str, str]:
    """The environment an ``init`` sets on a rank: only the known NCCL advice (a rank on another machine
    must not take e.g. a compiler or plugin path from the channel)."""
    out = {}
    for key, value in env.items():
        if str(value) not in protocol.ADVISED_ENV.get(str(key), ()):
            raise PermissionError(f"init may not set {key}={value!r} on a rank (allowed: {protocol.ADVISED_ENV})")
        out[str(key)] = str(value)
    return out


# ----------------------------------------------------------------------------- channel
class Inbox:
    """Reads the parent's messages on a thread: cancels are flagged at once, per-block audio goes to its
    own queue (``FedAudio`` takes it), the rest is queued.

    The channel closing (parent gone) ends the process; so does the parent's PID vanishing.
    """

    def __init__(self, conn: protocol.Connection, parent_pid: int | None):
        self.conn = conn
        self.messages: queue.Queue = queue.Queue()
        self.audio: queue.Queue = queue.Queue()
        self.audio_bytes = 0  # bytes of audio features received and not yet taken
        self.audio_peak = 0  # the most that was held at once (reset per job)
        self._audio_lock = threading.Lock()
        self.cancelled: set[int] = set()
        self.closing = False
        threading.Thread(target=self._read, name="liveavatar-inbox", daemon=True).start()
        if parent_pid:
            threading.Thread(target=self._watch, args=(parent_pid,), name="liveavatar-parent-watch", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except Exception:
                if self.closing:
                    return
                os._exit(EXIT_PARENT_GONE)
            if msg["type"] == "cancel":
                self.cancelled.add(int(msg["job"]))
                continue
            if msg["type"] == "audio":
                with self._audio_lock:
                    self.audio_bytes += _nbytes(msg)
                    self.audio_peak = max(self.audio_peak, self.audio_bytes)
                self.audio.put(msg)
                continue
            if msg["type"] == "shutdown":
                self.closing = True
            self.messages.put(msg)
            if self.closing:
                return

    def _watch(self, pid: int) -> None:
        while True:
            time.sleep(0.5)
            if not _alive(pid):
                os._exit(EXIT_PARENT_GONE)

    def get(self) -> dict:
        return self.messages.get()

    def take_audio(self, timeout: float) -> dict:
        """The next per-block audio message (``queue.Empty`` after ``timeout`` s)."""
        msg = self.audio.get(timeout=timeout)
        with self._audio_lock:
            self.audio_bytes -= _nbytes(msg)
        return msg


def _nbytes(msg: dict) -> int:
    features = msg.get("features")
    return features.numel() * features.element_size() if torch.is_tensor(features) else 0


class FedAudio:
    """The ``AudioSource`` of a running job on a rank: each block's features as the parent feeds them
    (``WorkerPool.run(..., feed=...)``), taken in schedule order; nothing of the track is kept."""

    def __init__(self, inbox: Inbox, job_id: int, timeout_s: float):
        self.inbox, self.job_id, self.timeout_s = inbox, job_id, timeout_s
        self.received = 0  # bytes taken during this job

    def frames(self, start: int, stop: int) -> torch.Tensor:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                msg = self.inbox.take_audio(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"job {self.job_id}: no audio for video frames [{start}, {stop}) "
                                   f"from the parent within {self.timeout_s:.0f} s") from None
            if int(msg["job"]) != self.job_id:
                continue  # left over from a job that stopped early
            if (int(msg["start"]), int(msg["stop"])) != (start, stop):
                raise RuntimeError(f"job {self.job_id}: the parent sent audio for video frames "
                                   f"[{msg['start']}, {msg['stop']}), this block needs [{start}, {stop})")
            self.received += _nbytes(msg)
            return msg["features"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed parent nobody has reaped yet is a zombie: gone for us
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


# ----------------------------------------------------------------------------- modes
class Job:
    """Decoded job inputs (all on the CPU as they came over the channel)."""

    def __init__(self, msg: dict, inbox: Inbox, timeout_s: float = 300.0):
        self.id = int(msg["job"])
        self.cfg = sampler_config(msg["cfg"])
        self.text = msg["text"]
        self.audio = FedAudio(inbox, self.id, timeout_s)  # per block, in schedule order
        inbox.audio_peak = inbox.audio_bytes
        self.sink = SinkInputs(msg["ref_latent"], msg["motion_latents"])
        self.seed = int(msg["seed"])
        self.num_clips = int(msg["num_clips"])
        self.rope = rope_from_job(msg["rope"])
        self.noise_table = msg.get("noise")
        self.vae = msg.get("vae")
        self.schedule = schedule(self.cfg, self.num_clips, self.seed, self.rope)  # the order every rank follows

    def noise(self, clip: int) -> torch.Tensor:
        if self.noise_table is not None:
            return self.noise_table[clip]
        c, _, h, w = self.sink.ref_latent.shape
        return clip_noise(self.seed, clip, (c, self.cfg.latent_frames_per_clip, h, w))


class TPPRank:
    """One DiT rank of the pipeline. ``decode_rank``: the world's last rank decodes (``DecodeRank``), so the
    last DiT rank hands its clean blocks (and the stop decisions) on to it instead of the parent."""

    def __init__(self, model, rank: int, world: int, comm_device: torch.device, decode_rank: bool = False,
                 sp: int = 1, sp_group=None, shard_weights: bool = True):
        self.model, self.rank, self.world, self.comm = model, rank, world, comm_device
        self.decode_rank = decode_rank
        self.sp, self.group = sp, sp_group
        self.stage, self.member = divmod(rank, sp)  # step group, rank inside it
        self.ulysses, self.units, self.heads = None, [], None
        if sp > 1:
            from torch.distributed.device_mesh import DeviceMesh

            self.ulysses = enable_ulysses(model, self.member, sp, sp_group)
            self.heads = (self.ulysses.head_start, self.ulysses.head_stop)
            if shard_weights:
                self.units = shard_model(model, DeviceMesh.from_group(sp_group, comm_device.type))

    def ready_info(self) -> dict:
        return {"param_bytes": parameter_bytes(self.model, self.units), "heads": self.heads}

    def run(self, job: Job, inbox: Inbox, conn: protocol.Connection) -> dict:
        model, rank, cfg, sp = self.model, self.rank, job.cfg, self.sp
        stages = (self.world - int(self.decode_rank)) // sp  # step groups of DiT ranks
        stage, last = self.stage, stages - 1
        prev, nxt = rank - sp, rank + sp
        source = last * sp  # member 0 of the last group: streams, feeds the decode rank, broadcasts the sink
        if self.decode_rank and rank == source:
            nxt = self.world - 1
        chained = stage < last or nxt == self.world - 1 and self.decode_rank  # a rank after this one
        streams = rank == source and not self.decode_rank
        steps = assign_steps(cfg.steps, stages)[stage]
        text = model.embed_text(job.text)
        c, _, h, w = job.sink.ref_latent.shape
        nf = cfg.latent_frames_per_block
        storage = CacheStorage(device=model.device, dtype=model.dtype, heads=self.heads)
        levels = flow_schedule(cfg)
        cond = model.new_cond_cache(h, w, storage)
        workers = [
            StepWorker(model, cfg, s, text, model.new_kv_cache(h, w, cfg.latent_frames_per_clip, storage), cond, levels)
            for s in steps
        ]
        pending: list = []  # outstanding isends (tensors kept alive by their works)
        data_work = None
        first_block = None
        stopped_at = None
        times = []
        noise = None
        for plan in job.schedule:
            g, clip, block = plan.index, plan.clip, plan.block
            # 1. the stop decision runs down the chain before anything else of block g
            if stage == 0 and sp > 1:  # group 0 agrees on its first member's reading
                flag = torch.tensor([int(rank == 0 and job.id in inbox.cancelled)], device=self.comm)
                dist.broadcast(flag, src=0, group=self.group)
                stop = bool(flag.item())
            elif rank == 0:
                stop = job.id in inbox.cancelled
            else:
                ctrl = torch.empty(2, dtype=torch.int64, device=self.comm)
                dist.recv(ctrl, src=prev, tag=_tag(g, 0))
                stop = bool(ctrl[1].item())
            if chained:
                ctrl = torch.tensor([g, int(stop)], device=self.comm)
                pending.append((dist.isend(ctrl, dst=nxt, tag=_tag(g, 0)), ctrl))
            if stop:
                stopped_at = (clip, block)
                break
            # 2. sinks: prefill at clip 0; clip 1 takes clip 0's first latent from the last rank
            if plan.sink is SinkAction.PREFILL:
                workers[0].prefill(job.sink)
            elif plan.sink is SinkAction.REFRESH:
                ref = first_block[:, :1].contiguous() if stage == last else torch.empty(c, 1, h, w)
                ref = ref.to(self.comm)
                dist.broadcast(ref, src=source)
                workers[0].prefill(SinkInputs(ref, job.sink.motion_latents))
            # 3. the block: noise in group 0, the previous group's output elsewhere
            if stage == 0:
                if block == 0:
                    noise = job.noise(clip)
                x = noise[:, plan.noise_slice].to(model.device, torch.float32)
            else:
                x = torch.empty(c, nf, h, w, dtype=torch.float32, device=self.comm)
                dist.recv(x, src=prev, tag=_tag(g, 1))
                x = x.to(model.device)
            t0 = time.time()
            audio = job.audio.frames(plan.audio_start, plan.audio_stop)
            for worker in workers:
                x = worker(x, plan.frame_start, audio, plan.rd(worker.step))
            times.append((clip, block, t0, time.time()))
            if stage == last and plan.refresh_source:
                first_block = x
            if streams:
                conn.send({"type": "block", "job": job.id, "clip": clip, "block": block, "latents": x.cpu()})
            elif chained:
                if data_work is not None:
                    data_work[0].wait()  # back-pressure: the next rank has taken block g-1
                out = x.to(self.comm).contiguous()
                data_work = (dist.isend(out, dst=nxt, tag=_tag(g, 1)), out)
            pending = [p for p in pending if not p[0].is_completed()]
        for work, _ in pending + ([data_work] if data_work is not None else []):
            work.wait()
        return {
            "steps": steps,
            "dit_calls": sum(w.calls for w in workers),
            "calls_per_step": {w.step: w.calls for w in workers},
            "block_times": times,
            "stopped_at": stopped_at,
            "kv_cache_bytes": sum(w.cache.nbytes() for w in workers),
            "cond_cache_bytes": cond.nbytes(),
            "param_bytes": parameter_bytes(model, self.units),
            "heads": self.heads,
            "tokens_per_call": self.ulysses.tokens if self.ulysses else None,
            "all_to_alls": self.ulysses.all_to_alls if self.ulysses else 0,
        }


def _tag(g: int, kind: int) -> int:
    return (2 * g + kind) % 4096


class DecodeRank:
    """The optional last tpp rank: holds the VAE (never the DiT), takes each clean block from the last DiT
    rank and streams its uint8 frames ``[n, H, W, 3]`` to the parent (``BlockDecoder``, warmed on the sink's
    motion latents). It follows the same stop decisions and joins the clip-1 sink broadcast."""

    def __init__(self, rank: int, world: int, comm_device: torch.device, device: torch.device, source: int | None = None):
        self.rank, self.world, self.comm, self.device = rank, world, comm_device, device
        self.source = rank - 1 if source is None else source  # the DiT rank that feeds it
        self._vae_key, self._vae = None, None

    def ready_info(self) -> dict:
        return {"param_bytes": 0, "decode_rank": True}

    def vae(self, spec: dict):
        key = json.dumps(spec, sort_keys=True, default=str)
        if key != self._vae_key:
            self._vae, self._vae_key = None, None
            self._vae, self._vae_key = build_vae(spec, self.device), key
        return self._vae

    def run(self, job: Job, inbox: Inbox, conn: protocol.Connection) -> dict:
        from ..liveavatar.vae import BlockDecoder, to_uint8

        if not job.vae:
            raise ValueError("this pool has a decode rank: the job must carry a VAE spec ('vae')")
        cfg, prev = job.cfg, self.source
        decoder = BlockDecoder.from_config(self.vae(job.vae), cfg)
        decoder.warm_up(job.sink.motion_latents)
        c, _, h, w = job.sink.ref_latent.shape
        nf = cfg.latent_frames_per_block
        times, stopped_at, first = [], None, 0
        for plan in job.schedule:
            g, clip, block = plan.index, plan.clip, plan.block
            ctrl = torch.empty(2, dtype=torch.int64, device=self.comm)
            dist.recv(ctrl, src=prev, tag=_tag(g, 0))
            if bool(ctrl[1].item()):
                stopped_at = (clip, block)
                break
            if plan.sink is SinkAction.REFRESH:  # the sink broadcast is collective: take part, keep nothing
                dist.broadcast(torch.empty(c, 1, h, w, device=self.comm), src=prev)
            x = torch.empty(c, nf, h, w, dtype=torch.float32, device=self.comm)
            dist.recv(x, src=prev, tag=_tag(g, 1))
            t0 = time.time()
            frames = to_uint8(decoder.decode_block(x.to(self.device)))
            times.append((clip, block, t0, time.time()))
            conn.send({"type": "block", "job": job.id, "clip": clip, "block": block, "frames": frames,
                       "first_frame": first})
            first += frames.shape[0]
        return {"steps": [], "dit_calls": 0, "calls_per_step": {}, "block_times": times, "stopped_at": stopped_at,
                "kv_cache_bytes": 0, "cond_cache_bytes": 0, "param_bytes": 0, "frames": first}


def build_vae(spec: dict, device: torch.device):
    """The decode rank's VAE: ``{"kind": "wan_vae", "path", "config"?}`` or ``{"kind": "tiny_vae", "seed"}``."""
    kind = spec.get("kind")
    if kind == "wan_vae":
        from ..model_loaders.vae import load_wan_vae

        path = local_file(spec["path"], spec.get("name"), "vae")
        vae = load_wan_vae(path, config=spec.get("config"), device=device, dtype=DTYPES[spec.get("dtype") or "float32"])
    elif kind == "tiny_vae":
        from ..liveavatar.tiny import tiny_vae

        vae = tiny_vae(int(spec.get("seed", 0)))
    else:
        raise ValueError(f"unknown VAE spec kind {kind!r}")
    return vae.to(device)


class SPRank:
    """Ulysses over all ranks: each runs every DiT call on its 1/N of the tokens (``ulysses.py``)."""

    def __init__(self, model, rank: int, world: int, comm_device: torch.device, shard_weights: bool = True):
        from torch.distributed.device_mesh import init_device_mesh

        self.model, self.rank, self.world, self.comm = model, rank, world, comm_device
        self.ulysses = enable_ulysses(model, rank, world)
        mesh = init_device_mesh(comm_device.type, (world,))
        self.units = shard_model(model, mesh) if shard_weights else []
        self.heads = (self.ulysses.head_start, self.ulysses.head_stop)

    def ready_info(self) -> dict:
        return {"param_bytes": parameter_bytes(self.model, self.units), "heads": self.heads}

    def run(self, job: Job, inbox: Inbox, conn: protocol.Connection) -> dict:
        model, cfg, rank = self.model, job.cfg, self.rank
        text = model.embed_text(job.text)
        storage = CacheStorage(device=model.device, dtype=model.dtype, heads=self.heads)
        counter = {"n": 0, "g": 0}

        def check_cancel():  # called before every step: the ranks agree on each, so all stop within one DiT call
            n = counter["n"]
            counter["n"] += 1
            counter["g"] = n // cfg.steps
            flag = torch.tensor([int(rank == 0 and job.id in inbox.cancelled)], device=self.comm)
            dist.broadcast(flag, src=0)
            if flag.item():
                raise Cancelled(f"cancelled at {job.schedule.block_at(counter['g']).where}")

        sampler = StreamingSampler(
            model, cfg, text, job.audio, job.sink, job.seed, rope_offsets=job.rope,
            noise=job.noise, cache_storage=storage, check_cancel=check_cancel,
        )
        times, between, stopped_at = [], [], None
        tick = time.time()
        try:
            for out in sampler.blocks(job.num_clips):
                times.append((out.clip, out.block, tick, time.time()))
                if rank == 0:
                    conn.send({"type": "block", "job": job.id, "clip": out.clip, "block": out.block, "latents": out.latents.cpu()})
                between.append(parameter_bytes(model, self.units))
                tick = time.time()
        except Cancelled:
            stopped_at = job.schedule.block_at(counter["g"]).where
        return {
            "steps": list(range(cfg.steps)),
            "heads": self.heads,
            "tokens_per_call": self.ulysses.tokens,
            "all_to_all_bytes": self.ulysses.sent_bytes,
            "dit_calls": sum(w.calls for w in sampler.workers),
            "calls_per_step": {w.step: w.calls for w in sampler.workers},
            "block_times": times,
            "stopped_at": stopped_at,
            "kv_cache_bytes": sum(w.cache.nbytes() for w in sampler.workers),
            "cond_cache_bytes": sampler.cond.nbytes(),
            "param_bytes": parameter_bytes(model, self.units),
            "param_bytes_between_blocks": between,
            "all_to_alls": self.ulysses.all_to_alls,
        }


MODES = {"tpp": TPPRank, "sp": SPRank}


# ----------------------------------------------------------------------------- main loop
CHANNEL_KEY = "liveavatar/channel"
STORE_WAIT_S = float(os.environ.get("LIVEAVATAR_STORE_WAIT_S", "300"))


def _store():
    """A client of torchrun's store (the one ``init_process_group`` would use)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_WAIT_S))


def channel_endpoint() -> tuple[str, str, bool]:
    """(channel address, token, on the head machine).

    Head ranks have both in their environment; the head's local rank 0 publishes them in
    torchrun's store when other machines take part, and their ranks read them from there.
    """
    key = f"{CHANNEL_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    address = os.environ.get(protocol.ENV_CHANNEL)
    if address:
        token = os.environ.get(protocol.ENV_TOKEN, "")
        if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            _store().set(key, json.dumps({"channel": address, "token": token}))
        return address, token, True
    found = json.loads(_store().get(key).decode())
    return found["channel"], found["token"], False


def serve() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    address, token, head = channel_endpoint()
    hello = {"type": "hello", "rank": rank, "pid": os.getpid(), "world": world, "head": head,
             "host": socket.gethostname()[:255], "node": int(os.environ.get("GROUP_RANK", "0"))}
    # the auth frame then the hello, prepared before connecting: the head gives a connection ~1 s in all
    conn = protocol.connect(address, remote=not head, first=protocol.auth_frame(token) + protocol.frame(hello))
    parent = os.environ.get(protocol.ENV_PARENT_PID) if head else None  # another machine's PID means nothing here
    inbox = Inbox(conn, int(parent) if parent else None)
    try:
        init = inbox.get()
        if init["type"] != "init":
            raise RuntimeError(f"expected init, got {init['type']}")
        torch.set_num_threads(int(init.get("threads") or 1))
        os.environ.update(advised_env(init.get("env") or {}))  # NCCL advice, on every machine
        backend = init["backend"]
        if backend == "nccl":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group(backend, timeout=timedelta(seconds=float(init["collective_timeout_s"])))
        decode = bool(init.get("decode_rank")) and init["mode"] == "tpp"
        sp = int(init.get("sp") or 1)
        shard = bool(init.get("shard_weights", True))
        group = sp_groups(rank, world - int(decode), sp) if init["mode"] == "tpp" and sp > 1 else None
        if decode and rank == world - 1:  # the decode rank: the VAE comes with each job, never the DiT
            rank_impl = DecodeRank(rank, world, device, device, source=((world - 1) // sp - 1) * sp)
        else:
            model = build_model(init["model"], device,
                                allow_callable=head or os.environ.get(protocol.ENV_ALLOW_CALLABLE) == "1")
            if init["mode"] == "tpp":
                rank_impl = TPPRank(model, rank, world, device, decode_rank=decode, sp=sp, sp_group=group,
                                    shard_weights=shard)
            else:
                rank_impl = SPRank(model, rank, world, device, shard_weights=shard)
        conn.send({"type": "ready", "rank": rank, **rank_impl.ready_info()})
        while True:
            msg = inbox.get()
            if msg["type"] == "shutdown":
                break
            if msg["type"] != "job":
                raise RuntimeError(f"unexpected message {msg['type']}")
            job = Job(msg, inbox, float(init["collective_timeout_s"]))
            stats = rank_impl.run(job, inbox, conn)
            inbox.cancelled.discard(job.id)
            stats.update(audio_bytes_received=job.audio.received, audio_bytes_peak=inbox.audio_peak)
            conn.send({"type": "done", "job": job.id, "rank": rank, "stats": stats})
    except BaseException:
        when = time.time()  # the parent reports the earliest failure as the cause
        tail = traceback.format_exc()[-TRACEBACK_TAIL:]
        try:
            conn.send({"type": "error", "rank": rank, "traceback": tail, "time": when})
        finally:
            sys.stderr.write(tail)
            sys.stderr.flush()
            os._exit(1)
    try:
        dist.destroy_process_group()
    finally:
        conn.close()
