"""Conditioning nodes: audio, reference image, text. ComfyUI types in, engine objects out.

Core alternatives are accepted where they carry the same thing: text CONDITIONING from core
``CLIPTextEncode`` with a wan (umT5) CLIP, and ``AUDIO_ENCODER_OUTPUT`` from core
``AudioEncoderEncode`` with the same wav2vec2 (all 25 hidden states).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from comfy_api.latest import io

from . import runtime, types

SIZES = ["704*384", "384*704", "640*640", "832*480", "480*832", "512*512", "1280*720", "720*1280", "256*256"]


@dataclass
class TextConditioning:
    context: torch.Tensor  # [real tokens, text_dim] float32 on the CPU
    source: str


@dataclass
class AudioConditioning:
    features: Any  # liveavatar.audio.AudioFeatures (an AudioSource)
    waveform: torch.Tensor  # [C, T] float, the soundtrack of the video
    sample_rate: int
    source: str

    @property
    def seconds(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


@dataclass
class ReferenceConditioning:
    sink: Any  # liveavatar.sampler.SinkInputs
    height: int
    width: int


# ----------------------------------------------------------------------------------- audio
def audio_waveform(audio: dict) -> tuple[torch.Tensor, int]:
    """ComfyUI AUDIO -> ([C, T], sample rate), refusing what LiveAvatar cannot use."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError("audio: expected a ComfyUI AUDIO (e.g. from 'Load Audio'); connect an audio input")
    wave = audio["waveform"]
    if wave.dim() == 3:
        if wave.shape[0] != 1:
            raise ValueError(f"audio: a batch of {wave.shape[0]} tracks was given; LiveAvatar takes one track")
        wave = wave[0]
    if wave.dim() == 1:
        wave = wave[None]
    if wave.shape[-1] == 0:
        raise ValueError("audio: the track is empty (zero samples); load a file with speech")
    return wave.detach().to("cpu", torch.float32), int(audio["sample_rate"])


def features_from_core_output(output: dict, config=None):
    """Core AUDIO_ENCODER_OUTPUT -> AudioFeatures over its 50 Hz hidden states (all layers)."""
    from ..liveavatar.audio import DEFAULT_AUDIO, AudioFeatures

    layers = output.get("encoded_audio_all_layers") if isinstance(output, dict) else None
    if not layers:
        raise ValueError("audio_encoder_output: no 'encoded_audio_all_layers'; connect core 'Audio Encoder Encode' "
                         "with a wav2vec2 audio encoder")
    states = torch.cat([t.detach().float().cpu() for t in layers])  # [L, T50, D] (batch of one)
    if states.shape[0] != len(layers):
        raise ValueError("audio_encoder_output: holds a batch of tracks; LiveAvatar takes one")
    return AudioFeatures.from_hidden_states(states, config or DEFAULT_AUDIO, source="AUDIO_ENCODER_OUTPUT")


class AudioEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarAudioEncode",
            display_name="LiveAvatar Audio Encode",
            category=types.CATEGORY,
            description="Speech -> per-frame wav2vec2 features that drive the lips and motion. The audio is also the "
                        "video's soundtrack, and its length sets the number of clips (when the sampler's num_clips is 0).",
            inputs=[
                io.Audio.Input("audio", tooltip="The speech track (e.g. from core 'Load Audio'); any rate, mono or stereo."),
                types.AudioEncoder.Input("audio_encoder", optional=True,
                                         tooltip="wav2vec2 from 'LiveAvatar Audio Encoder Loader' (exact upstream features). "
                                                 "Give this or audio_encoder_output."),
                io.AudioEncoderOutput.Input("audio_encoder_output", optional=True,
                                            tooltip="Alternative: core 'Audio Encoder Encode' output of the same audio with "
                                                    "wav2vec2-large-english (ComfyUI resamples differently: tiny deviation)."),
            ],
            outputs=[types.AudioCond.Output(display_name="audio")],
        )

    @classmethod
    def execute(cls, audio, audio_encoder=None, audio_encoder_output=None) -> io.NodeOutput:
        from ..liveavatar.audio import encode_audio

        wave, rate = audio_waveform(audio)
        if audio_encoder is not None:
            features = encode_audio(audio_encoder.load(), {"waveform": wave, "sample_rate": rate})
            source = audio_encoder.name
        elif audio_encoder_output is not None:
            features = features_from_core_output(audio_encoder_output)
            source = "core AUDIO_ENCODER_OUTPUT"
        else:
            raise ValueError("LiveAvatar Audio Encode needs an audio_encoder (LiveAvatar Audio Encoder Loader) "
                             "or an audio_encoder_output (core Audio Encoder Encode); connect one of them")
        return io.NodeOutput(AudioConditioning(features, wave, rate, source))


# ----------------------------------------------------------------------------------- image
def reference_encode_calls(cfg) -> int:
    """Causal VAE encoder calls of ``encode_reference``: 1 for the image, then 1 + (T-1)/4 for the T-frame motion clip
    (the encoder takes frames 1, 4, 4, ...): 20 for upstream's 73 frames."""
    return 1 + 1 + (cfg.motion_video_frames - 1) // 4


@contextmanager
def encoder_progress(wan, total: int) -> Iterator[None]:
    """ComfyUI's progress bar (and so its Cancel) moves on every causal-encoder call of the VAE."""
    encoder = getattr(wan.model, "encoder", None)
    if encoder is None:
        yield
        return
    bar, done = runtime.Progress(total), [0]

    def tick(*_):
        done[0] += 1
        bar(min(done[0], total))

    handle = encoder.register_forward_hook(tick)
    try:
        yield
    finally:
        handle.remove()


class ReferenceImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarReferenceImage",
            display_name="LiveAvatar Reference Image",
            category=types.CATEGORY,
            description="The person to animate: resized to the size budget (both sides multiples of 64, aspect kept) and "
                        "VAE-encoded into the reference and motion latents.",
            inputs=[
                io.Image.Input("image", tooltip="One image of the person (e.g. from core 'Load Image'); a batch is refused."),
                types.VAE.Input("vae", tooltip="The Wan 2.1 VAE from 'LiveAvatar VAE Loader'."),
                io.Combo.Input("size", options=SIZES, default="704*384",
                               tooltip="Maximum pixel area W*H (not a shape): the output keeps the image's aspect. "
                                       "704*384 is what LiveAvatar was trained at."),
            ],
            outputs=[types.Reference.Output(display_name="reference")],
        )

    @classmethod
    def execute(cls, image, vae, size) -> io.NodeOutput:
        from ..liveavatar.config import SamplerConfig
        from ..liveavatar.image import load_reference_image
        from ..liveavatar.pipeline import encode_reference

        if image.dim() == 4 and image.shape[0] != 1:
            raise ValueError(f"image: a batch of {image.shape[0]} images was given; LiveAvatar animates one reference "
                             f"image. Pick one (e.g. core 'Image From Batch') before this node")
        pixels = load_reference_image(image, size)
        wan = vae.load()
        cfg = SamplerConfig()
        with torch.inference_mode(), encoder_progress(wan, reference_encode_calls(cfg)):
            sink = encode_reference(wan, pixels.to(wan.device), cfg)
        return io.NodeOutput(ReferenceConditioning(sink, int(pixels.shape[1]), int(pixels.shape[2])))


# ----------------------------------------------------------------------------------- text
def text_from_core_conditioning(conditioning: list) -> torch.Tensor:
    """Core CONDITIONING of one prompt (wan CLIP) -> its real tokens' rows ``[L, dim]``.

    ComfyUI pads umT5's output to 512 rows and zeroes the padding (``zero_out_masked``); the DiT
    wants only the real rows (it zero-pads to 512 itself, as upstream does). The real rows are
    given by an ``attention_mask`` when the CONDITIONING carries one, else they end where the
    trailing all-zero rows begin.
    """
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("conditioning: expected a CONDITIONING from core 'CLIP Text Encode'")
    if len(conditioning) != 1:
        raise ValueError(f"conditioning: holds {len(conditioning)} prompts (combined/concatenated); give one prompt")
    cond, extra = conditioning[0][0], conditioning[0][1] if len(conditioning[0]) > 1 else {}
    if cond.dim() != 3 or cond.shape[0] != 1:
        raise ValueError(f"conditioning: expected one prompt [1, tokens, dim], got {tuple(cond.shape)}")
    rows = cond[0].detach().float().cpu()
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    if mask is not None:
        n = int(mask.reshape(-1).sum())
    else:
        nonzero = (rows != 0).any(dim=1).nonzero()
        n = int(nonzero[-1]) + 1 if len(nonzero) else 0
    if n == 0:
        raise ValueError("conditioning: every row is zero (an empty prompt?)")
    return rows[:n].contiguous()


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarTextEncode",
            display_name="LiveAvatar Text Encode",
            category=types.CATEGORY,
            description="The prompt (scene, expression, gestures) as umT5 features, from our text encoder or from "
                        "core 'CLIP Text Encode' with a wan CLIP.",
            inputs=[
                io.String.Input("prompt", multiline=True,
                                default="A person speaks to the camera with natural expressions and gestures.",
                                tooltip="What the video should look like; at most 512 umT5 tokens (longer prompts are refused)."),
                types.TextEncoder.Input("text_encoder", optional=True,
                                        tooltip="From 'LiveAvatar Text Encoder Loader'. Give this or conditioning."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="Alternative: core 'CLIP Text Encode' output with a wan (umT5-XXL) CLIP; "
                                              "the prompt widget is then ignored."),
            ],
            outputs=[types.Text.Output(display_name="text")],
        )

    @classmethod
    def execute(cls, prompt, text_encoder=None, conditioning=None) -> io.NodeOutput:
        from ..liveavatar.text import DEFAULT_TEXT, encode_prompt, encode_text

        if conditioning is not None:
            return io.NodeOutput(TextConditioning(text_from_core_conditioning(conditioning), "core CONDITIONING"))
        if text_encoder is None:
            raise ValueError("LiveAvatar Text Encode needs a text_encoder (LiveAvatar Text Encoder Loader) or a "
                             "conditioning (core CLIP Text Encode); connect one of them")
        model = text_encoder.load()
        if text_encoder.tokenizer is None:
            from ..liveavatar.text import clean_prompt
            from ..liveavatar.tiny import byte_tokens

            ids, mask = byte_tokens(clean_prompt(prompt), model.config.vocab_size, DEFAULT_TEXT.text_len)
            context = encode_text(model, ids, mask)
        else:
            context = encode_prompt(model, text_encoder.tokenizer, prompt)
        return io.NodeOutput(TextConditioning(context.float().cpu(), text_encoder.name))


NODES = [AudioEncode, ReferenceImage, TextEncode]
