"""GGUF quantized DiT on the CPU: dequantization overhead and the LiveAvatar LoRA on a quantized base.

Three measurements, side by side in one run (ratios; absolute times only mean something on a GPU):

1. per block-step: the streaming sampler on a mid-size DiT (dim 512, ffn 1536, 4 layers; every
   Linear size a multiple of 256, so every type applies) with bf16 weights vs GGUF weights of each
   supported type (bf16 compute for all) -> time ratio vs bf16;
2. dequantization per DiT call at full size: torch dequantization of one real 14B block's Linear
   weights (8 x 5120x5120 attention, 2 x 5120x13824 FFN) per type, times 40 layers (the audio
   injectors' Linears add ~3%, not counted);
3. LoRA on a quantized base (Q8_0, Q4_0: the types the gguf package can requantize): merge at load
   (dequantize -> + delta in float32 -> requantize) vs run-time low-rank add; weight error vs the
   float32 merge and vs the bf16 merge (what a bf16 file + LoRA gives), latents error vs the bf16
   merge, bytes kept for the LoRA, load time and time per block-step. Plus the full-size LoRA
   bytes (rank 128 on q,k,v,o,ffn.0,ffn.2 of WAN_S2V_14B's blocks, q,k,v,o of its audio injectors) that run-time mode keeps.

K-quant weights here are random blocks with finite scales (the gguf package cannot write K-quants;
timing does not depend on the values). Usage: python bench/bench_gguf.py [--threads 1] [--parts block_step,dequant,lora] [--json out.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, DiTConfig, SamplerConfig  # noqa: E402
from liveavatar_pack.liveavatar.sampler import SinkInputs, StreamingSampler, TensorAudio  # noqa: E402
from liveavatar_pack.liveavatar.tiny import tiny_transformer  # noqa: E402
from liveavatar_pack.model_loaders.dit import load_dit  # noqa: E402
from liveavatar_pack.model_loaders.gguf_quants import QUANT_TYPES, dequantize  # noqa: E402
from liveavatar_pack.model_loaders.gguf_write import quantized_targets, write_gguf_dit  # noqa: E402

MID = DiTConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=4, text_dim=64, audio_dim=32, audio_inject_layers=(0, 2))
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q3_K")
REPEATS = 2
SCALE_AT = {"Q6_K": (208,), "Q5_K": (0, 2), "Q4_K": (0, 2), "Q3_K": (108,)}


def random_blocks(qtype: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    q = QUANT_TYPES[qtype]
    rng = np.random.default_rng(seed)
    n = shape[0] * shape[1] // q.block_size
    blocks = rng.integers(0, 256, (n, q.type_size), dtype=np.uint8)
    for at in SCALE_AT.get(qtype, (0,)):
        blocks[:, at:at + 2] = rng.uniform(-0.002, 0.002, (n, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(shape[0], -1)


def sample(model, cfg: DiTConfig, size: int) -> tuple[torch.Tensor, float]:
    """Latents of one 12-frame clip (1 block x 4 steps) and CPU seconds per block-step."""
    gen = torch.Generator().manual_seed(1)
    h = w = size // 8
    sink = SinkInputs(torch.randn(16, 1, h, w, generator=gen), torch.randn(16, 19, h, w, generator=gen))
    audio = TensorAudio(torch.randn(1, cfg.num_audio_layers, cfg.audio_dim, 60, generator=gen))
    text = torch.randn(12, cfg.text_dim, generator=gen)
    scfg = SamplerConfig(frames_per_clip=12)
    with torch.inference_mode():
        sampler = StreamingSampler(model, scfg, text, audio, sink, seed=3)
        t0 = time.process_time()
        latents = torch.cat([b.latents.float() for b in sampler.blocks(1)], dim=1)
        cpu = time.process_time() - t0
    return latents, cpu / (scfg.blocks_per_clip * scfg.steps)


def file_for(sd, qtype: str, folder: Path) -> Path:
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return write_gguf_dit(sd, folder / f"{qtype}.gguf", qtype)
    raw = {n: random_blocks(qtype, tuple(sd[n].shape), i) for i, n in enumerate(sorted(quantized_targets(sd)))}
    return write_gguf_dit(sd, folder / f"{qtype}.gguf", qtype, raw=raw)


def block_step_overhead(folder: Path, size: int, types) -> dict:
    sd = tiny_transformer(seed=0, cfg=MID).state_dict()
    bf16 = tiny_transformer(seed=0, cfg=MID).eval()
    bf16.cast(torch.bfloat16)
    t_bf16 = min(sample(bf16, MID, size)[1] for _ in range(REPEATS))  # min of repeats: a busy machine only adds
    out = {"bf16_s_per_block_step": t_bf16, "types": {}}
    print(f"block-step, dim {MID.dim} x {MID.num_layers} layers at {size}x{size} on the CPU: bf16 {t_bf16 * 1e3:.1f} ms")
    for q in types:
        model, _ = load_dit(file_for(sd, q, folder), precision="bf16", config=MID)
        t = min(sample(model, MID, size)[1] for _ in range(REPEATS))
        out["types"][q] = {"s_per_block_step": t, "ratio_vs_bf16": t / t_bf16}
        print(f"  {q:5s} {t * 1e3:8.1f} ms  x{t / t_bf16:.2f} of bf16")
    return out


def full_size_dequant(types, repeats: int = 2) -> dict:
    """Seconds to dequantize one real block's Linears (torch, this CPU), and per 40-layer DiT call."""
    d, f = WAN_S2V_14B.dim, WAN_S2V_14B.ffn_dim
    out = {}
    print(f"dequantization of one 14B block's Linears (8 x {d}x{d}, {d}x{f}, {f}x{d}), torch on the CPU:")
    for q in types:
        times = {}
        for shape in ((d, d), (d, f)):
            raw = torch.from_numpy(random_blocks(q, shape))
            dequantize(raw, QUANT_TYPES[q], shape, torch.bfloat16)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                w = dequantize(raw, QUANT_TYPES[q], shape, torch.bfloat16)
            times[shape] = (time.perf_counter() - t0) / repeats
            del w, raw
        block = 8 * times[(d, d)] + 2 * times[(d, f)]
        out[q] = {"s_per_block": block, "s_per_dit_call": block * WAN_S2V_14B.num_layers}
        print(f"  {q:5s} {block:6.2f} s per block, {block * WAN_S2V_14B.num_layers:7.1f} s per DiT call (40 layers)")
    return out


def write_lora(model, path: Path, rank: int = 16, seed: int = 5) -> Path:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("blocks.") and name.rsplit(".", 1)[-1] in ("q", "k", "v", "o", "0", "2"):
            # scaled like a trained LoRA: delta ~ 10% of the weights' spread
            sd[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=gen) * 0.1 / rank ** 0.5
            sd[f"base_model.model.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=gen) * 0.1 / rank ** 0.5
    save_file(sd, str(path), metadata={"lora_alpha": str(rank)})
    (path.parent / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": rank}))
    return path


def full_size_lora_bytes(rank: int = 128) -> int:
    from liveavatar_pack.model_loaders.dit import empty_model

    model = empty_model(WAN_S2V_14B)
    leaf = lambda name: name.rsplit(".", 1)[-1]  # noqa: E731
    n = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (
                (name.startswith("blocks.") and leaf(name) in ("q", "k", "v", "o", "0", "2"))
                or (name.startswith("audio_injector.injector.") and leaf(name) in ("q", "k", "v", "o"))))
    return n


def lora_modes(folder: Path, size: int) -> dict:
    base = tiny_transformer(seed=0, cfg=MID)
    sd = base.state_dict()
    lora = write_lora(base, folder / "lora.safetensors")
    bf16_file = folder / "bf16.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(bf16_file))
    ref32, _ = load_dit(write_gguf_dit(sd, folder / "f32.gguf", "F32"), lora=lora, precision="fp32", config=MID)
    ref16, _ = load_dit(bf16_file, lora=lora, precision="bf16", config=MID)
    lat16, _ = sample(ref16, MID, size)
    out = {}
    print("LoRA on a quantized base (rank 16 on q,k,v,o,ffn.0,ffn.2 of every block):")
    for q in ("Q8_0", "Q4_0"):
        path = write_gguf_dit(sd, folder / f"l{q}.gguf", q)
        for mode in ("merge", "runtime"):
            t0 = time.perf_counter()
            model, report = load_dit(path, lora=lora, precision="bf16", lora_mode=mode, config=MID)
            load_s = time.perf_counter() - t0
            e32 = e16 = n32 = 0.0
            lora_bytes = 0
            for name in report.lora.merged:
                layer = model.get_submodule(name)
                w = layer.dequantized(torch.float32)
                if layer.has_lora:
                    w = w + layer.lora_b.float() @ layer.lora_a.float()
                    lora_bytes += layer.lora_a.nbytes + layer.lora_b.nbytes
                r32 = ref32.get_submodule(name).weight.float()
                e32 += (w - r32).square().sum().item()
                e16 += (w - ref16.get_submodule(name).weight.float()).square().sum().item()
                n32 += r32.square().sum().item()
            lat, t = sample(model, MID, size)
            row = {"weight_rel_err_vs_fp32_merge": (e32 / n32) ** 0.5, "weight_rel_err_vs_bf16_merge": (e16 / n32) ** 0.5,
                   "latent_rel_err_vs_bf16_merge": ((lat - lat16).norm() / lat16.norm()).item(),
                   "lora_bytes_kept": lora_bytes, "load_s": load_s, "s_per_block_step": t,
                   "requant_added_rel_err": report.requant_error}
            out[f"{q}/{mode}"] = row
            print(f"  {q} {mode:7s}: weights vs fp32 merge {row['weight_rel_err_vs_fp32_merge']:.4f}, vs bf16 merge "
                  f"{row['weight_rel_err_vs_bf16_merge']:.4f}; latents vs bf16 merge {row['latent_rel_err_vs_bf16_merge']:.4f}; "
                  f"LoRA kept {lora_bytes / 2**10:.0f} KiB; load {load_s:.2f} s; {t * 1e3:.1f} ms per block-step"
                  + (f"; requantizing added {report.requant_error:.4f}" if report.requant_error is not None else ""))
    full = full_size_lora_bytes()
    out["full_size_runtime_lora"] = {"parameters": full, "bf16_bytes": 2 * full}
    print(f"  full size (rank 128, 40 blocks + audio injectors): run-time mode keeps {full / 1e6:.0f}M LoRA parameters = {2 * full / 2**30:.2f} GiB in bf16")
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256, help="square frame side in pixels for the sampler runs")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="Q8_0 and Q4_K only")
    parser.add_argument("--parts", default="block_step,dequant,lora", help="comma-separated subset to run")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    types = ("Q8_0", "Q4_K") if args.quick else TYPES
    result = {"threads": args.threads, "size": args.size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "block_step" in parts:
            result["block_step"] = block_step_overhead(folder, args.size, types)
        if "dequant" in parts:
            result["dequant_full_size"] = full_size_dequant(types)
        if "lora" in parts:
            result["lora"] = lora_modes(folder, args.size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
