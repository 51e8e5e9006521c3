"""Print how closely the engine reproduces the upstream golden data (max |diff| per check).

The tests assert these within tolerance; this prints the figures quoted in the README.
Usage: python bench/golden_report.py [GOLDEN_DIR]   (default: LIVEAVATAR_GOLDEN_DIR or ../shared/golden)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import _pack

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
_pack.load()
from goldens import golden_audio_features, golden_dit, golden_sampler_config, read_json  # noqa: E402
from liveavatar_pack.liveavatar.audio import encode_audio  # noqa: E402
from liveavatar_pack.liveavatar.image import load_reference_image  # noqa: E402
from liveavatar_pack.liveavatar.pipeline import Conditioning, VideoStream, encode_reference  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TableRopeOffsets, TensorAudio  # noqa: E402
from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder  # noqa: E402
from liveavatar_pack.model_loaders.vae import load_wan_vae  # noqa: E402


def err(a, b) -> str:
    d = (a.float() - b.float()).abs().max().item()
    return f"{d:.2e} (max |golden| {b.abs().max().item():.2f})"


def main() -> None:
    golden_dir = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("LIVEAVATAR_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
    model = golden_dit(golden_dir / "dit")
    audio = TensorAudio(golden_audio_features(golden_dir / "audio"))
    rows = []
    for name in ("pipeline", "pipeline_tpp"):
        g = load_file(golden_dir / name / "golden.safetensors")
        noise = load_file(golden_dir / "pipeline" / "golden.safetensors")
        g.update({k: v for k, v in noise.items() if k.endswith("_noise")})
        log = read_json(golden_dir / name / "call_log.json")
        cfg = golden_sampler_config(g, log)
        if name == "pipeline":
            checks = load_file(golden_dir / "pipeline" / "model_checks.safetensors")
            sink = SinkInputs(checks["sink.in.ref_latents"][0], checks["sink.in.motion_latents_last19"][0])
            offsets = TableRopeOffsets.from_stream(read_json(golden_dir / name / "rope_offsets.json"), cfg.blocks_per_clip, cfg.steps)
            refresh = lambda first: SinkInputs(first[:, :1], g["vae_motion_latents_v1_last19"])  # noqa: E731
        else:
            sink = SinkInputs(g["ref_latents_clip0"][0], g["motion_latents"][0])
            offsets, refresh = TableRopeOffsets(g["rope_offsets"].tolist()), None
        sampler = StreamingSampler(model, cfg, g["text_context"], audio, sink, 0, rope_offsets=offsets,
                                   noise=lambda c: g[f"clip{c}_noise"], sink_refresh=refresh)
        blocks = list(sampler.blocks(log["num_clips"]))
        for clip in range(log["num_clips"]):
            latents = torch.cat([b.latents for b in blocks if b.clip == clip], dim=1)
            rows.append((f"{name}: clip {clip} final latents", err(latents, g[f"clip{clip}_final_latents"])))

    tpp = load_file(golden_dir / "pipeline_tpp" / "golden.safetensors")
    noise = load_file(golden_dir / "pipeline" / "golden.safetensors")
    log = read_json(golden_dir / "pipeline_tpp" / "call_log.json")
    cfg = golden_sampler_config({**tpp, **noise}, log)
    vae = load_wan_vae(golden_dir / "vae" / "vae.safetensors", config=golden_dir / "vae" / "config.json")
    pixels = load_reference_image(golden_dir / "pipeline" / "ref_image.png", log["launch"]["max_area"])
    sink = encode_reference(vae, pixels, cfg)
    rows.append(("pipeline_tpp: reference latent (VAE)", err(sink.ref_latent, tpp["ref_latents_clip0"][0])))
    rows.append(("pipeline_tpp: motion latents (VAE)", err(sink.motion_latents, tpp["motion_latents"][0])))
    features = encode_audio(load_audio_encoder(golden_dir / "audio" / "wav2vec2"), golden_dir / "audio" / "test_16k.wav")
    cond = Conditioning(tpp["text_context"], features, sink, *pixels.shape[1:])
    stream = VideoStream(model, vae, cond, cfg, seed=0, num_clips=log["num_clips"],
                         rope_offsets=TableRopeOffsets(tpp["rope_offsets"].tolist()), noise=lambda c: noise[f"clip{c}_noise"])
    video = torch.cat([c.frames for c in stream])
    diff = (video.int() - tpp["video_uint8"].int()).abs()
    rows.append(("pipeline_tpp: uint8 video from files", f"max {int(diff.max())}, {int((diff > 0).sum())} of {diff.numel()} values differ"))
    print(f"| check ({torch.get_num_threads()} threads, float32) | max abs diff |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
