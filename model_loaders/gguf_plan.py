"""Which GGUF type (and placement) to use on given GPUs: the planner run once per type.

Rule: among Q8_0, Q6_K, Q5_K and Q4_K (the types ComfyUI users pick; Q4_K_S/M are the common
defaults), each with its fastest placement that fits (``choose_placement``), the fastest by
predicted time per DiT call; a type within 5% of the fastest but of higher quality wins (when
all are compute-bound, the best quality that fits). Q3_K only when none of those fits.
The predicted time does not count dequantization (about the same work for every type: a pass
over the weights per call; bench/bench_gguf.py measures it), so it does not change the ranking.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..liveavatar.config import DiTConfig, SamplerConfig
from .placement import PlacementConfig
from .planner import GiB, MemoryPlan, SpeedModel, choose_placement, weight_bytes

__all__ = ["GGUFChoice", "recommend_gguf", "QUALITY_ORDER", "LAST_RESORT"]

QUALITY_ORDER = ("Q8_0", "Q6_K", "Q5_K", "Q4_K")
LAST_RESORT = ("Q3_K",)
TIE = 0.05


@dataclass
class GGUFChoice:
    qtype: str | None  # None: no type fits
    placement: PlacementConfig | None
    plan: MemoryPlan | None
    tried: list[tuple[str, PlacementConfig | None, MemoryPlan]]
    weights: dict[str, int]  # type -> bytes of the DiT's weights

    def lines(self) -> list[str]:
        out = ["GGUF weights (ComfyUI-GGUF files, kept quantized; dequantized per call):"]
        for q, pc, plan in self.tried:
            t = plan.timing.call_s if plan.timing is not None else float("nan")
            where = pc.describe() if pc is not None else "does not fit"
            out.append(f"   {q:5s} weights {self.weights[q] / GiB:5.1f} GiB, peak {plan.peak_device / GiB:5.1f} GiB, "
                       f"{t:.3f} s per DiT call: {where}")
        if self.qtype is None:
            out.append("GGUF recommendation: none fits (fewer pixels, fewer steps, or more GPUs)")
        else:
            out.append(f"GGUF recommendation: {self.qtype} ({self.placement.describe()})")
        return out


def recommend_gguf(dit_cfg: DiTConfig, width: int, height: int, sampler_cfg: SamplerConfig, gpus, mode: str = "single",
                   *, host_ram_gib: float | None = None, allow_fp8_kv: bool = True, speed: SpeedModel = SpeedModel(),
                   **plan_kwargs) -> GGUFChoice:
    """The recommended GGUF type and placement (see the module docstring)."""
    tried = []
    for group in (QUALITY_ORDER, LAST_RESORT):
        fitting = []
        for q in group:
            pc, plan = choose_placement(dit_cfg, q, width, height, sampler_cfg, gpus, mode, host_ram_gib=host_ram_gib,
                                        allow_fp8_kv=allow_fp8_kv, speed=speed, **plan_kwargs)
            tried.append((q, pc, plan))
            if pc is not None:
                fitting.append((q, pc, plan))
        if fitting:
            fastest = min(plan.timing.call_s for _, _, plan in fitting)
            q, pc, plan = next(f for f in fitting if f[2].timing.call_s <= fastest * (1 + TIE))  # quality order
            return GGUFChoice(q, pc, plan, tried, _weights(dit_cfg, tried))
    return GGUFChoice(None, None, None, tried, _weights(dit_cfg, tried))


def _weights(cfg: DiTConfig, tried) -> dict[str, int]:
    return {q: weight_bytes(cfg, q).total(cfg.num_layers) for q, _, _ in tried}
