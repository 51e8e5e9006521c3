"""``python -m liveavatar live`` (the server) and ``live-client`` (stream a file, save the result)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import UserError


def add_live_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", action="store_true", help="tiny random models and a synthetic face (no files needed)")
    src.add_argument("--models", help="upstream checkpoint folder or a ComfyUI models/ folder")
    p.add_argument("--image", help="default reference image (with --models; the page can upload another)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--size", default=None,
                   help="maximum pixel area W*H (default 64*64 with --demo: real time on a CPU; else 704*384)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompt", default="A person is talking to the camera.")
    p.add_argument("--lookahead-ms", type=float, default=320.0,
                   help="audio after a block that its features hear (latency floor = one block + this)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32", "fp8"], default=None)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    from .workers import add_worker_arguments

    add_worker_arguments(p)  # --workers N --mode tpp [--sp M]: the DiT on a warm pool started with the server


def build_engine(args: argparse.Namespace):
    import torch

    from ..liveavatar.config import SamplerConfig
    from ..liveavatar.stream_audio import StreamingAudioConfig
    from ..live.engine import Engine, LiveModels, demo_models

    from .workers import check_worker_layout, pool_options

    stream = StreamingAudioConfig(lookahead_ms=args.lookahead_ms)
    try:
        stream.validate()
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        if args.decode_rank:
            raise ValueError("live decodes in the server process (it muxes the sound with each block); "
                             "drop --decode-rank")
        check_worker_layout(args, SamplerConfig(steps=args.steps))
        if args.demo:
            models = demo_models(args.size or "64*64", args.seed, args.steps, stream=stream)
            return Engine(models, pool_options(args, models.spec) if args.workers else None)
        if not args.image:
            raise ValueError("--models needs --image (the default reference image)")
        from ..liveavatar.image import load_reference_image, parse_size, to_pil
        from ..liveavatar.text import load_tokenizer, tokenize
        from ..model_loaders.audio_encoder import load_audio_encoder
        from ..model_loaders.dit import load_dit
        from ..model_loaders.encoder_precision import resolve as resolve_precision
        from ..model_loaders.model_dir import find_model_files
        from ..model_loaders.vae import load_wan_vae
        from .generate import _encode_prompt, _release_memory
        from .preflight import resolve_device

        size = args.size or "704*384"
        parse_size(size)
        image = to_pil(args.image)
        load_reference_image(image, size)  # refuses a bad image before any model loads
        device = resolve_device(args.device)
        cfg = SamplerConfig(steps=args.steps)
        cfg.validate()
        files = find_model_files(args.models).require(Path(args.models))
        ids, mask = tokenize(load_tokenizer(files.tokenizer), args.prompt)
    except ValueError as err:
        raise UserError(str(err)) from err
    text_p, audio_p, vae_p = (resolve_precision(part, "auto", device) for part in ("text", "audio", "vae"))
    text = _encode_prompt(files.text_encoder, ids, mask, text_p, device)
    _release_memory()
    vae = load_wan_vae(files.vae, device=device, dtype=vae_p.dtype)
    encoder = load_audio_encoder(files.audio_encoder, dtype=audio_p.dtype, device=device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    spec = {"kind": "dit", "path": str(files.dit), "lora": str(files.lora) if files.lora else None,
            "precision": precision}
    if args.workers:  # the workers hold the DiT (and embed the text): this process loads none of it
        model = None
    else:
        model, report = load_dit(files.dit, lora=files.lora, precision=precision, device=device)
        print(report.summary(), file=sys.stderr)
    with torch.inference_mode():
        try:
            return Engine(LiveModels(model, vae, encoder, text, cfg, size, args.seed, image, files.dit.name, stream,
                                     spec), pool_options(args, spec) if args.workers else None)
        except ValueError as err:
            raise UserError(str(err)) from err


def run_live(args: argparse.Namespace) -> int:
    from ..live.server import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0..65535, got {args.port}")
    from ..distributed.launcher import WorkerError

    engine = build_engine(args)
    if engine.pool is not None:
        print(f"live: starting {args.workers} {args.mode} workers; the server listens once they are warm",
              file=sys.stderr, flush=True)
    try:
        serve(engine, args.host, args.port, print_fn=lambda m: print(m, file=sys.stderr, flush=True))
    except (WorkerError, ValueError) as err:  # the pool starts with the server (e.g. no such GPUs)
        raise UserError(f"live: the workers did not start: {str(err).splitlines()[0]}") from err
    finally:
        engine.close()
    return 0


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server's WebSocket, e.g. ws://127.0.0.1:8765/ws")
    p.add_argument("--audio", required=True, help="audio file (WAV/FLAC/OGG; any rate, mono or stereo)")
    p.add_argument("--out", required=True, help="MP4 to write (what the server streamed: video with sound)")
    p.add_argument("--image", help="reference image to send (default: the server's)")
    p.add_argument("--events", help="write per-block timing events here (JSON lines)")
    p.add_argument("--speed", type=float, default=1.0, help="send at this multiple of real time (default 1)")


def run_client(args: argparse.Namespace) -> int:
    import asyncio

    import aiohttp

    from ..live.client import stream_file

    url = args.url if args.url.rstrip("/").endswith("/ws") else args.url.rstrip("/") + "/ws"
    if args.speed <= 0:
        raise UserError(f"--speed must be > 0, got {args.speed}")
    try:
        result = asyncio.run(stream_file(url, args.audio, args.out, image=args.image, events=args.events,
                                         speed=args.speed))
    except aiohttp.ClientError as err:
        raise UserError(f"cannot reach the live server at {url}: {err}") from err
    except ValueError as err:
        raise UserError(str(err)) from err
    for msg in result.errors:
        print(f"server: {msg}", file=sys.stderr)
    lat = [b["client_latency_ms"] for b in result.blocks if b.get("client_latency_ms") is not None]
    print(f"wrote {result.path}: {result.frames} frames, {len(result.blocks)} blocks"
          + (f", first frame after {result.ttff_ms:.0f} ms" if result.ttff_ms else "")
          + (f", block latency median {sorted(lat)[len(lat) // 2]:.0f} ms" if lat else ""))
    return 0 if result.frames and not result.errors else 1
