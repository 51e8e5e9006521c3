"""Live mode on tiny models: time to first frame, per-block latency (audio in -> frame to the client), fps.

Starts ``live`` in this process on a free loopback port (the tiny demo models) and streams a
speech-like file to it at real-time pace with the pack's own client, as ``live-client`` does.
Per block, the client's latency is the time from sending the audio at the block's first frame to
receiving the event that its first frame left the encoder (the media segment is sent just before).
fps is the rate frames reached the client. With ``--features``, also the streaming-feature
difference from the offline features on the golden audio, by look-ahead. With ``--workers N`` the
DiT runs on a warm tpp pool of N workers started with the server (``live --workers N --mode tpp``).
Usage:
  python bench/bench_live.py [--size 64*64] [--seconds 10] [--workers 2] [--features] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

import _pack

_pack.load()
sys.path.insert(0, str(_pack.ROOT / "tests"))
from live_server import ServerThread  # noqa: E402
from liveavatar_pack.live.client import stream_file  # noqa: E402
from liveavatar_pack.live.engine import Engine, demo_models  # noqa: E402
from liveavatar_pack.live.server import make_app  # noqa: E402
from liveavatar_pack.liveavatar.demo_assets import synth_speech  # noqa: E402
from liveavatar_pack.liveavatar.stream_audio import StreamingAudioConfig  # noqa: E402


def run_session(size: str, seconds: float, lookahead_ms: float, workers: int = 0) -> dict:
    t = time.perf_counter()
    models = demo_models(size, stream=StreamingAudioConfig(lookahead_ms=lookahead_ms))
    pool = None
    if workers:
        from liveavatar_pack.distributed.launcher import PoolOptions

        pool = PoolOptions(model=models.spec, workers=workers, mode="tpp", threads=1)
    engine = Engine(models, pool)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, ServerThread(make_app(engine)) as srv:  # starts (warms) the pool
        start_s = time.perf_counter() - t
        wav = Path(tmp) / "speech.wav"
        sf.write(wav, synth_speech(seconds, 16000), 16000)
        # the first session also pays the reference encode (cached afterwards): measure both
        runs = []
        for _ in range(2):
            res = asyncio.run(stream_file(f"ws://127.0.0.1:{srv.port}/ws", wav, Path(tmp) / "got.mp4"))
            if res.errors:
                raise SystemExit(f"live session failed: {res.errors}")
            runs.append(res)
    out = {"size": size, "seconds": seconds, "lookahead_ms": lookahead_ms, "build_models_s": round(build_s, 2),
           "layout": f"tpp {workers} workers" if workers else "1 process", "server_start_s": round(start_s, 2)}
    for name, res in zip(("cold", "warm"), runs):
        lat = [b["client_latency_ms"] for b in res.blocks if b["client_latency_ms"] is not None]
        first, last = res.blocks[0], res.blocks[-1]
        span = last["received_s"] - first["received_s"]
        out[name] = {
            "ttff_ms": round(res.ttff_ms, 1),
            "blocks": len(res.blocks),
            "latency_ms_median": round(statistics.median(lat), 1),
            "latency_ms_min": round(min(lat), 1),
            "latency_ms_max": round(max(lat), 1),
            "server_latency_ms_median": round(statistics.median(b["latency_ms"] for b in res.blocks), 1),
            "fps": round((last["first_frame"] - first["first_frame"]) / span, 2) if span > 0 else None,
            "generator_fps_last": last["fps"],
            "max_behind_ms": max(b["behind_ms"] for b in res.blocks),
        }
    return out


def feature_difference(golden: Path, lookaheads=(0, 80, 160, 320, 640, 1000)) -> dict:
    """mean |stream - offline| / mean |offline| over the golden audio's frames, per look-ahead."""
    import torch
    from safetensors.torch import load_file

    from liveavatar_pack.liveavatar.audio import encode_audio, load_audio
    from liveavatar_pack.liveavatar.stream_audio import StreamingFeatures
    from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder

    enc = load_audio_encoder(golden / "audio" / "wav2vec2")
    offline = encode_audio(enc, golden / "audio" / "test_16k.wav")
    n = offline.num_frames
    ref = load_file(str(golden / "audio" / "golden.safetensors"))["bucket"].permute(1, 2, 0)[None][..., :n]
    wave = load_audio(golden / "audio" / "test_16k.wav").samples
    out = {}
    for la in lookaheads:
        feats = StreamingFeatures(enc, StreamingAudioConfig(lookahead_ms=la))
        feats.push(wave)
        feats.pad_silence(feats.samples_needed(n) + 16000)
        got = torch.cat([feats.frames(a, min(a + 12, n)) for a in range(0, n, 12)], -1)
        out[la] = {"mean_rel": round(((got - ref).abs().mean() / ref.abs().mean()).item(), 4),
                   "max_rel": round(((got - ref).abs().max() / ref.abs().max()).item(), 4)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="64*64")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--lookahead-ms", type=float, default=320.0)
    p.add_argument("--workers", type=int, default=0, help="run the DiT on a tpp pool of this many workers")
    p.add_argument("--features", action="store_true", help="also the streaming-feature difference on the golden audio")
    p.add_argument("--golden", default=str(_pack.ROOT.parent / "shared" / "golden"))
    p.add_argument("--json")
    args = p.parse_args()
    result = {"session": run_session(args.size, args.seconds, args.lookahead_ms, args.workers)}
    if args.features:
        result["features_vs_offline"] = feature_difference(Path(args.golden))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
