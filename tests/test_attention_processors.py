"""Attention processors: layouts plug in through ``set_processor``, never by rebinding layer methods."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from liveavatar_pack.distributed.launcher import free_port
from liveavatar_pack.distributed.sharding import shard_model
from liveavatar_pack.liveavatar.attention import AttnProcessor, ProcessorWrapper, WeightsGuard, unwrap
from liveavatar_pack.liveavatar.config import SamplerConfig
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio
from liveavatar_pack.liveavatar.tiny import TINY_LATENT_HW, tiny_transformer
from liveavatar_pack.liveavatar.transformer import SelfAttention
from liveavatar_pack.model_loaders.placement import PlacementConfig, apply_placement

H, W = TINY_LATENT_HW


def _blocks(model, clips=1):
    gen = torch.Generator().manual_seed(5)
    sink = SinkInputs(torch.randn(16, 1, H, W, generator=gen), torch.randn(16, 19, H, W, generator=gen))
    audio = TensorAudio(torch.randn(1, model.cfg.num_audio_layers, model.cfg.audio_dim, 48 * clips + 6, generator=gen))
    text = torch.randn(7, model.cfg.text_dim, generator=gen)
    return [b.latents for b in StreamingSampler(model, SamplerConfig(), text, audio, sink, seed=0).blocks(clips)]


def _patched_methods(model) -> list[str]:
    """Layer methods rebound on instances (the old mechanism): must be none."""
    return [f"{name}.{attr}" for name, m in model.named_modules() for attr in ("forward", "context_kv", "qkv", "out")
            if attr in vars(m)]


class Counting(ProcessorWrapper):
    def __init__(self, inner):
        super().__init__(inner)
        self.calls = {"self": 0, "cross": 0, "kv": 0}

    def self_attention(self, attn, x, attend):
        self.calls["self"] += 1
        return super().self_attention(attn, x, attend)

    def cross_attention(self, attn, x, kv):
        self.calls["cross"] += 1
        return super().cross_attention(attn, x, kv)

    def context_kv(self, attn, context):
        self.calls["kv"] += 1
        return super().context_kv(attn, context)


def test_every_attention_layer_runs_through_its_processor_bitwise():
    reference = _blocks(tiny_transformer(1))
    model = tiny_transformer(1)
    layers = model.attention_layers()
    cfg = model.cfg
    assert len(layers) == 2 * cfg.num_layers + len(cfg.audio_inject_layers)
    assert all(isinstance(layer.processor, AttnProcessor) for layer in layers)
    counter = Counting(layers[0].processor)
    previous = [layer.set_processor(counter) for layer in layers]
    out = _blocks(model)
    assert all(torch.equal(a, b) for a, b in zip(out, reference))
    calls_per_block = SamplerConfig().steps * cfg.num_layers
    assert counter.calls["self"] > calls_per_block and counter.calls["cross"] > calls_per_block
    assert counter.calls["kv"] >= cfg.num_layers  # the text keys/values, and the audio injectors' per call
    for layer, p in zip(layers, previous):
        layer.set_processor(p)
    assert all(layer.processor is p for layer, p in zip(layers, previous))


def test_block_swap_guards_context_kv_with_a_processor_and_removes_it():
    model = tiny_transformer(1)
    reference = _blocks(tiny_transformer(1))
    placed = apply_placement(model, PlacementConfig(device="cpu", blocks_on_device=2), guard=True)
    assert _patched_methods(model) == []
    swapped = [b for b in model.blocks if unwrap(b.cross_attn.processor, WeightsGuard) is not None]
    assert len(swapped) == model.cfg.num_layers - 1  # every swapped block's text k/v goes through a guard
    with placed.in_use():
        assert all(torch.equal(a, b) for a, b in zip(_blocks(model), reference))
    placed.remove()
    assert all(type(b.cross_attn.processor) is AttnProcessor for b in model.blocks)


def test_fsdp_sharding_installs_processors_not_patched_methods():
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = tiny_transformer(1)
        reference = _blocks(tiny_transformer(1))
        shard_model(model, init_device_mesh("cpu", (1,)))
        assert _patched_methods(model) == []
        assert all(isinstance(b.cross_attn.processor, WeightsGuard) for b in model.blocks)
        assert all(isinstance(i.processor, WeightsGuard) for i in model.audio_injector.injector)
        out = _blocks(model)
        assert all(torch.equal(a, b) for a, b in zip(out, reference))
    finally:
        dist.destroy_process_group()


def test_processor_is_not_a_submodule():
    """A processor holds no parameters of the layer: state_dict keys stay upstream's."""
    layer = SelfAttention(8, 2, 1e-6)
    layer.set_processor(Counting(layer.processor))
    assert sorted(layer.state_dict()) == sorted(SelfAttention(8, 2, 1e-6).state_dict())
    with pytest.raises(AttributeError):
        layer.processor.weight  # noqa: B018
