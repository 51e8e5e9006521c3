"""The distributed nodes against the ComfyUI test double: the launcher's model drives the Clip Sampler on
torchrun workers (gloo on the CPU) with the local result, ComfyUI's interrupt stops every rank at one
block and the pool stays warm for the next prompt, and 'Release Workers' frees the workers."""
from __future__ import annotations

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from node_env import comfy_double, run

SIZE = "256*256"
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from liveavatar_pack.cli.tiny_models import write_tiny_models

    base = tmp_path_factory.mktemp("comfy")
    write_tiny_models(base / "models")
    with comfy_double(base) as e:
        try:
            yield e
        finally:
            from liveavatar_pack.distributed.launcher import release_shared_pool

            release_shared_pool()


@pytest.fixture(scope="module")
def graph(env):
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.nodes import conditioning, loaders

    g = {}
    g["vae"] = run(loaders.VAELoader, vae_name=tm.VAE_FILE)[0]
    te = run(loaders.TextEncoderLoader, text_encoder_name=tm.TEXT_FILE, tokenizer=tm.TOKENIZER_DIR)[0]
    ae = run(loaders.AudioEncoderLoader, audio_encoder_name=tm.AUDIO_FILE)[0]
    img = np.asarray(Image.open(env.base / "models" / "input" / tm.IMAGE_FILE).convert("RGB"), dtype=np.float32) / 255
    t = torch.arange(int(2.2 * 22050)) / 22050
    wave = torch.stack([torch.sin(2 * np.pi * 220 * t), torch.sin(2 * np.pi * 330 * t)]) * 0.3
    g["text"] = run(conditioning.TextEncode, prompt="A person speaks", text_encoder=te)[0]
    g["audio"] = run(conditioning.AudioEncode, audio={"waveform": wave[None], "sample_rate": 22050}, audio_encoder=ae)[0]
    g["ref"] = run(conditioning.ReferenceImage, image=torch.from_numpy(img)[None], vae=g["vae"], size=SIZE)[0]
    g["local"] = run(loaders.ModelLoader, dit_name=tm.DIT_FILES[0], lora_name=tm.LORA_FILE, precision="fp32")[0]
    return g


@pytest.fixture(scope="module")
def launched(env, graph):
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.nodes import distributed

    return run(distributed.DistributedLauncher, dit_name=tm.DIT_FILES[0], lora_name=tm.LORA_FILE, precision="fp32",
               gpus="cpu", mode="tpp", workers=2, idle_timeout_min=0, threads_per_worker=1)[0]


def sample(graph, model, **kw):
    from liveavatar_pack.nodes import sampling

    args = dict(model=model, text=graph["text"], audio=graph["audio"], reference=graph["ref"], seed=7, num_clips=1,
                frames_per_clip=48, steps=2)
    args.update(kw)
    return run(sampling.ClipSampler, **args)[0]


def latents_of(stream) -> list[torch.Tensor]:
    """Every block of the handle as a consumer reads it (ComfyUI's interrupt checked; replayed when complete).

    The decode/save nodes read the same iterator; the VAE is left out where only latents matter (it is slow)."""
    from liveavatar_pack.nodes import runtime

    out = [b.latents for b in stream.blocks(check_cancel=runtime.check_interrupt)]
    assert stream.complete
    return out


def local_reference(graph, **kw) -> list[torch.Tensor]:
    """The in-process run on one thread, like each worker (the same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return latents_of(sample(graph, graph["local"], **kw))
    finally:
        torch.set_num_threads(threads)


def shared():
    from liveavatar_pack.distributed import launcher

    return launcher._SHARED.get("pool")


class CancelOnArrival:
    """Wraps a block backend: presses ComfyUI's Cancel when block ``at`` arrives from the workers.

    (Before the consumer decodes it: the VAE is slow on a CPU, and the ranks would finish the
    whole video while it decodes earlier blocks.)"""

    def __init__(self, inner, mm, at: int):
        self.inner, self.mm, self.at = inner, mm, at

    def blocks(self, *args):
        for i, block in enumerate(self.inner.blocks(*args)):
            if i == self.at:
                self.mm.interrupt_current_processing(True)
            yield block


# ------------------------------------------------------------------------------------ schemas
def test_nodes_are_registered_and_the_launcher_feeds_the_sampler(env):
    from liveavatar_pack.nodes import distributed, sampling

    ids = {n.define_schema().node_id for n in env.nodes.all_nodes()}
    assert {"LiveAvatarDistributedLauncher", "LiveAvatarReleaseWorkers"} <= ids
    out = distributed.DistributedLauncher.define_schema().outputs[0].io_type
    model_in = next(i for i in sampling.ClipSampler.define_schema().inputs if i.id == "model")
    assert out == model_in.io_type == "LIVEAVATAR_MODEL"
    for node in distributed.NODES:
        schema = node.define_schema()
        assert schema.category == "LiveAvatar" and all(i.tooltip for i in schema.inputs)


def test_gpu_choice_and_pool_options(env):
    from liveavatar_pack.nodes.distributed import parse_gpus, pool_options

    assert parse_gpus("0,1,2,3", 0) == ((0, 1, 2, 3), 4)
    assert parse_gpus("4", 0) == ((0, 1, 2, 3), 4)
    assert parse_gpus("2-5", 2) == ((2, 3), 2)
    assert parse_gpus("cpu", 0) == (None, 2)
    with pytest.raises(ValueError, match="need 3 GPUs"):
        parse_gpus("0,1", 3)
    with pytest.raises(ValueError, match="GPU ids"):
        parse_gpus("first two", 0)
    opts = pool_options("/m/dit.safetensors", "dit.safetensors", None, None, "fp8", "0,1", 0, "sp", 10, 0, 2,
                        "192.168.1.10:29400", "0.0.0.0", True)
    assert (opts.workers, opts.gpus, opts.mode, opts.nnodes, opts.channel, opts.idle_timeout_s) == (2, (0, 1), "sp", 2, "tcp", 600)
    assert opts.nccl_p2p_disable and opts.model["precision"] == "fp8" and opts.model["name"] == "dit.safetensors"
    local = pool_options("/m/dit.safetensors", "dit.safetensors", None, None, "bf16", "cpu", 2, "tpp", 0)
    assert local.channel == "unix" and local.backend == "gloo" and local.idle_timeout_s is None
    with pytest.raises(ValueError, match="at least 2"):
        pool_options("/m/d", "d", None, None, "bf16", "1", 0, "tpp", 0)


def test_missing_gpus_are_refused_before_anything_starts(env, monkeypatch):
    """The multi-GPU example's '0,1,2,3' on a machine without them: one line saying what was found and what to
    set, raised before torchrun (or any socket) is started, with a short error type name."""
    from liveavatar_pack.cli import tiny_models as tm
    from liveavatar_pack.distributed import launcher
    from liveavatar_pack.nodes import distributed

    def no_spawn(*args, **kwargs):
        raise AssertionError(f"a process was spawned: {args}")

    monkeypatch.setattr(launcher.subprocess, "Popen", no_spawn)
    monkeypatch.setattr(launcher.tempfile, "mkdtemp", no_spawn)
    kw = dict(dit_name=tm.DIT_FILES[0], lora_name=tm.LORA_FILE, precision="bf16", gpus="0,1,2,3", mode="tpp", workers=0,
              idle_timeout_min=0)
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 0)
    with pytest.raises(launcher.GPUsNotFound) as err:
        run(distributed.DistributedLauncher, **kw)
    text = str(err.value)
    assert "\n" not in text and "GPU 0,1,2,3 not found" in text and "sees no CUDA GPU" in text and "'cpu'" in text
    monkeypatch.setattr(launcher, "_cuda_count", lambda: 2)
    with pytest.raises(launcher.GPUsNotFound, match=r"GPU 2,3 not found; .*sees 2 CUDA GPUs.*ids 0,1.*'0,1'"):
        run(distributed.DistributedLauncher, **kw)
    with pytest.raises(launcher.GPUsNotFound, match="GPU 2,3 not found"):  # the pool itself checks too
        launcher.WorkerPool(launcher.PoolOptions(workers=4, gpus=(0, 1, 2, 3))).start()


def test_errors_print_a_short_type_name(env):
    """ComfyUI shows ``type.__module__ + '.' + type.__qualname__``: not the pack's folder path."""
    from liveavatar_pack.distributed import launcher
    from liveavatar_pack.model_loaders.formats import ModelFileError
    from liveavatar_pack.nodes import runtime

    classes = runtime.short_error_names()
    assert {launcher.WorkerError, launcher.GPUsNotFound, ModelFileError} <= set(classes)
    for cls in classes:
        assert f"{cls.__module__}.{cls.__qualname__}" == f"liveavatar.{cls.__name__}"


# ------------------------------------------------------------------------------------ running
def test_launcher_model_gives_the_local_result_on_two_workers(env, graph, launched):
    from liveavatar_pack.nodes import output

    pool = shared()
    assert pool is not None and pool.running and pool.world == 2  # started by the launcher node
    stream = sample(graph, launched)
    images, _ = run(output.Decode, vae=graph["vae"], latents=stream)  # the node drives the workers
    assert images.shape[0] == stream.total_frames and stream.complete
    assert {r: s["steps"] for r, s in stream.backend.stats.items()} == {0: [0], 1: [1]}  # really on the workers
    ref = local_reference(graph)
    assert all(torch.equal(a, b) for a, b in zip(latents_of(stream), ref)) and len(ref) == 4


def test_interrupt_stops_every_rank_at_one_block_and_the_next_prompt_reuses_the_pool(env, graph, launched):
    from liveavatar_pack.nodes import output

    pool = shared()
    starts, pids = pool.starts, dict(pool.worker_pids)
    stream = sample(graph, launched, num_clips=3, seed=3)
    stream.backend = CancelOnArrival(stream.backend, env.mm, at=0)
    with pytest.raises(env.mm.InterruptProcessingException):
        run(output.Decode, vae=graph["vae"], latents=stream)
    stops = {r: s["stopped_at"] for r, s in pool.last_stats.items()}
    assert len(stops) == 2 and len(set(stops.values())) == 1, stops  # every rank stopped at the same block
    assert stops[0] is not None and (0, 1) <= tuple(stops[0]) < (3, 0), stops  # mid-run, after the delivered block
    assert not stream.complete and pool.running
    # the next prompt: the same warm workers, a complete result
    stream.backend = stream.backend.inner
    assert len(latents_of(stream)) == 12
    assert pool.starts == starts and pool.worker_pids == pids
    assert shared() is pool


def test_release_frees_the_workers_and_a_cached_launcher_output_starts_them_again(env, graph, launched):
    from liveavatar_pack.nodes import distributed

    pool = shared()
    pool.start()
    pids = [pool.agent_pid, *pool.worker_pids.values()]
    run(distributed.ReleaseWorkers)
    assert shared() is None and not pool.running
    assert all(_gone(pid) for pid in pids)
    # ComfyUI reuses the launcher's cached output: the sampler's run starts a fresh pool
    out = latents_of(sample(graph, launched, seed=5))
    assert shared() is not None and shared().running and shared() is not pool
    assert all(torch.equal(a, b) for a, b in zip(out, local_reference(graph, seed=5)))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
