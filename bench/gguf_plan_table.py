"""The README's GGUF table: per GPU size and frame size, each GGUF type's fastest fitting placement
and the recommended type (``model_loaders.gguf_plan.recommend_gguf``; host RAM 64 GiB, 4 steps).

Usage: python bench/gguf_plan_table.py  (prints the Markdown table)
"""
from __future__ import annotations

import _pack

_pack.load()
from liveavatar_pack.liveavatar.config import WAN_S2V_14B, SamplerConfig  # noqa: E402
from liveavatar_pack.model_loaders.gguf_plan import QUALITY_ORDER, recommend_gguf  # noqa: E402
from liveavatar_pack.model_loaders.planner import GiB, parse_size  # noqa: E402

ROWS = (("1x16", "688*368"), ("1x16", "704*384"), ("1x12", "688*368"), ("1x12", "704*384"))


def _cell(pc, plan) -> str:
    if pc is None:
        return "does not fit"
    where = "all blocks" if pc.blocks_on_device is None else f"swap {pc.blocks_on_device} resident"
    return f"{where}, {plan.timing.call_s:.3f} s"


def _placement(pc) -> str:
    blocks = "all blocks resident" if pc.blocks_on_device is None else f"block swap ({pc.blocks_on_device} resident)"
    kv = ("fp8 KV" if pc.kv_fp8 else "KV") + (" on host" if pc.kv_cache_device == "cpu" else " on GPU")
    return f"{blocks}, {kv}"


def table() -> str:
    choices = [(g, s, recommend_gguf(WAN_S2V_14B, *parse_size(s), SamplerConfig(), g, host_ram_gib=64)) for g, s in ROWS]
    weights = choices[0][2].weights
    head = " | ".join(f"{q} ({weights[q] / GiB:.1f} GiB)" for q in QUALITY_ORDER)
    lines = [f"| GPUs | size | {head} | recommended |", "|---|---|" + "---|" * len(QUALITY_ORDER) + "---|"]
    for g, s, c in choices:
        cells = {q: _cell(pc, plan) for q, pc, plan in c.tried}
        best = f"**{c.qtype}**, {_placement(c.placement)}" if c.qtype else "none fits"
        lines.append(f"| {g} | {s} | " + " | ".join(cells[q] for q in QUALITY_ORDER) + f" | {best} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
