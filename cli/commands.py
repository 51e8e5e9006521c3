"""CLI subcommands. Each command is a small object with ``register`` and ``run``."""
from __future__ import annotations

import argparse

GGUF_PLAN_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K")  # model_loaders.gguf_quants


class UserError(Exception):
    """A problem the user can fix (bad file, bad option); printed without a traceback."""


class Info:
    name = "info"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="print the pack version and the model presets")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .. import __version__
        from ..liveavatar.config import PRESETS

        print(f"LiveAvatar for ComfyUI {__version__}")
        for name, cfg in PRESETS.items():
            print(f"  preset {name}: dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads")
        return 0


class Demo:
    """Tiny random-weight models with the real architecture, synthetic face and voice -> an MP4 with sound."""

    name = "demo"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="run the whole pipeline on tiny random models (CPU, < 1 min)",
                           description=self.__doc__)
        p.add_argument("--out", default="demo.mp4", help="output MP4 (default demo.mp4; an existing file is refused "
                                                         "without --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        p.add_argument("--size", default="256*256", help="maximum pixel area W*H (default 256*256)")
        p.add_argument("--seconds", type=float, default=3.5, help="length of the synthetic speech")
        p.add_argument("--num-clips", type=int, default=0, help="clips to generate (0: follow the audio)")
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--frames-per-clip", type=int, default=48)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--prompt", default="a person talking to the camera")
        from .workers import add_worker_arguments

        add_worker_arguments(p)
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .demo import run_demo

        path = run_demo(args)
        print(f"wrote {path}")
        return 0


class Plan:
    """Predict per-GPU and host memory before loading anything; pick the fastest placement that fits
    the GPUs and the host RAM, by a predicted time per DiT call (its assumptions printed). On several
    GPUs without --mode: rank every layout (tpp, sp, tpp x sp, decode rank) by predicted fps and
    recommend the fastest that fits, with the runners-up."""

    name = "plan"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="VRAM/RAM plan of a configuration (and a placement that fits)",
                           description=self.__doc__)
        p.add_argument("--gpus", default="1x24", help="COUNTxGIB, e.g. 1x24, 4x24, 1x48, 1x80, 5x80 (default 1x24)")
        p.add_argument("--size", default="704*384", help="W*H (default 704*384)")
        p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp8", "fp32", *GGUF_PLAN_TYPES],
                       help="DiT weights; a GGUF type (Q8_0 ... Q3_K) plans a GGUF file's quantized weights")
        p.add_argument("--mode", choices=["single", "tpp", "sp"],
                       help="plan this mode only (default: single on 1 GPU; on several, every layout ranked by fps)")
        p.add_argument("--sp", type=int, metavar="N", help="with --mode tpp: step groups of N sequence-parallel ranks")
        p.add_argument("--decode-rank", action="store_true", help="with --mode tpp: one more GPU holds only the VAE")
        p.add_argument("--top", type=int, default=8, metavar="N", help="layouts listed on several GPUs (default 8)")
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--model", default="14B", help="preset name (14B, tiny) or a config.json path")
        p.add_argument("--blocks-on-device", type=int, help="block swap: DiT blocks kept on the GPU")
        p.add_argument("--kv-device", choices=["device", "cpu"], help="where KV caches live")
        p.add_argument("--kv-dtype", help="KV cache dtype, e.g. float8_e4m3fn (default: the model's)")
        p.add_argument("--offload", action="store_true", help="offload the model between uses")
        p.add_argument("--no-prefetch", action="store_true")
        p.add_argument("--host-ram", type=float, metavar="GIB",
                       help="host RAM the run may use, GiB (default: what the system reports available now; 0: no limit)")
        p.add_argument("--exact", action="store_true",
                       help="forbid lossy placements (fp8 KV caches); fp8 weights stay your --precision choice")
        p.add_argument("--bandwidth", type=float, default=25.0, metavar="GBPS",
                       help="assumed host->GPU copy rate, GB/s, for the predicted time (default 25: PCIe 4.0 x16)")
        p.add_argument("--tflops", type=float, default=400.0, metavar="TFLOPS",
                       help="assumed sustained DiT throughput, TFLOP/s, for the predicted time (default 400)")
        p.add_argument("--link", choices=["pcie", "pcie-p2p", "nvlink"],
                       help="GPU-to-GPU link (default by card size: < 40 GiB pcie without P2P, < 80 pcie-p2p, else nvlink)")
        p.add_argument("--link-gbps", type=float, metavar="GBPS",
                       help="assumed GPU-to-GPU bandwidth for collectives, GB/s (default: the link's, printed)")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from ..liveavatar.config import PRESETS, DiTConfig, SamplerConfig
        from ..model_loaders.placement import PlacementConfig
        from ..model_loaders.planner import (SpeedModel, available_host_ram_gib, choose_layout, choose_placement,
                                             parse_gpus, parse_size, plan_memory, verdict)

        try:
            speed = SpeedModel(args.bandwidth, args.tflops, args.link, args.link_gbps)
            if args.host_ram is not None and args.host_ram < 0:
                raise ValueError(f"--host-ram must be >= 0 GiB (0: no limit), got {args.host_ram}")
            if args.host_ram is None:
                host_ram, host_src = available_host_ram_gib(), "available now (psutil; override with --host-ram)"
            else:
                host_ram, host_src = (args.host_ram or None), "--host-ram"
            if host_ram is None:
                host_src = "not limited" + (" (psutil missing; give --host-ram)" if args.host_ram is None else "")
            gpus = parse_gpus(args.gpus)
            speed = speed.with_gpus(gpus)
            width, height = parse_size(args.size)
            scfg = SamplerConfig(steps=args.steps)
            scfg.validate()
            if args.model in PRESETS:
                dit, name = PRESETS[args.model], args.model
            elif Path(args.model).is_file():
                dit, name = DiTConfig.from_json(args.model), Path(args.model).name
            else:
                raise ValueError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a config file")
            if args.top < 1:
                raise ValueError(f"--top must be >= 1, got {args.top}")
            given = any(v is not None for v in (args.blocks_on_device, args.kv_device, args.kv_dtype)) or args.offload
            layouts = _plan_layouts(args, len(gpus), scfg.steps, dit.num_heads)
            choice = None
            if given or args.no_prefetch:
                placement = PlacementConfig(
                    blocks_on_device=args.blocks_on_device, kv_cache_device=args.kv_device or "device",
                    kv_cache_dtype=args.kv_dtype, offload_model_between_uses=args.offload, prefetch=not args.no_prefetch)
                plan = plan_memory(dit, args.precision, width, height, scfg, placement, model_name=name, speed=speed,
                                   layout=layouts[0])
            elif layouts == [None]:  # one GPU, no mode: the single-process placement
                placement, plan = choose_placement(dit, args.precision, width, height, scfg, gpus, "single",
                                                   model_name=name, allow_fp8_kv=not args.exact, host_ram_gib=host_ram,
                                                   speed=speed)
            else:
                choice = choose_layout(dit, args.precision, width, height, scfg, gpus, allow_fp8_kv=not args.exact,
                                       host_ram_gib=host_ram, speed=speed, layouts=layouts, model_name=name)
                best = choice.best or min(choice.unfit, key=lambda o: (o.plan.peak_device, o.plan.timing.block_s))
                placement, plan = best.placement, best.plan
        except ValueError as err:
            raise UserError(str(err)) from err
        if choice is not None:
            print("\n".join(choice.lines(args.top)))
            print(f"-- {'recommended' if choice.best else 'closest'} layout in detail: {plan.settings['layout']}")
        print(plan.table())
        print(f"host RAM limit: {f'{host_ram:.1f} GiB ({host_src})' if host_ram else host_src}")
        v = verdict(plan, gpus, host_ram)
        if choice is not None:
            layout = plan.settings["layout_obj"]
            print(f"recommended layout: {layout.name() + ': ' + layout.flags() if choice.best else 'none fits'}")
        if not given:
            print(f"chosen placement: {placement.to_dict() if placement else 'none fits'}")
        print(v.message)
        if args.precision not in GGUF_PLAN_TYPES:  # what a GGUF file would allow on these GPUs
            from ..model_loaders.gguf_plan import recommend_gguf

            # on several GPUs: GGUF weights in the layout planned above
            layout = plan.settings.get("layout_obj") if len(gpus) > 1 else None
            mode = layout.mode if layout is not None else "single"
            gguf = recommend_gguf(dit, width, height, scfg, gpus, mode, host_ram_gib=host_ram,
                                  allow_fp8_kv=not args.exact, speed=speed, model_name=name,
                                  **({"layout": layout} if layout is not None else {}))
            print("\n".join(gguf.lines()))
        return 0 if v.fits else 1


def _plan_layouts(args: argparse.Namespace, num_gpus: int, steps: int, num_heads: int) -> list:
    """The layouts ``plan`` considers: [None] for one GPU without --mode (the single-process path),
    every layout on several GPUs without --mode, else those --mode/--sp/--decode-rank name."""
    from ..model_loaders.planner import Layout, enumerate_layouts

    if args.sp is not None and (args.mode != "tpp" or args.sp < 1):
        raise ValueError(f"--sp N (N >= 1) goes with --mode tpp (step groups of N ranks); got --mode {args.mode}, "
                         f"--sp {args.sp}")
    if args.decode_rank and args.mode != "tpp":
        raise ValueError("--decode-rank goes with --mode tpp")
    if args.mode is None:
        return [None] if num_gpus == 1 else enumerate_layouts(num_gpus, steps, num_heads)
    if args.mode == "single":
        return [Layout()]
    if args.mode == "sp":
        return [Layout(1, num_gpus, sharded=True), Layout(1, num_gpus, sharded=False)]
    sp = args.sp or 1
    dit = num_gpus - int(args.decode_rank)
    if sp == 1:  # tpp: at most one step group per step; a spare GPU becomes the decode rank
        return [Layout(min(dit, steps), 1, decode_rank=args.decode_rank or dit > steps)]
    if dit % sp or dit // sp > steps:
        raise ValueError(f"--mode tpp --sp {sp} on {num_gpus} GPU(s){' (one decodes)' if args.decode_rank else ''}: "
                         f"expected {dit} DiT ranks to make 1..{steps} step groups of {sp}")
    return [Layout(dit // sp, sp, True, args.decode_rank), Layout(dit // sp, sp, False, args.decode_rank)]


class Generate:
    """Real weights from disk: an image and an audio track -> a lip-synced MP4 with sound."""

    name = "generate"

    def register(self, sub: argparse._SubParsersAction) -> None:
        from .generate import add_arguments

        p = sub.add_parser(self.name, help="generate a video with real model weights", description=self.__doc__)
        add_arguments(p)
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .generate import run_generate

        print(f"wrote {run_generate(args)}")
        return 0


class TinyModels:
    """Tiny random-weight model files in the real formats, in ComfyUI's folder layout, plus example inputs."""

    name = "tiny-models"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="write tiny random model files (ComfyUI folder layout) for the example workflows",
                           description=self.__doc__)
        p.add_argument("--out", required=True, help="folder to fill (diffusion_models/, loras/, vae/, text_encoders/, "
                                                    "audio_encoders/, input/); e.g. ComfyUI/models, whose "
                                                    "example inputs then go to ComfyUI/input")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from .tiny_models import inputs_dir, is_comfyui_models_dir, write_tiny_models

        for path in write_tiny_models(args.out):
            print(path)
        where = inputs_dir(Path(args.out))
        if is_comfyui_models_dir(Path(args.out)):
            print(f"example inputs written to ComfyUI's input folder {where} (where Load Image / Load Audio list them)")
        else:
            print(f"example inputs written to {where}; copy them to ComfyUI's input/ folder to run the examples")
        return 0


from .agent import WorkerAgent  # noqa: E402

class RunWorkflow:
    """Post an API-format workflow to a running ComfyUI, follow it to the end, download its outputs."""

    name = "run-workflow"

    def register(self, sub: argparse._SubParsersAction) -> None:
        p = sub.add_parser(self.name, help="run an API-format workflow on a ComfyUI server and download the video",
                           description=self.__doc__)
        p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default loopback :8188)")
        p.add_argument("--workflow", required=True, help="API-format workflow JSON, e.g. api_workflows/liveavatar_single_gpu_api.json")
        p.add_argument("--out", default=".", help="folder for the downloaded outputs")
        p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the prompt")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from pathlib import Path

        from .run_workflow import WorkflowError, load_api_workflow, run_workflow

        try:
            files = run_workflow(args.server, load_api_workflow(args.workflow), Path(args.out), timeout=args.timeout)
        except WorkflowError as err:
            raise UserError(str(err)) from err
        return 0 if files else 1


class Live:
    """Serve a page and a WebSocket API: audio in as it arrives, the avatar's video with sound out as it is made."""

    name = "live"

    def register(self, sub: argparse._SubParsersAction) -> None:
        from .live import add_live_arguments

        p = sub.add_parser(self.name, help="live avatar server (page + WebSocket API)", description=self.__doc__)
        add_live_arguments(p)
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .live import run_live

        return run_live(args)


class LiveClient:
    """Stream an audio file to a live server at real-time pace and save the received video with sound."""

    name = "live-client"

    def register(self, sub: argparse._SubParsersAction) -> None:
        from .live import add_client_arguments

        p = sub.add_parser(self.name, help="stream an audio file to `live` and save the MP4", description=self.__doc__)
        add_client_arguments(p)
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .live import run_client

        return run_client(args)


ALL = [Info(), Demo(), Generate(), Plan(), TinyModels(), WorkerAgent(), RunWorkflow(), Live(), LiveClient()]
