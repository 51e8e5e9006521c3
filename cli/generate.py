"""``python -m liveavatar generate``: real weights from disk -> MP4 with sound."""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from ..liveavatar.audio import AudioFeatures, load_audio
from ..liveavatar.config import SamplerConfig
from ..liveavatar.image import load_reference_image, parse_size
from ..liveavatar.pipeline import Conditioning, VideoStream, encode_reference
from ..liveavatar.text import encode_text, load_tokenizer, tokenize
from ..model_loaders.audio_encoder import load_audio_encoder
from ..model_loaders.dit import load_dit
from ..model_loaders.encoder_precision import resolve as resolve_precision
from ..model_loaders.model_dir import find_model_files
from ..model_loaders.planner import preload_host_check
from ..model_loaders.text_encoder import load_text_encoder
from ..model_loaders.vae import load_wan_vae
from .preflight import Preflight, check_audio, check_model_file, check_output, resolve_device
from .progress import write_with_progress
from .workers import add_worker_arguments, check_worker_layout, worker_sources


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, help="upstream checkpoint folder or a ComfyUI models/ folder")
    p.add_argument("--image", required=True, help="reference image (any size; RGB, RGBA or grayscale)")
    p.add_argument("--audio", required=True, help="speech audio (any sample rate, mono or stereo)")
    p.add_argument("--prompt", default="A person is talking to the camera.", help="text prompt")
    p.add_argument("--size", default="704*384", help="maximum pixel area W*H; the image's aspect is kept")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num-clips", type=int, default=0, help="clips of --frames-per-clip frames (0: follow the audio)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block (LoRA distilled for 4; 3 or 5 work)")
    p.add_argument("--frames-per-clip", type=int, default=48, help="a multiple of 12")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default=None,
                   help="DiT weights (default: bf16 on GPU, fp32 on CPU); a GGUF --dit keeps its quantized "
                        "weights and this sets its compute dtype (bf16/fp16/fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    for part in ("dit", "lora", "vae", "text-encoder", "tokenizer", "audio-encoder"):
        p.add_argument(f"--{part}", default=None, help=f"explicit path of the {part.replace('-', ' ')} (overrides --models)")
    p.add_argument("--out", required=True, help="output MP4 (an existing file is refused without --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--host-ram", type=float, default=None, metavar="GIB",
                   help="host RAM the run may use, GiB (default: what the system reports available; 0: no check); "
                        "checked before loading")
    add_worker_arguments(p)


def _release_memory() -> None:
    """Collect what the caller has dropped (HF modules hold reference cycles) and hand cached
    device blocks back, so the next model loads into the memory the plan counts as free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_prompt(path: Path, ids: torch.Tensor, mask: torch.Tensor, precision, device: torch.device) -> torch.Tensor:
    """umT5 output on the CPU. The encoder lives only inside this call: the plan frees it before the
    DiT loads (a ``del`` of a loop variable, as before, left the caller's reference alive)."""
    encoder = load_text_encoder(path, dtype=precision.dtype, fp8=precision.fp8, device=device)
    return encode_text(encoder, ids, mask).float().cpu()


def run_generate(args: argparse.Namespace) -> Path:
    # Everything that can be checked cheaply is checked before any model is loaded, in one pass.
    pre = Preflight()
    device = pre.check(resolve_device, args.device)
    cfg = SamplerConfig(steps=args.steps, frames_per_clip=args.frames_per_clip)
    pre.check(cfg.validate)
    pre.check(check_worker_layout, args, cfg)
    if args.num_clips < 0:
        pre.problems.append(f"--num-clips must be 0 (follow the audio) or more; got {args.num_clips}")
    out = pre.check(check_output, args.out, args.overwrite)
    files = pre.check(lambda: find_model_files(
        args.models, dit=args.dit, lora=args.lora, vae=args.vae, text_encoder=args.text_encoder,
        tokenizer=args.tokenizer, audio_encoder=args.audio_encoder).require(Path(args.models)))
    if files is not None:
        for part in ("dit", "lora", "vae", "text_encoder", "audio_encoder"):
            pre.check(check_model_file, part, getattr(files, part))
    pixels = pre.check(load_reference_image, args.image, args.size) if pre.check(parse_size, args.size) else None
    waveform = pre.check(load_audio, args.audio)
    if waveform is not None:
        check_audio(waveform, cfg, pre)
    tokenizer = pre.check(load_tokenizer, files.tokenizer) if files is not None else None
    if tokenizer is not None:
        ids, mask = pre.check(tokenize, tokenizer, args.prompt) or (None, None)
    precision = args.precision or ("bf16" if device is not None and device.type == "cuda" else "fp32")
    if all(x is not None for x in (device, files, pixels)) and not args.workers and args.host_ram != 0:
        # host RAM, by the planner (with workers the ranks hold the DiT in their own processes)
        ram = pre.check(preload_host_check, files.dit, precision, pixels.shape[-1], pixels.shape[-2], cfg, device,
                        args.host_ram)
        if ram is not None and not ram.fits:
            pre.problems.append(ram.message)
    pre.finish()
    print("\n".join(files.report()), file=sys.stderr, flush=True)  # which file each part is, and what was passed over

    text_p, audio_p, vae_p = (resolve_precision(part, "auto", device) for part in ("text", "audio", "vae"))

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"text encoder {files.text_encoder.name}")
    text = _encode_prompt(files.text_encoder, ids, mask, text_p, device)
    _release_memory()

    log(f"VAE {files.vae.name}")
    vae = load_wan_vae(files.vae, device=device, dtype=vae_p.dtype)
    sink = encode_reference(vae, pixels, cfg)

    log(f"audio encoder {files.audio_encoder.name}")
    audio = AudioFeatures(load_audio_encoder(files.audio_encoder, dtype=audio_p.dtype, device=device), waveform)
    audio.release_encoder()  # off the device before the DiT loads; gone if the track was encoded in one pass
    _release_memory()

    cond = Conditioning(text, audio, sink, *pixels.shape[1:])
    if args.workers:
        spec = {"kind": "dit", "path": str(files.dit), "lora": str(files.lora), "precision": precision}
        vae_spec = {"kind": "wan_vae", "path": str(files.vae), "dtype": str(vae_p.dtype).removeprefix("torch.")}
        model, sources = None, worker_sources(args, spec, cfg, cond, args.seed, vae=vae_spec)
        layout = f"{args.mode}, sp {args.sp}" if args.sp > 1 else args.mode
        log(f"DiT on {args.workers} workers ({layout})" + (" + a decode rank" if "frame_source" in sources else ""))
    else:
        model, report = load_dit(files.dit, lora=files.lora, precision=precision, device=device)
        sources = {}
        log(report.summary())
    stream = VideoStream(model, vae, cond, cfg, seed=args.seed, num_clips=args.num_clips or None, **sources)
    log(f"generating {stream.num_clips} clips = {stream.total_frames} frames at {cond.width}x{cond.height}, "
        f"{cfg.steps} steps, seed {args.seed} ({waveform.duration:.1f} s of audio)")
    with torch.inference_mode():
        return write_with_progress(stream, out, audio=args.audio, overwrite=args.overwrite)
