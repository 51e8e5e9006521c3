"""Distributed runs on CPU: torchrun workers, gloo on loopback, tiny models.

Each parallel mode must give the single-process result (tpp bitwise, sp within fp32
tolerance), really split the work (call counts, overlap, cache and weight bytes), and
the pool must survive an interrupt and recover from a rank that raises or dies.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from liveavatar_pack.distributed import protocol
from liveavatar_pack.distributed.agent import AgentOptions, agent_command, agent_env
from liveavatar_pack.distributed.launcher import (
    TORCHRUN_ENTRY,
    PoolOptions,
    WorkerError,
    WorkerPool,
    channel_address,
    free_port,
    model_spec,
    torchrun_command,
    worker_env,
)
from liveavatar_pack.distributed.runtime import assign_steps
from liveavatar_pack.distributed.sampler import DistributedSampler
from liveavatar_pack.liveavatar.config import TINY, SamplerConfig
from liveavatar_pack.liveavatar.sampler import Cancelled, SinkInputs, StreamingSampler, TensorAudio
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer

H, W = TINY_LATENT_HW  # non-square (liveavatar/tiny.py)
MODEL_SEED = 1
ROOT = Path(__file__).resolve().parent.parent


def inputs(clips: int = 2):
    gen = torch.Generator().manual_seed(123)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, TINY.num_audio_layers, TINY.audio_dim, 48 * clips + 6, generator=gen))
    text = torch.randn(7, TINY.text_dim, generator=gen)
    return text, audio, sink


def single_process(clips: int, cfg: SamplerConfig = SamplerConfig(), seed: int = 0) -> list[torch.Tensor]:
    """The reference, on one thread like the workers (so reductions run in the same order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        text, audio, sink = inputs(clips)
        sampler = StreamingSampler(tiny_transformer(MODEL_SEED), cfg, text, audio, sink, seed=seed)
        return [b.latents for b in sampler.blocks(clips)]
    finally:
        torch.set_num_threads(threads)


def distributed(pool, clips: int, cfg: SamplerConfig = SamplerConfig(), seed: int = 0, **kwargs):
    text, audio, sink = inputs(clips)
    sampler = DistributedSampler(pool, cfg, text, audio, sink, seed=seed, **kwargs)
    blocks = list(sampler.blocks(clips))
    assert [(b.clip, b.block) for b in blocks] == [(c, b) for c in range(clips) for b in range(cfg.blocks_per_clip)]
    return [b.latents for b in blocks], sampler.stats


def faulty_model(seed: int, rank: int, after: int):
    """A tiny DiT whose ``after``-th block call raises on ``rank`` (loaded by the workers by path)."""
    model = tiny_transformer(seed)
    if int(os.environ.get("RANK", -1)) == rank:
        forward, calls = model.forward_block, {"n": 0}

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("injected fault in forward_block")
            return forward(*args, **kwargs)

        model.forward_block = failing
    return model


def nccl_advised_model(seed: int):
    """The tiny DiT, built only where the head's NCCL advice reached the rank's environment."""
    if os.environ.get("NCCL_P2P_DISABLE") != "1":
        raise RuntimeError(f"rank {os.environ.get('RANK')}: NCCL_P2P_DISABLE did not reach this rank")
    return tiny_transformer(seed)


# ----------------------------------------------------------------------------- no processes
def _encoded(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class NotPlainData:
    """An arbitrary object: the channel must refuse to unpickle it."""


def test_steps_spread_contiguously_over_ranks():
    assert assign_steps(4, 4) == [[0], [1], [2], [3]]
    assert assign_steps(4, 2) == [[0, 1], [2, 3]]
    assert assign_steps(4, 3) == [[0, 1], [2], [3]]
    assert assign_steps(5, 3) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="ranks"):
        assign_steps(3, 4)


def test_launch_command_and_environment():
    cmd = torchrun_command(3, 29123)
    assert cmd[:2] == [sys.executable, str(TORCHRUN_ENTRY)]  # torchrun, its stores bound (distributed/torchrun.py)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "3" and cmd[cmd.index("--master-addr") + 1] == "127.0.0.1"
    assert cmd[-1].endswith("distributed/worker.py") and all(isinstance(a, str) for a in cmd)
    base = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1", "PATH": "/bin"}
    env, backend = worker_env(PoolOptions(workers=2, backend="gloo"), "unix:/x", "tok", base)
    assert backend == "gloo" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(env)
    assert env["PATH"] == "/bin" and env[protocol.ENV_PARENT_PID] == str(os.getpid())
    env, backend = worker_env(PoolOptions(workers=2, gpus=(1, 3), nccl_p2p_disable=True), "unix:/x", "tok", {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert backend == "nccl" and env["CUDA_VISIBLE_DEVICES"] == "5,7" and env["NCCL_P2P_DISABLE"] == "1"


def test_several_machines_join_a_c10d_rendezvous_hosted_by_the_head():
    head = torchrun_command(2, nnodes=3, rdzv_endpoint="10.0.0.5:29400", rdzv_id="job", join_timeout_s=120)
    assert head[head.index("--nnodes") + 1] == "3" and "--master-addr" not in head
    assert head[head.index("--rdzv-backend") + 1] == "c10d" and head[head.index("--rdzv-endpoint") + 1] == "10.0.0.5:29400"
    assert head[head.index("--rdzv-id") + 1] == "job" and head[head.index("--rdzv-conf") + 1] == "is_host=1,join_timeout=120"
    opts = AgentOptions(rdzv_endpoint="10.0.0.5:29400", nnodes=3, nproc_per_node=2, rdzv_id="job", gpus=(2, 3))
    cmd = agent_command(opts)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and cmd[cmd.index("--rdzv-conf") + 1].startswith("is_host=0")
    assert cmd[-1].endswith("distributed/worker.py") and all(isinstance(a, str) for a in cmd)
    base = {"RANK": "0", "MASTER_ADDR": "x", protocol.ENV_TOKEN: "stale", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    env = agent_env(AgentOptions(rdzv_endpoint="h:1", nnodes=2, nproc_per_node=2, gpus=(1, 3), nccl_p2p_disable=True), base)
    assert env["CUDA_VISIBLE_DEVICES"] == "5,7" and env["NCCL_P2P_DISABLE"] == "1"
    assert not {"RANK", "MASTER_ADDR", protocol.ENV_TOKEN} & set(env)
    assert agent_env(AgentOptions(rdzv_endpoint="h:1", nnodes=2, cpu=True), base)["CUDA_VISIBLE_DEVICES"] == ""
    # the head's channel: loopback unless exposed; a wildcard is dialled at the rendezvous host
    multi = dict(nnodes=2, rdzv_endpoint="10.0.0.5:29400", channel="tcp")
    assert channel_address(PoolOptions(**multi), 5000) == "tcp:127.0.0.1:5000"
    assert channel_address(PoolOptions(**multi, channel_host="0.0.0.0"), 5000) == "tcp:10.0.0.5:5000"
    assert channel_address(PoolOptions(**multi, channel_host="192.168.1.2"), 5000) == "tcp:192.168.1.2:5000"
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        PoolOptions(nnodes=2, channel="tcp")
    with pytest.raises(ValueError, match="tcp"):
        PoolOptions(nnodes=2, rdzv_endpoint="10.0.0.5:29400")
    with pytest.raises(ValueError, match="HOST:PORT"):
        AgentOptions(rdzv_endpoint="10.0.0.5", nnodes=2)
    with pytest.raises(ValueError, match="loopback"):
        protocol.connect("tcp:10.0.0.5:1")  # only a rank told by torchrun's store dials another machine


def test_an_agent_finds_the_heads_model_files_in_its_own_models_folder(tmp_path, monkeypatch):
    from liveavatar_pack.distributed.runtime import local_file

    here = tmp_path / "agent_models" / "diffusion_models" / "wan" / "dit.safetensors"
    here.parent.mkdir(parents=True)
    here.write_bytes(b"x")
    assert local_file(str(here), "wan/dit.safetensors", "diffusion_models") == str(here)  # same path everywhere
    head_path = "/head/ComfyUI/models/diffusion_models/wan/dit.safetensors"
    monkeypatch.setenv(protocol.ENV_MODEL_DIRS, str(tmp_path / "agent_models"))
    assert local_file(head_path, "wan/dit.safetensors", "diffusion_models") == str(here)
    assert local_file(None, None, "loras") is None
    with pytest.raises(FileNotFoundError, match="--models"):
        local_file("/head/ComfyUI/models/loras/l.safetensors", "l.safetensors", "loras")


def test_channel_messages_carry_tensors_and_plain_data_only():
    msg = {"type": "job", "x": torch.arange(3), "cfg": {"steps": 4, "range": (4, 30)}, "none": None}
    back = protocol.decode(protocol.encode(msg))
    assert torch.equal(back["x"], msg["x"]) and back["cfg"] == msg["cfg"] and back["none"] is None

    buf = io.BytesIO()
    torch.save({"type": "job", "obj": NotPlainData()}, buf)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        protocol.decode(buf.getvalue())
    with pytest.raises(ValueError, match="malformed"):  # plain data, but not a message
        protocol.decode(_encoded([1, 2]))


def test_workers_build_the_model_from_a_checkpoint_through_the_loader(tmp_path):
    import dataclasses

    from safetensors.torch import save_file

    from liveavatar_pack.distributed.runtime import build_model

    model = tiny_transformer(MODEL_SEED)
    path = tmp_path / "dit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    spec = model_spec(str(path)) | {"precision": "fp32", "config": dataclasses.asdict(TINY)}
    built = build_model(spec, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), built.state_dict().values()))


def test_a_rank_runs_code_named_by_the_channel_only_when_allowed(tmp_path):
    """A ``callable`` spec imports what it names: a rank on another machine (its channel came from torchrun's
    unauthenticated store) refuses it before importing anything; ``init`` sets only the known NCCL advice."""
    from liveavatar_pack.distributed.runtime import advised_env, build_model

    marker = tmp_path / "imported"
    target = tmp_path / "planted.py"
    target.write_text(f"open({str(marker)!r}, 'w').close()\ndef model():\n    raise AssertionError('ran')\n")
    spec = {"kind": "callable", "target": f"{target}:model"}
    with pytest.raises(PermissionError, match=protocol.ENV_ALLOW_CALLABLE):
        build_model(spec, torch.device("cpu"), allow_callable=False)
    assert not marker.exists()
    with pytest.raises(AssertionError, match="ran"):  # allowed (the head's own ranks): imported and called
        build_model(spec, torch.device("cpu"), allow_callable=True)
    assert marker.exists()
    assert advised_env({"NCCL_P2P_DISABLE": "1"}) == {"NCCL_P2P_DISABLE": "1"}
    assert advised_env({}) == {}
    for bad in ({"LD_PRELOAD": "/tmp/x.so"}, {"NCCL_NET_PLUGIN": "/tmp/x.so"}, {"NCCL_P2P_DISABLE": "1; x"}):
        with pytest.raises(PermissionError, match="may not set"):
            advised_env(bad)


def test_teardown_never_signals_a_pid_outside_the_pools_session():
    """Worker pids are forgotten once the pool is down: a later close (or start) must not kill whatever
    process has reused one of those pids since."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pool = WorkerPool(PoolOptions(model="tiny:0", workers=2))
        pool.worker_pids = {0: bystander.pid}  # as left behind by a pool that was shut down earlier
        pool.close()
        pool.close()
        assert bystander.poll() is None and pool.worker_pids == {}
    finally:
        bystander.kill()
        bystander.wait()


def test_pool_reuse_follows_the_model_configuration():
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2))
    assert not pool.reconfigure(PoolOptions(model={"kind": "tiny", "seed": 1}, workers=2, idle_timeout_s=5))
    assert pool.reconfigure(PoolOptions(model="tiny:2", workers=2))
    assert pool.reconfigure(PoolOptions(model="tiny:2", workers=2, mode="sp"))


# ----------------------------------------------------------------------------- processes
@pytest.fixture(scope="module")
def reference():
    return single_process(2)


@pytest.fixture(scope="module")
def tpp2():
    with WorkerPool(PoolOptions(model=f"tiny:{MODEL_SEED}", workers=2, mode="tpp", collective_timeout_s=60)) as pool:
        yield pool


@pytest.mark.distributed
def test_tpp_two_ranks_equal_single_process(tpp2, reference):
    out, stats = distributed(tpp2, 2)
    assert len(out) == len(reference) and all(torch.equal(a, b) for a, b in zip(out, reference))
    blocks = len(reference)
    assert {r: s["steps"] for r, s in stats.items()} == {0: [0, 1], 1: [2, 3]}
    assert all(s["dit_calls"] == len(s["steps"]) * blocks for s in stats.values())
    assert all(s["calls_per_step"] == {step: blocks for step in s["steps"]} for s in stats.values())


@pytest.mark.distributed
def test_tpp_three_ranks_equal_single_process_and_overlap(reference):
    with WorkerPool(PoolOptions(model=f"tiny:{MODEL_SEED}", workers=3, mode="tpp", collective_timeout_s=60)) as pool:
        out, stats = distributed(pool, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    assert {r: s["steps"] for r, s in stats.items()} == {0: [0, 1], 1: [2], 2: [3]}
    assert [s["dit_calls"] for _, s in sorted(stats.items())] == [16, 8, 8]
    # pipelining: rank 0 starts block b+1 before the last rank has finished block b
    # (within a clip; clip 1 waits for the last rank's clip-0 reference by design)
    first = {(c, b): t0 for c, b, t0, _ in stats[0]["block_times"]}
    last = {(c, b): t1 for c, b, _, t1 in stats[2]["block_times"]}
    pairs = [((c, b), (c, b + 1)) for c in range(2) for b in range(3)]
    assert all(first[nxt] < last[cur] for cur, nxt in pairs), (first, last)


@pytest.mark.distributed
def test_sp_two_ranks_equal_single_process_with_split_caches_and_weights(reference):
    single_model = tiny_transformer(MODEL_SEED)
    text, audio, sink = inputs(2)
    single = StreamingSampler(single_model, SamplerConfig(), text, audio, sink, seed=0)
    single_kv = sum(w.cache.nbytes() for w in single.workers)
    single_params = sum(p.nbytes for p in single_model.parameters())
    with WorkerPool(PoolOptions(model=f"tiny:{MODEL_SEED}", workers=2, mode="sp", collective_timeout_s=60)) as pool:
        out, stats = distributed(pool, 2)
        # an interrupt: both ranks agree on the block (they exchange a flag before each one)
        seen = []
        sampler = DistributedSampler(pool, SamplerConfig(), *inputs(3), seed=0,
                                     check_cancel=lambda: (_ for _ in ()).throw(Cancelled()) if seen else None)
        with pytest.raises(Cancelled):
            for block in sampler.blocks(3):
                seen.append(block)
        stops = {r: s["stopped_at"] for r, s in pool.last_stats.items()}
        assert len(set(stops.values())) == 1 and stops[0] is not None and stops[0] >= (0, 1), stops
    for a, b in zip(out, reference):
        assert (a - b).abs().max().item() <= 2e-5 * max(1.0, b.abs().max().item())
    for rank, s in stats.items():
        assert s["heads"] == (2 * rank, 2 * rank + 2)
        assert s["dit_calls"] == 4 * len(reference)
        assert s["kv_cache_bytes"] * 2 == single_kv
        assert s["all_to_alls"] > 0 and s["all_to_all_bytes"] > 0
        for between in s["param_bytes_between_blocks"]:
            assert between["unsharded_alive"] == 0
            assert between["sharded_full"] >= 0.9 * single_params  # nearly everything is sharded
            assert abs(between["sharded_local"] * 2 - between["sharded_full"]) <= 0.01 * between["sharded_full"]
            assert between["resident"] <= 0.55 * single_params


@pytest.mark.distributed
def test_interrupt_stops_every_rank_at_one_block_then_pool_runs_again(tpp2):
    clips, seen = 3, []
    starts = tpp2.starts

    def check_cancel():
        if len(seen) >= 2:
            raise Cancelled("user interrupt")

    text, audio, sink = inputs(clips)
    sampler = DistributedSampler(tpp2, SamplerConfig(), text, audio, sink, seed=0, check_cancel=check_cancel)
    with pytest.raises(Cancelled):
        for block in sampler.blocks(clips):
            seen.append(block)
    stops = {r: s["stopped_at"] for r, s in tpp2.last_stats.items()}
    assert len(set(stops.values())) == 1 and None not in stops.values(), stops
    stop = stops[0]
    assert (0, 2) <= stop < (clips, 0)
    # every rank did exactly the blocks before the agreed one
    for s in tpp2.last_stats.values():
        assert [tuple(t[:2]) for t in s["block_times"]][-1] < stop
        assert len(s["block_times"]) == stop[0] * 4 + stop[1]
    out, _ = distributed(tpp2, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, single_process(2)))
    assert tpp2.starts == starts  # the same warm workers


@pytest.mark.distributed
def test_killed_rank_fails_fast_and_next_run_starts_fresh(tpp2, reference):
    tpp2.start()
    starts, victim = tpp2.starts, tpp2.worker_pids[1]
    text, audio, sink = inputs(6)
    sampler = DistributedSampler(tpp2, SamplerConfig(), text, audio, sink, seed=0)
    t_kill = None
    with pytest.raises(WorkerError) as err:
        for _ in sampler.blocks(6):
            if t_kill is None:
                os.kill(victim, signal.SIGKILL)
                t_kill = time.monotonic()
    assert time.monotonic() - t_kill < 10
    assert "died" in str(err.value) or "failed" in str(err.value)
    assert not tpp2.running
    out, _ = distributed(tpp2, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    assert tpp2.starts == starts + 1 and tpp2.worker_pids[1] != victim


@pytest.mark.distributed
def test_rank_that_raises_reports_its_traceback():
    """The caller gets the rank's error and traceback and the pool ends. Only a hang fails on time (a
    generous 300 s, 5x the collective timeout); the latency is measured by bench/bench_fault.py."""
    spec = {"kind": "callable", "target": f"{Path(__file__).resolve()}:faulty_model",
            "kwargs": {"seed": MODEL_SEED, "rank": 1, "after": 3}}
    with WorkerPool(PoolOptions(model=spec, workers=2, collective_timeout_s=60, channel="tcp")) as pool:
        outcome: dict = {}

        def run():
            try:
                distributed(pool, 2)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = exc

        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        caller.join(timeout=300)
        assert not caller.is_alive(), "the run did not end after a rank raised (no error reached the caller)"
        err = outcome.get("error")
        assert isinstance(err, WorkerError), f"expected a WorkerError, got {err!r}"
        assert err.rank == 1 and "injected fault in forward_block" in err.traceback_tail
        assert not pool.running


@pytest.mark.distributed
def test_idle_pool_times_out():
    pool = WorkerPool(PoolOptions(model="tiny:0", workers=2, idle_timeout_s=1)).start()
    pids = [pool.agent_pid, *pool.worker_pids.values()]
    deadline = time.monotonic() + 15
    while pool.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pool.running
    assert all(_gone(pid) for pid in pids)


PARENT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys, time
    spec = importlib.util.spec_from_file_location("_b", {bootstrap!r})
    b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); b.load_pack({root!r})
    from liveavatar_pack.distributed.launcher import PoolOptions, WorkerPool
    pool = WorkerPool(PoolOptions(model="tiny:1", workers=2)).start()
    print(json.dumps({{"agent": pool.agent_pid, "workers": list(pool.worker_pids.values())}}), flush=True)
    time.sleep(120)
    """
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.distributed
def test_killed_parent_leaves_no_worker(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(bootstrap=str(ROOT / "liveavatar" / "bootstrap.py"), root=str(ROOT)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = parent.stdout.readline()
        pids = json.loads(line)
        children = [pids["agent"], *pids["workers"]]
        assert all(not _gone(pid) for pid in children)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.2)
    left = [pid for pid in children if not _gone(pid)]
    for pid in left:  # do not leave them behind even when failing
        os.kill(pid, signal.SIGKILL)
    assert not left


@pytest.mark.distributed
def test_two_machines_on_loopback_give_the_single_process_result(reference, tmp_path):
    """A head pool (nnodes=2, one worker) and a `worker-agent` process (one worker) as the second machine;
    the agent's rounds leave nothing in its temp folder (torchrun's torchelastic_* log folders)."""
    endpoint = f"127.0.0.1:{free_port()}"
    agent = subprocess.Popen(
        [sys.executable, "-m", "liveavatar", "worker-agent", "--rdzv-endpoint", endpoint, "--nnodes", "2",
         "--nproc-per-node", "1", "--cpu"],
        env={**os.environ, protocol.ENV_ALLOW_CALLABLE: "1", "TMPDIR": str(tmp_path)},  # runs the test's model function
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    spec = {"kind": "callable", "target": f"{Path(__file__).resolve()}:nccl_advised_model", "kwargs": {"seed": MODEL_SEED}}
    opts = PoolOptions(model=spec, workers=1, nnodes=2, rdzv_endpoint=endpoint, channel="tcp", nccl_p2p_disable=True,
                       collective_timeout_s=60, start_timeout_s=120)
    seen: set[int] = {agent.pid}

    def note(pool):
        seen.update([pool.agent_pid, *pool.worker_pids.values()])
        seen.update(p.pid for p in psutil.Process(agent.pid).children(recursive=True))

    try:
        with WorkerPool(opts) as pool:
            note(pool)
            assert pool.world == 2 and len(pool.remote_ranks) == 1  # one rank came through the agent
            out, stats = distributed(pool, 2)
            assert all(torch.equal(a, b) for a, b in zip(out, reference))
            assert {r: s["steps"] for r, s in stats.items()} == {0: [0, 1], 1: [2, 3]}
            # the pool released (GPUs freed, idle timeout): the agent rejoins the head's next one
            pool.close()
            pool.start()
            note(pool)
            out, _ = distributed(pool, 2)
            assert all(torch.equal(a, b) for a, b in zip(out, reference))
            assert pool.starts == 2
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        log = agent.communicate()[0] if agent.stdout else ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not all(_gone(pid) for pid in seen):
        time.sleep(0.2)
    left = [pid for pid in seen if not _gone(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, log[-3000:]
    assert not list(tmp_path.iterdir()), f"the agent left {sorted(p.name for p in tmp_path.iterdir())}"


@pytest.mark.distributed
def test_tpp_decode_rank_streams_the_single_process_frames_and_stops_with_the_others():
    """2 DiT ranks + a decode rank holding the tiny VAE: the frames equal the single-process VideoStream's,
    the decode rank never runs the DiT, an interrupt stops it with the others, and killing it fails fast."""
    from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream
    from liveavatar_pack.liveavatar.tiny import tiny_vae

    clips, cfg = 2, SamplerConfig()
    text, audio, sink = inputs(clips)
    cond = Conditioning(text, audio, sink, H * 8, W * 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = list(VideoStream(tiny_transformer(MODEL_SEED), tiny_vae(3), cond, cfg, seed=0, num_clips=clips))
    finally:
        torch.set_num_threads(threads)
    opts = PoolOptions(model=f"tiny:{MODEL_SEED}", workers=2, mode="tpp", collective_timeout_s=60, decode_rank=True)
    assert opts.key() != dataclasses.replace(opts, decode_rank=False).key()
    with pytest.raises(ValueError, match="decode_rank"):
        PoolOptions(workers=2, mode="sp", decode_rank=True)
    pool = WorkerPool(opts)
    try:
        sampler = DistributedSampler(pool, cfg, text, audio, sink, seed=0, vae={"kind": "tiny_vae", "seed": 3})
        stream = VideoStream(None, None, cond, cfg, seed=0, num_clips=clips, frame_source=sampler.frames)
        chunks = list(stream)
        pids = list(pool.worker_pids.values()) + [pool.agent_pid]
        assert len(pool.worker_pids) == 3
        assert [(c.clip, c.block, c.first_frame, c.blocks_done) for c in chunks] == \
            [(c.clip, c.block, c.first_frame, c.blocks_done) for c in single]
        assert all(a.frames.dtype == torch.uint8 and torch.equal(a.frames, b.frames) for a, b in zip(chunks, single))
        assert sum(c.frames.shape[0] for c in chunks) == stream.total_frames > 0 and len(chunks) == len(single) == 8
        stats = sampler.stats
        assert stats[2]["dit_calls"] == 0 and stats[2]["steps"] == [] and len(stats[2]["block_times"]) == 8
        assert {r: s["steps"] for r, s in stats.items() if r < 2} == {0: [0, 1], 1: [2, 3]}
        assert pool.ready_info[2].get("decode_rank") and pool.ready_info[2]["param_bytes"] == 0
        with pytest.raises(ValueError, match="decode rank"):
            next(iter(sampler.blocks(clips)))

        # an interrupt stops the decode rank at the block the DiT ranks stop at; the pool stays warm
        seen, starts = [], pool.starts
        text3, audio3, sink3 = inputs(3)
        cancelling = DistributedSampler(pool, cfg, text3, audio3, sink3, seed=0, vae={"kind": "tiny_vae", "seed": 3},
                                        check_cancel=lambda: (_ for _ in ()).throw(Cancelled()) if len(seen) >= 2 else None)
        with pytest.raises(Cancelled):
            for chunk in cancelling.frames(3):
                seen.append(chunk)
        stops = {r: s["stopped_at"] for r, s in pool.last_stats.items()}
        assert len(stops) == 3 and len(set(stops.values())) == 1 and None not in stops.values(), stops
        again = list(DistributedSampler(pool, cfg, text, audio, sink, seed=0, vae={"kind": "tiny_vae", "seed": 3}).frames(clips))
        assert all(torch.equal(a.frames, b.frames) for a, b in zip(again, single)) and pool.starts == starts

        # the decode rank dies: the run fails fast, like for any rank
        victim = pool.worker_pids[2]
        t_kill = None
        with pytest.raises(WorkerError) as err:
            for _ in DistributedSampler(pool, cfg, *inputs(6), seed=0, vae={"kind": "tiny_vae", "seed": 3}).frames(6):
                if t_kill is None:
                    os.kill(victim, signal.SIGKILL)
                    t_kill = time.monotonic()
        assert time.monotonic() - t_kill < 10 and not pool.running
        assert "died" in str(err.value) or "failed" in str(err.value)
    finally:
        pool.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
