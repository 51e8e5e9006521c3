"""Encoder load time and peak host RAM per file format, and the parity cost of each precision.

Load (CPU, random weights, the real layouts): writes a umT5 encoder, a wav2vec2 and a Wan 2.1 VAE
of a few hundred MB (``--scale 1``) in the formats users have (ComfyUI fp16 / fp8_scaled
safetensors, ``.sft``, Wan's ``.pth``, HF names), then loads each in a fresh process and reports
wall time, the loaded module's size (unique parameter and buffer storage), the peak RSS above the
process baseline (libraries imported before the baseline: their import is not the load) and the
ratio peak/resident. "naive" is the previous way (``safetensors.torch.load_file``, convert, then
``load_state_dict``) for comparison. The target is a ratio <= 1.2 for every loader case.

Parity (``--parity``): max |out - golden| / max |golden| of each encoder per compute dtype against
the golden data (``LIVEAVATAR_GOLDEN_DIR``, default ``../shared/golden``): umT5 padded output,
wav2vec2's 25 hidden states, VAE encode and streaming decode (warm-up + two blocks).
VAE decode speed (``--decode-speed W*H [--device cuda]``): the full-width random VAE's streaming
decode per dtype, seconds per block and the ratio to float32.
Usage: python bench/bench_encoders.py [--scale 1.0] [--parity] [--decode-speed 704*384 --device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import _pack

_pack.load()

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib.util, json, sys, time
import psutil, torch
spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/liveavatar/bootstrap.py")
boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(boot); boot.load_pack(sys.argv[1])
from liveavatar_pack.model_loaders.text_encoder import load_text_encoder
from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder
from liveavatar_pack.model_loaders.vae import load_wan_vae
import transformers, diffusers  # noqa: F401 - imported before the baseline: the load is measured, not the import
from transformers import UMT5EncoderModel, Wav2Vec2Model  # noqa: F401
from diffusers import AutoencoderKLWan  # noqa: F401
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: F401
kind, path, precision = sys.argv[2], sys.argv[3], sys.argv[4]
DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
sys.path.insert(0, sys.argv[1] + "/bench")
from peak_rss import peak_rss, reset_peak
reset_peak()
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if precision == "naive":  # the previous loaders: whole file, then a converted copy, then the model
    from safetensors.torch import load_file
    from liveavatar_pack.model_loaders.text_encoder import to_hf_keys, config_from_state_dict
    sd = load_file(path)
    sd = to_hf_keys({k: v.to(torch.bfloat16) for k, v in sd.items() if k != "spiece_model"})
    with torch.device("meta"):
        model = UMT5EncoderModel(config_from_state_dict(sd))
    model.load_state_dict(sd, assign=True)
    del sd
elif kind == "text":
    model = load_text_encoder(path, dtype=DT[precision], **({"fp8": True} if precision == "fp8" else {}))
elif kind == "audio":
    model = load_audio_encoder(path, dtype=DT[precision])
else:
    model = load_wan_vae(path, dtype=DT[precision]).model
seconds = time.perf_counter() - t0
size = sum({id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())
peak = peak_rss()
print(json.dumps({"seconds": seconds, "extra": peak - base, "size": size}))
"""


# ---------------------------------------------------------------------------- files in the real layouts
def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05, generator=gen)
    return module


def text_model(scale: float = 1.0):
    from transformers import UMT5Config, UMT5EncoderModel

    d = max(64, int(1024 * scale) // 64 * 64)
    cfg = UMT5Config(vocab_size=int(32128 * scale) // 8 * 8 or 256, d_model=d, d_kv=64, d_ff=d * 11 // 4, num_layers=6,
                     num_heads=d // 64, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                     is_encoder_decoder=False, use_cache=False)
    return _random_(UMT5EncoderModel(cfg).eval(), 0)


def audio_model(scale: float = 1.0):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    h = max(64, int(512 * scale) // 64 * 64)
    cfg = Wav2Vec2Config(hidden_size=h, num_hidden_layers=12, num_attention_heads=h // 64, intermediate_size=4 * h,
                         conv_dim=(h,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
                         num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16, feat_extract_norm="layer",
                         do_stable_layer_norm=True, conv_bias=True)
    return _random_(Wav2Vec2Model(cfg).eval(), 1)


def vae_model(scale: float = 1.0):
    from diffusers import AutoencoderKLWan

    return _random_(AutoencoderKLWan(base_dim=max(4, int(64 * scale) // 4 * 4)).eval(), 2)


def fp8_scaled(state: dict[str, torch.Tensor], linear_suffixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_e4m3fn_scaled layout: fp8 Linear weights + a ``scale_weight`` each, the rest fp16."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.endswith(linear_suffixes):
            scale = value.float().abs().max() / 448.0
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            out[key] = value.half()
    return out


def write_files(folder: Path, scale: float = 1.0, kinds=("text", "audio", "vae")) -> list[tuple[str, str, Path, str]]:
    """(label, kind, path, precision) of every load case, after writing its file into ``folder``."""
    from liveavatar_pack.model_loaders.vae import to_wan_state_dict

    cases = []
    if "text" in kinds:
        sd = {k: v for k, v in text_model(scale).state_dict().items() if k != "encoder.embed_tokens.weight"}
        comfy = {k: v.half() for k, v in sd.items()}
        comfy["spiece_model"] = torch.zeros(4096, dtype=torch.uint8)
        save_file(comfy, str(folder / "umt5_fp16.safetensors"))
        save_file(fp8_scaled(sd, (".q.weight", ".k.weight", ".v.weight", ".o.weight", ".wi_0.weight", ".wi_1.weight",
                                  ".wo.weight")), str(folder / "umt5_fp8_scaled.sft"))
        wan = {}
        for k, v in sd.items():  # Wan's own names, as models_t5_umt5-xxl-enc-bf16.pth
            k = (k.replace("shared.weight", "token_embedding.weight").replace("encoder.final_layer_norm", "norm")
                 .replace("encoder.block.", "blocks.").replace(".layer.0.layer_norm", ".norm1")
                 .replace(".layer.0.SelfAttention.relative_attention_bias", ".pos_embedding.embedding")
                 .replace(".layer.0.SelfAttention.", ".attn.").replace(".layer.1.layer_norm", ".norm2")
                 .replace(".layer.1.DenseReluDense.wi_0", ".ffn.gate.0").replace(".layer.1.DenseReluDense.wi_1", ".ffn.fc1")
                 .replace(".layer.1.DenseReluDense.wo", ".ffn.fc2"))
            wan[k] = v.bfloat16()
        torch.save(wan, folder / "umt5-enc-bf16.pth")
        cases += [("text fp16 sft -> bf16 (CPU auto)", "text", folder / "umt5_fp16.safetensors", "bf16"),
                  ("text fp16 sft, naive load_file", "text", folder / "umt5_fp16.safetensors", "naive"),
                  ("text fp16 sft -> fp32", "text", folder / "umt5_fp16.safetensors", "fp32"),
                  ("text fp16 sft -> fp8 (quantise)", "text", folder / "umt5_fp16.safetensors", "fp8"),
                  ("text fp8_scaled .sft -> fp8 kept", "text", folder / "umt5_fp8_scaled.sft", "bf16"),
                  ("text Wan bf16 .pth -> bf16", "text", folder / "umt5-enc-bf16.pth", "bf16")]
    if "audio" in kinds:
        sd = {k: v for k, v in audio_model(scale).state_dict().items() if k != "masked_spec_embed"}
        save_file({k: v.half() for k, v in sd.items()}, str(folder / "wav2vec2_fp16.safetensors"))
        torch.save({"wav2vec2." + k: v for k, v in sd.items()}, folder / "wav2vec2.pth")
        cases += [("audio fp16 sft -> fp32 (CPU auto)", "audio", folder / "wav2vec2_fp16.safetensors", "fp32"),
                  ("audio fp16 sft -> fp16 (GPU auto)", "audio", folder / "wav2vec2_fp16.safetensors", "fp16"),
                  ("audio fp32 .pth -> fp32", "audio", folder / "wav2vec2.pth", "fp32")]
    if "vae" in kinds:
        sd = to_wan_state_dict(vae_model(scale))
        save_file(sd, str(folder / "wan_2.1_vae.safetensors"))
        save_file({k: v.bfloat16() for k, v in sd.items()}, str(folder / "wan_2.1_vae_bf16.sft"))
        torch.save(sd, folder / "Wan2.1_VAE.pth")
        cases += [("VAE fp32 sft -> fp32 (CPU auto)", "vae", folder / "wan_2.1_vae.safetensors", "fp32"),
                  ("VAE fp32 sft -> bf16 (GPU auto)", "vae", folder / "wan_2.1_vae.safetensors", "bf16"),
                  ("VAE bf16 .sft -> fp32", "vae", folder / "wan_2.1_vae_bf16.sft", "fp32"),
                  ("VAE fp32 .pth -> fp32", "vae", folder / "Wan2.1_VAE.pth", "fp32")]
    return cases


def measure(kind: str, path: Path, precision: str) -> dict:
    """Load one file in a fresh process: seconds, extra (peak RSS above baseline) and size, in bytes."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), kind, str(path), precision],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"loading {path} ({kind}, {precision}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- parity against the golden data
def parity(golden: Path) -> list[dict]:
    """max |out - golden| / max |golden| per encoder and compute dtype."""
    from safetensors.torch import load_file

    from liveavatar_pack.liveavatar.audio import encode_audio
    from liveavatar_pack.model_loaders.audio_encoder import load_audio_encoder
    from liveavatar_pack.model_loaders.text_encoder import load_text_encoder
    from liveavatar_pack.model_loaders.vae import load_wan_vae

    def rel(out, ref):
        return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

    rows = []
    gt = load_file(str(golden / "t5" / "golden.safetensors"))
    ga = load_file(str(golden / "audio" / "golden.safetensors"))
    gv = load_file(str(golden / "vae" / "golden.safetensors"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        text = load_text_encoder(golden / "t5" / "t5_encoder.safetensors", dtype=dtype)
        with torch.no_grad():
            out = text(input_ids=gt["input_ids"], attention_mask=gt["attention_mask"]).last_hidden_state
        rows.append({"part": "umT5 output", "precision": name, "rel_err": rel(out, gt["encoder_out_padded"])})
        feats = encode_audio(load_audio_encoder(golden / "audio" / "wav2vec2", dtype=dtype), golden / "audio" / "test_16k.wav")
        rows.append({"part": "wav2vec2 hidden states", "precision": name,
                     "rel_err": rel(feats.hidden_50hz(torch.arange(feats.num_50hz)), ga["hidden_states"])})
        vae = load_wan_vae(golden / "vae" / "vae.safetensors", config=golden / "vae" / "config.json", dtype=dtype)
        rows.append({"part": "VAE encode", "precision": name, "rel_err": rel(vae.encode(gv["video9"]), gv["encode_video9_mean"])})
        dec = vae.streaming_decoder()
        outs = [(dec.decode(gv[f"stream_in_{p}"]), gv[f"stream_out_{p}"]) for p in ("warmup", "chunk0", "chunk1")]
        rows.append({"part": "VAE streaming decode", "precision": name, "rel_err": max(rel(o, r) for o, r in outs)})
        frames = torch.cat([o.float() for o, _ in outs], 1)
        ref = torch.cat([r for _, r in outs], 1)
        u8 = lambda x: ((x.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).int()  # noqa: E731
        rows.append({"part": "VAE decode, uint8 pixels off by > 2", "precision": name,
                     "rel_err": (u8(frames) - u8(ref)).abs().gt(2).float().mean().item()})
    return rows


# ---------------------------------------------------------------------------- VAE decode speed per dtype
def decode_speed(device: str, width: int, height: int, blocks: int = 2, dtypes=("fp32", "bf16", "fp16")) -> list[dict]:
    """Streaming decode of full-width (96) random Wan 2.1 VAEs per dtype: seconds per 3-latent block.

    Warm-up on 7 latents (as the TPP schedule), then ``blocks`` timed blocks; the error column is
    max |frames - fp32 frames| (random weights: pessimistic, see the golden parity for real layers).
    """
    import time

    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging as diffusers_logging

    from liveavatar_pack.liveavatar.vae import WanVAE

    diffusers_logging.set_verbosity_error()  # the "keep in float32" advice: this VAE has no such modules
    dev = torch.device(device)
    z = torch.randn(16, 7 + 3 * blocks, height // 8, width // 8, generator=torch.Generator().manual_seed(0))
    rows, ref = [], None
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    for name in dtypes:
        dtype = table[name]
        with torch.device("meta"):
            model = AutoencoderKLWan(base_dim=96)
        model = model.to_empty(device=dev)
        _random_(model, 3)
        vae = WanVAE(model.to(dtype))
        dec = vae.streaming_decoder()
        dec.decode(z[:, :7])
        outs, seconds = [], []
        for b in range(blocks):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs.append(dec.decode(z[:, 7 + 3 * b: 10 + 3 * b]).float().cpu())
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        frames = torch.cat(outs, 1)
        ref = frames if ref is None else ref
        rows.append({"dtype": name, "s_per_block": min(seconds), "max_err_vs_fp32": (frames - ref).abs().max().item()})
        del vae, model, dec
    return rows


def run() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="model width multiplier (1: a few hundred MB each)")
    parser.add_argument("--parity", action="store_true", help="also measure precision against the golden data")
    parser.add_argument("--decode-speed", metavar="W*H", help="only time the full-width VAE's streaming decode per dtype")
    parser.add_argument("--device", default="cpu", help="device for --decode-speed (cpu, cuda)")
    parser.add_argument("--dtypes", default="fp32,bf16,fp16", help="for --decode-speed (fp16 convolutions crawl on a CPU)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    rows = []
    if args.decode_speed:
        width, height = (int(v) for v in args.decode_speed.split("*"))
        rows = decode_speed(args.device, width, height, dtypes=tuple(args.dtypes.split(",")))
        print(f"VAE streaming decode, base width 96, {width}x{height}, {args.device}: seconds per 12-frame block")
        for r in rows:
            print(f"{r['dtype']:5s} {r['s_per_block']:8.3f} s  x{rows[0]['s_per_block'] / r['s_per_block']:.2f} vs fp32  "
                  f"max|err| vs fp32 {r['max_err_vs_fp32']:.2e}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, path, precision in write_files(Path(tmp), args.scale):
            rows.append({"case": label, "file MiB": path.stat().st_size / 2**20, **measure(kind, path, precision)})
    print(f"{'case':36s} {'file MiB':>8s} {'time s':>7s} {'model MiB':>10s} {'peak+ MiB':>10s} {'peak/model':>10s}")
    for r in rows:
        print(f"{r['case']:36s} {r['file MiB']:8.0f} {r['seconds']:7.2f} {r['size'] / 2**20:10.0f} "
              f"{r['extra'] / 2**20:10.0f} {r['extra'] / r['size']:10.2f}")
    if args.parity:
        golden = Path(os.environ.get("LIVEAVATAR_GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
        par = parity(golden)
        print(f"\n{'parity vs golden (max|err|/max|golden|)':42s} {'fp32':>9s} {'bf16':>9s} {'fp16':>9s}")
        for part in dict.fromkeys(r["part"] for r in par):
            vals = {r["precision"]: r["rel_err"] for r in par if r["part"] == part}
            print(f"{part:42s} {vals['fp32']:9.2e} {vals['bf16']:9.2e} {vals['fp16']:9.2e}")
        rows += par
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    run()
