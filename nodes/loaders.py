"""Loader nodes: DiT (+ LoRA, precision, placement), VAE, text encoder (+ tokenizer), audio encoder.

Each node resolves a file in ComfyUI's model folders, hands it to ``model_loaders`` (which owns
every file format and its error messages) and wraps the result for model management.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from comfy_api.latest import io

from ..model_loaders.encoder_precision import PRECISIONS as ENCODER_PRECISIONS
from ..model_loaders.encoder_precision import TEXT_PRECISIONS
from ..model_loaders.encoder_precision import resolve as resolve_precision
from . import runtime, types

PRECISIONS = ["bf16", "fp16", "fp8", "fp32"]
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json")
BYTE_TOKENS = "byte tokens (tiny test models)"


# ----------------------------------------------------------------------------------- objects
@dataclass
class LiveAvatarModel:
    """A loaded DiT. ``session()`` yields (model, KV cache storage or None) ready on the device."""

    model: torch.nn.Module
    name: str
    summary: str
    placement: Any = None  # PlacementConfig or None
    placed: Any = None  # PlacedModel when a placement is applied
    managed: Any = None  # runtime.Managed otherwise
    precision: str = "bf16"

    def device_bytes(self, width: int, height: int, cfg) -> int:
        """The planner's peak on the compute device for a run at this size (for ComfyUI to free)."""
        from ..model_loaders.planner import plan_memory

        return plan_memory(self.model.cfg, self.precision, width, height, cfg, self.placement).peak_device

    @contextmanager
    def session(self) -> Iterator[tuple[torch.nn.Module, Any]]:
        if self.placed is not None:
            with self.placed.in_use() as model:
                yield model, self.placed.cache_storage()
        else:
            yield self.managed.load(), None

    @property
    def text_dim(self) -> int:
        return self.model.cfg.text_dim


@dataclass
class LiveAvatarVAE:
    vae: Any  # liveavatar.vae.WanVAE
    name: str
    managed: Any = None

    def load(self):
        if self.managed is not None:
            self.managed.load()
        return self.vae


@dataclass
class LiveAvatarTextEncoder:
    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer, or None for byte tokens
    name: str
    managed: Any = None

    def load(self) -> torch.nn.Module:
        return self.managed.load() if self.managed is not None else self.model


@dataclass
class LiveAvatarAudioEncoder:
    model: torch.nn.Module
    name: str
    managed: Any = None

    def load(self) -> torch.nn.Module:
        return self.managed.load() if self.managed is not None else self.model


# ----------------------------------------------------------------------------------- DiT
def load_dit_model(path, lora_path, precision: str, placement, device: torch.device):
    """``model_loaders.dit.load_dit`` (one place to switch loaders): returns (model, summary)."""
    from ..model_loaders.dit import load_dit

    # a placement that swaps or offloads needs the host copy; one that keeps every block resident
    # loads straight to the device, so the host never holds the whole DiT (the planner's load term)
    host_first = placement is not None and (placement.blocks_on_device is not None or placement.offload_model_between_uses)
    target = "cpu" if host_first else device
    model, report = load_dit(path, lora=lora_path, precision=precision, device=target)
    return model, report.summary()


class ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarModelLoader",
            display_name="LiveAvatar Model Loader",
            category=types.CATEGORY,
            description="Loads the Wan2.2-S2V-14B DiT, merges the LiveAvatar LoRA into it and stores it in the chosen precision.",
            inputs=[
                io.Combo.Input("dit_name", options=runtime.dit_files(),
                               tooltip="Wan2.2-S2V-14B DiT from models/diffusion_models (e.g. wan2.2_s2v_14B_bf16.safetensors "
                                       "or the fp8_scaled file, or Wan-AI's sharded index), or a GGUF quantization "
                                       "(*.gguf, also from models/unet; Q8_0 ... Q3_K, kept quantized).", ),
                io.Combo.Input("lora_name", options=[runtime.NONE] + runtime.model_files("loras"),
                               default="liveavatar.safetensors",
                               tooltip="The LiveAvatar LoRA (liveavatar.safetensors from Quark-Vision/Live-Avatar) in models/loras; "
                                       "merged before quantization. 'none' runs the base S2V model (not few-step: poor results)."),
                io.Combo.Input("precision", options=PRECISIONS, default="bf16",
                               tooltip="Weight precision. fp8 halves the weight memory (e4m3 weights, bf16 compute); "
                                       "bf16 is the reference; fp32 only for tests. A GGUF file keeps its quantized "
                                       "weights (the LoRA is then applied at run time); bf16/fp16/fp32 set its compute dtype."),
                types.Placement.Input("placement", optional=True,
                                      tooltip="Optional placement (block swap, KV cache offload) from 'LiveAvatar Placement'; "
                                              "without it the whole model lives on the GPU."),
            ],
            outputs=[types.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, dit_name, lora_name, precision, placement=None) -> io.NodeOutput:
        dit_path = runtime.dit_path(dit_name)
        lora_path = None if lora_name == runtime.NONE else runtime.model_path("loras", lora_name)
        dev = runtime.device()
        if placement is not None and placement.device != str(dev):
            placement = _with_device(placement, dev)
        model, summary = load_dit_model(dit_path, lora_path, precision, placement, dev)
        from ..model_loaders.planner import gguf_type_of

        # the planner counts a GGUF file's weights in its quantized type
        holder = LiveAvatarModel(model, dit_name, summary, placement=placement, precision=gguf_type_of(dit_path) or precision)
        if placement is not None:
            from ..model_loaders.placement import apply_placement

            holder.placed = apply_placement(model, placement)
        else:
            holder.managed = runtime.Managed(model, dit_name)
        return io.NodeOutput(holder)


def _with_device(placement, dev: torch.device):
    import dataclasses

    return dataclasses.replace(placement, device=str(dev))


class Placement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarPlacement",
            display_name="LiveAvatar Placement (low VRAM)",
            category=types.CATEGORY,
            description="Where the DiT's weights and KV caches live: block swap and cache offload for 24 GB cards. "
                        "Use 'LiveAvatar VRAM Plan' to check a setting before loading.",
            inputs=[
                io.Int.Input("blocks_on_device", default=0, min=0, max=64,
                             tooltip="DiT blocks kept on the GPU; the others are swapped in from pinned host memory "
                                     "as they are needed (prefetched). 0 = all 40 blocks stay on the GPU."),
                io.Combo.Input("kv_cache_device", options=["device", "cpu"], default="device",
                               tooltip="Where the 4 per-step KV caches live (about 10 GB each at 704x384 in bf16). "
                                       "'cpu' keeps them in host RAM and streams them layer by layer."),
                io.Combo.Input("kv_cache_dtype", options=["auto", "float8_e4m3fn", "bfloat16", "float16"], default="auto",
                               tooltip="KV cache precision; float8_e4m3fn (with scales) halves the cache memory. "
                                       "auto = the model's compute dtype."),
                io.Boolean.Input("offload_between_uses", default=False,
                                 tooltip="Move the non-swapped weights back to host RAM after each run, "
                                         "so other models can use the GPU between prompts."),
                io.Boolean.Input("prefetch", default=True,
                                 tooltip="Overlap the next block's / layer's copy with the current compute."),
            ],
            outputs=[types.Placement.Output(display_name="placement")],
        )

    @classmethod
    def execute(cls, blocks_on_device, kv_cache_device, kv_cache_dtype, offload_between_uses, prefetch) -> io.NodeOutput:
        from ..model_loaders.placement import PlacementConfig

        cfg = PlacementConfig(
            device=str(runtime.device()),
            offload_model_between_uses=offload_between_uses,
            blocks_on_device=blocks_on_device or None,
            kv_cache_device=kv_cache_device,
            kv_cache_dtype=None if kv_cache_dtype == "auto" else kv_cache_dtype,
            prefetch=prefetch,
        )
        return io.NodeOutput(cfg)


# ----------------------------------------------------------------------------------- VAE
class VAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarVAELoader",
            display_name="LiveAvatar VAE Loader",
            category=types.CATEGORY,
            description="Loads the Wan 2.1 VAE (wan_2.1_vae.safetensors or Wan2.1_VAE.pth) with its streaming decoder.",
            inputs=[
                io.Combo.Input("vae_name", options=runtime.model_files("vae"),
                               tooltip="Wan 2.1 VAE from models/vae (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)."),
                io.Combo.Input("precision", options=list(ENCODER_PRECISIONS), default="auto", optional=True,
                               tooltip="Encode/decode precision. auto = bf16 on a GPU (fast decode), fp32 on the CPU. "
                                       "fp16 is closer to fp32 than bf16 (README: measured errors) but has a smaller range."),
            ],
            outputs=[types.VAE.Output(display_name="vae")],
        )

    @classmethod
    def execute(cls, vae_name, precision="auto") -> io.NodeOutput:
        from ..model_loaders.vae import load_wan_vae

        prec = resolve_precision("vae", precision, runtime.device())
        vae = load_wan_vae(runtime.model_path("vae", vae_name), device="cpu", dtype=prec.dtype)
        return io.NodeOutput(LiveAvatarVAE(vae, vae_name, runtime.Managed(vae.model, vae_name)))


# ----------------------------------------------------------------------------------- text
class TextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarTextEncoderLoader",
            display_name="LiveAvatar Text Encoder Loader",
            category=types.CATEGORY,
            description="Loads the umT5-XXL encoder and its tokenizer. Alternatively use core 'Load CLIP' (type wan) + "
                        "'CLIP Text Encode' and feed its CONDITIONING to 'LiveAvatar Text Encode'.",
            inputs=[
                io.Combo.Input("text_encoder_name", options=runtime.model_files("text_encoders"),
                               tooltip="umT5-XXL encoder from models/text_encoders (umt5_xxl_fp16.safetensors, the fp8_e4m3fn_scaled "
                                       "file, or Wan's models_t5_umt5-xxl-enc-bf16.pth)."),
                io.Combo.Input("tokenizer", options=runtime.model_dirs("text_encoders", TOKENIZER_FILES) + [BYTE_TOKENS],
                               tooltip="A folder in models/text_encoders holding the google/umt5-xxl tokenizer files "
                                       "(spiece.model, tokenizer.json, ...). 'byte tokens' is for tiny test models only."),
                io.Combo.Input("precision", options=list(TEXT_PRECISIONS), default="auto", optional=True,
                               tooltip="auto = bf16 (as upstream; 10.6 GiB for umT5-XXL instead of 21 GiB in fp32). "
                                       "fp8 keeps the Linear weights in fp8 (~6 GiB); an fp8_scaled file stays fp8 in any case."),
            ],
            outputs=[types.TextEncoder.Output(display_name="text_encoder")],
        )

    @classmethod
    def execute(cls, text_encoder_name, tokenizer, precision="auto") -> io.NodeOutput:
        from ..liveavatar.text import load_tokenizer
        from ..model_loaders.text_encoder import load_text_encoder

        prec = resolve_precision("text", precision, runtime.device())
        model = load_text_encoder(runtime.model_path("text_encoders", text_encoder_name), dtype=prec.dtype, fp8=prec.fp8)
        tok = None if tokenizer == BYTE_TOKENS else load_tokenizer(runtime.model_dir("text_encoders", tokenizer))
        return io.NodeOutput(LiveAvatarTextEncoder(model, tok, text_encoder_name, runtime.Managed(model, text_encoder_name)))


# ----------------------------------------------------------------------------------- audio
class AudioEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarAudioEncoderLoader",
            display_name="LiveAvatar Audio Encoder Loader",
            category=types.CATEGORY,
            description="Loads wav2vec2-large-xlsr-53-english (all 25 hidden states are used).",
            inputs=[
                io.Combo.Input("audio_encoder_name", options=runtime.model_files("audio_encoders"),
                               tooltip="wav2vec2 from models/audio_encoders (wav2vec2_large_english_fp16.safetensors or the "
                                       "HF model.safetensors of wav2vec2-large-xlsr-53-english)."),
                io.Combo.Input("precision", options=list(ENCODER_PRECISIONS), default="auto", optional=True,
                               tooltip="auto = fp16 on a GPU, fp32 on the CPU."),
            ],
            outputs=[types.AudioEncoder.Output(display_name="audio_encoder")],
        )

    @classmethod
    def execute(cls, audio_encoder_name, precision="auto") -> io.NodeOutput:
        from ..model_loaders.audio_encoder import load_audio_encoder

        prec = resolve_precision("audio", precision, runtime.device())
        model = load_audio_encoder(runtime.model_path("audio_encoders", audio_encoder_name), dtype=prec.dtype)
        return io.NodeOutput(LiveAvatarAudioEncoder(model, audio_encoder_name, runtime.Managed(model, audio_encoder_name)))


NODES = [ModelLoader, Placement, VAELoader, TextEncoderLoader, AudioEncoderLoader]
