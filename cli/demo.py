"""``python -m liveavatar demo``: the whole pipeline on tiny random models, on the CPU."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..liveavatar.audio import Waveform, AudioFeatures
from ..liveavatar.config import TINY, SamplerConfig, replace
from ..liveavatar.demo_assets import synth_face, synth_speech
from ..liveavatar.image import load_reference_image
from ..liveavatar.pipeline import Conditioning, VideoStream, encode_reference
from ..liveavatar.text import encode_text
from ..liveavatar.tiny import byte_tokens, tiny_audio_encoder, tiny_text_encoder, tiny_transformer, tiny_vae
from .preflight import check_output
from .progress import write_with_progress

SAMPLE_RATE = 16000


def run_demo(args: argparse.Namespace) -> Path:
    out = check_output(args.out, args.overwrite)  # before anything is built
    cfg = SamplerConfig(steps=args.steps, frames_per_clip=args.frames_per_clip)
    cfg.validate()
    if args.workers or getattr(args, "sp", 1) != 1:
        from .workers import check_worker_layout

        check_worker_layout(args, cfg)
    text_encoder = tiny_text_encoder(seed=3)
    dit_cfg = replace(TINY, text_dim=text_encoder.config.d_model)
    model = tiny_transformer(seed=args.seed, cfg=dit_cfg)
    vae = tiny_vae(seed=1)
    audio_encoder = tiny_audio_encoder(seed=2)

    pixels = load_reference_image(synth_face(), args.size)
    speech = synth_speech(args.seconds, SAMPLE_RATE)
    audio = AudioFeatures(audio_encoder, Waveform(speech, SAMPLE_RATE, "synthetic speech"))
    ids, mask = byte_tokens(args.prompt, text_encoder.config.vocab_size, dit_cfg.text_len)
    text = encode_text(text_encoder, ids, mask)
    cond = Conditioning(text, audio, encode_reference(vae, pixels, cfg), *pixels.shape[1:])

    sources = {}
    if args.workers:
        from .workers import worker_sources

        spec = {"kind": "tiny", "seed": args.seed, "config": dit_cfg.__dict__}
        sources = worker_sources(args, spec, cfg, cond, args.seed, vae={"kind": "tiny_vae", "seed": 1})
    stream = VideoStream(model, vae, cond, cfg, seed=args.seed, num_clips=args.num_clips or None, **sources)
    print(f"demo: {cond.width}x{cond.height}, {stream.num_clips} clips, {stream.total_frames} frames, "
          f"{cfg.steps} steps (tiny random models: expect abstract motion, not a face)")
    with torch.inference_mode():
        return write_with_progress(stream, out, audio=torch.from_numpy(speech), sample_rate=SAMPLE_RATE,
                                   overwrite=args.overwrite)
