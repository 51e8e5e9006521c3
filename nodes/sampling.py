"""The clip sampler node: model + conditionings -> a streaming latent handle (nothing runs yet).

The DiT runs when a consumer (LiveAvatar Decode / LiveAvatar Save Video) reads the handle, so
frames go to disk as they are made and progress and interrupt are reported on that node.
"""
from __future__ import annotations

from comfy_api.latest import io

from . import types
from .stream import LatentStream, LocalBackend, Soundtrack


def check_compatible(model_cfg, text, audio, reference) -> None:
    """Conditioning made by other models than the DiT expects -> an error that says what to change."""
    ctx = text.context
    if ctx.shape[-1] != model_cfg.text_dim:
        raise ValueError(f"text: features of width {ctx.shape[-1]} ({text.source}), the DiT expects {model_cfg.text_dim} "
                         f"(umT5-XXL: 4096); use the umT5-XXL text encoder / a wan CLIP")
    if ctx.shape[0] > model_cfg.text_len:
        raise ValueError(f"text: {ctx.shape[0]} tokens, the DiT takes at most {model_cfg.text_len}; shorten the prompt")
    feats = audio.features
    if (feats.num_layers, feats.dim) != (model_cfg.num_audio_layers, model_cfg.audio_dim):
        raise ValueError(f"audio: {feats.num_layers} hidden states of width {feats.dim} ({audio.source}), the DiT "
                         f"expects {model_cfg.num_audio_layers} of width {model_cfg.audio_dim} "
                         f"(wav2vec2-large-xlsr-53-english); use that audio encoder")
    z = reference.sink.ref_latent.shape[0]
    if z != model_cfg.in_dim:
        raise ValueError(f"reference: latents with {z} channels, the DiT expects {model_cfg.in_dim} (Wan 2.1 VAE); "
                         f"use the Wan 2.1 VAE, not the Wan 2.2 one")


class ClipSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarSampler",
            display_name="LiveAvatar Clip Sampler",
            category=types.CATEGORY,
            description="Streaming causal few-step sampler: clips of 4 blocks, each block denoised in `steps` DiT calls. "
                        "Returns a handle; the frames are made while 'LiveAvatar Save Video' or 'LiveAvatar Decode' reads it.",
            inputs=[
                types.Model.Input("model", tooltip="From 'LiveAvatar Model Loader'."),
                types.Text.Input("text", tooltip="From 'LiveAvatar Text Encode'."),
                types.AudioCond.Input("audio", tooltip="From 'LiveAvatar Audio Encode'; drives lips and motion, and is the soundtrack."),
                types.Reference.Input("reference", tooltip="From 'LiveAvatar Reference Image'; sets the person and the video size."),
                io.Int.Input("seed", default=42, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the noise (clip r uses seed + r) and of the reference-position draws; "
                                     "the same seed gives the same video on any device."),
                io.Int.Input("num_clips", default=0, min=0, max=100000,
                             tooltip="Clips to generate; 0 = as many as the audio needs (plus upstream's one extra)."),
                io.Int.Input("frames_per_clip", default=48, min=12, max=480, step=12,
                             tooltip="Video frames per clip (a multiple of 12; 48 = LiveAvatar's training setting). "
                                     "The KV history window is one clip."),
                io.Int.Input("steps", default=4, min=1, max=8,
                             tooltip="Denoising steps per block; the LoRA was distilled for 4 (3 is faster, 5 finer). "
                                     "Each step keeps its own KV cache."),
            ],
            outputs=[types.Latents.Output(display_name="latents")],
        )

    @classmethod
    def execute(cls, model, text, audio, reference, seed, num_clips, frames_per_clip, steps) -> io.NodeOutput:
        from ..liveavatar.config import SamplerConfig
        from ..liveavatar.pipeline import Conditioning, count_clips

        cfg = SamplerConfig(steps=steps, frames_per_clip=frames_per_clip)
        cfg.validate()
        backend = getattr(model, "backend", None)
        backend = backend() if callable(backend) else LocalBackend(model)
        check_compatible(model.model.cfg, text, audio, reference)
        cond = Conditioning(text.context, audio.features, reference.sink, reference.height, reference.width)
        clips = count_clips(audio.features, cfg, num_clips or None)
        stream = LatentStream(backend, cond, cfg, seed, clips, Soundtrack(audio.waveform, audio.sample_rate))
        return io.NodeOutput(stream)


NODES = [ClipSampler]
