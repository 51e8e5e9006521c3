"""VRAM plan node: the planner's verdict for a model, size, precision and placement, before loading."""
from __future__ import annotations

from comfy_api.latest import io, ui

from . import types

MODELS = ["14B", "tiny"]


class VRAMPlan(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LiveAvatarVRAMPlan",
            display_name="LiveAvatar VRAM Plan",
            category=types.CATEGORY,
            description="Predicts per-GPU and host memory of a configuration without loading anything, and says whether it "
                        "fits; without a placement input it picks the cheapest placement that fits.",
            inputs=[
                io.Combo.Input("model", options=MODELS, default="14B",
                               tooltip="Model size preset: 14B (Wan2.2-S2V + LiveAvatar) or tiny (test models)."),
                io.Combo.Input("precision", options=["bf16", "fp16", "fp8", "fp32"], default="fp8",
                               tooltip="Weight precision, as in 'LiveAvatar Model Loader'."),
                io.String.Input("size", default="704*384",
                                tooltip="Video size W*H in pixels (the reference image's output size)."),
                io.Int.Input("steps", default=4, min=1, max=8, tooltip="Denoising steps (one KV cache each)."),
                io.String.Input("gpus", default="1x24",
                                tooltip="GPUs as COUNTxGIB, e.g. 1x24, 1x48, 4x24, 5x80."),
                types.Placement.Input("placement", optional=True,
                                      tooltip="A placement to check; without it the planner picks one that fits."),
                io.Float.Input("host_ram_gib", default=0.0, min=0.0, max=4096.0, step=1.0, optional=True,
                               tooltip="Host RAM the run may use, GiB; 0: what the system reports available now."),
                io.Boolean.Input("allow_lossy", default=True, optional=True,
                                 tooltip="Let the planner choose fp8 KV caches (slightly different results) when they "
                                         "are faster or needed to fit; off: exact placements only."),
            ],
            outputs=[io.String.Output(display_name="plan"), types.Placement.Output(display_name="placement")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, precision, size, steps, gpus, placement=None, host_ram_gib=0.0, allow_lossy=True) -> io.NodeOutput:
        from ..liveavatar.config import PRESETS, SamplerConfig
        from ..model_loaders.planner import (available_host_ram_gib, choose_placement, parse_gpus, parse_size,
                                             plan_memory, verdict)

        dit = PRESETS[model]
        width, height = parse_size(size)
        gpu_list = parse_gpus(gpus)
        scfg = SamplerConfig(steps=steps)
        mode = "single"
        host_ram = host_ram_gib or available_host_ram_gib()
        if placement is not None:
            plan = plan_memory(dit, precision, width, height, scfg, placement, 1, mode, model_name=model)
            chosen = placement
        else:
            chosen, plan = choose_placement(dit, precision, width, height, scfg, gpu_list[:1], mode, model_name=model,
                                            allow_fp8_kv=allow_lossy, host_ram_gib=host_ram)
        v = verdict(plan, gpu_list[:1], host_ram)
        text = plan.table() + "\n"
        if placement is None:
            text += f"chosen placement: {chosen.describe() if chosen else 'none fits'}\n"
        text += v.message
        return io.NodeOutput(text, chosen, ui=ui.PreviewText(text))


NODES = [VRAMPlan]
