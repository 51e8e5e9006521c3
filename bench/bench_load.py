"""DiT load time and peak host RAM per checkpoint format (CPU, random weights, real layouts).

Writes a DiT of a few hundred MB (dim 1024, 6 layers by default) in each format users have,
then loads each in a fresh process and reports wall time and peak RSS above the process
baseline, also as a multiple of the loaded model's size. "naive" is the obvious way
(``safetensors.torch.load_file`` of every shard, then ``load_state_dict``) for comparison.
Usage: python bench/bench_load.py [--dim 1024] [--layers 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import DiTConfig  # noqa: E402
from liveavatar_pack.model_loaders.dit import empty_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib.util, json, sys, time
import psutil, torch
spec = importlib.util.spec_from_file_location("_b", sys.argv[1] + "/liveavatar/bootstrap.py")
boot = importlib.util.module_from_spec(spec); spec.loader.exec_module(boot); boot.load_pack(sys.argv[1])
from liveavatar_pack.model_loaders.dit import load_dit, empty_model
from liveavatar_pack.liveavatar.config import DiTConfig
path, precision, lora, cfg_json = sys.argv[2], sys.argv[3], sys.argv[4] or None, sys.argv[5]
cfg = DiTConfig.from_json(cfg_json)
sys.path.insert(0, sys.argv[1] + "/bench")
from peak_rss import peak_rss, reset_peak
reset_peak()
base = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if precision == "naive":
    from safetensors.torch import load_file
    from pathlib import Path
    sd = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(shard))
    from liveavatar_pack.liveavatar.transformer import LiveAvatarTransformer
    model = LiveAvatarTransformer(cfg)
    model.load_state_dict(sd)
    del sd
else:
    model, _ = load_dit(path, lora=lora, precision=precision, config=cfg)
seconds = time.perf_counter() - t0
size = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
peak = peak_rss()
print(json.dumps({"seconds": seconds, "extra": peak - base, "size": size}))
"""


def write_all(folder: Path, cfg: DiTConfig) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.02) for k, v in empty_model(cfg).state_dict().items()}
    paths = {}
    shard_dir = folder / "sharded"
    shard_dir.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i in range(4):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-00004.safetensors"
        save_file({k: state[k] for k in keys[i::4]}, shard_dir / name)
        weight_map.update({k: name for k in keys[i::4]})
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    paths["sharded"] = shard_dir
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, folder / "prefixed_fp32.safetensors")
    paths["prefixed"] = folder / "prefixed_fp32.safetensors"
    save_file({k: v.bfloat16() for k, v in state.items()}, folder / "bf16.safetensors")
    paths["bf16"] = folder / "bf16.safetensors"
    fp8 = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in state.items():
        top = k.split(".")[0]
        if k.endswith(".weight") and v.ndim == 2 and top in ("blocks", "audio_injector") and "norm" not in k:
            scale = v.abs().max() / 448
            fp8[k] = (v / scale).to(torch.float8_e4m3fn)
            fp8[k[:-7] + ".scale_weight"] = scale.reshape(())
        else:
            fp8[k] = v.bfloat16()
    save_file(fp8, folder / "fp8_scaled.safetensors")
    paths["fp8_scaled"] = folder / "fp8_scaled.safetensors"
    torch.save(state, folder / "model.pth")
    paths["pth"] = folder / "model.pth"
    lora = {}
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2 and k.split(".")[0] == "blocks" and "norm" not in k:
            m = k[:-7]
            lora[f"{m}.lora_A.weight"] = torch.randn(16, v.shape[1], generator=gen) * 0.01
            lora[f"{m}.lora_B.weight"] = torch.randn(v.shape[0], 16, generator=gen) * 0.01
            lora[f"{m}.alpha"] = torch.tensor(8.0)
    save_file(lora, folder / "lora.safetensors")
    paths["lora"] = folder / "lora.safetensors"
    return paths


def run() -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    cfg = DiTConfig(dim=args.dim, ffn_dim=2 * args.dim, num_heads=args.dim // 128, num_layers=args.layers, text_dim=256,
                    audio_dim=64, audio_inject_layers=tuple(range(0, args.layers, 3)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_all(tmp, cfg)
        cfg_json = tmp / "cfg.json"
        cfg_json.write_text(json.dumps(dataclasses.asdict(cfg)))
        cases = [
            ("naive load_file + load_state_dict", paths["sharded"], "naive", ""),
            ("sharded dir fp32 -> fp32", paths["sharded"], "fp32", ""),
            ("single file, prefixed fp32 -> fp32", paths["prefixed"], "fp32", ""),
            ("single file bf16 -> bf16", paths["bf16"], "bf16", ""),
            ("sharded fp32 -> bf16", paths["sharded"], "bf16", ""),
            ("sharded fp32 -> fp8 (quantise)", paths["sharded"], "fp8", ""),
            ("ComfyUI fp8_scaled -> fp8", paths["fp8_scaled"], "fp8", ""),
            ("ComfyUI fp8_scaled -> bf16", paths["fp8_scaled"], "bf16", ""),
            (".pth fp32 -> fp32 (mmap)", paths["pth"], "fp32", ""),
            ("sharded fp32 + LoRA -> bf16", paths["sharded"], "bf16", str(paths["lora"])),
        ]
        for label, path, precision, lora in cases:
            out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(path), precision, lora, str(cfg_json)],
                                 capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"case": label, **figures})
    print(f"{'case':40s} {'time s':>7s} {'model MiB':>10s} {'peak+ MiB':>10s} {'peak/model':>10s}")
    for r in rows:
        print(f"{r['case']:40s} {r['seconds']:7.2f} {r['size'] / 2**20:10.0f} {r['extra'] / 2**20:10.0f} {r['extra'] / r['size']:10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    run()
