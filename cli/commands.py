"""CLI subcommands. Each command is a small object with ``register`` and ``run``."""
from __future__ import annotations

import argparse


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
        p.add_argument("--out", default="demo.mp4", help="output MP4 (default demo.mp4)")
        p.add_argument("--size", default="256*256", help="maximum pixel area W*H (default 256*256)")
        p.add_argument("--seconds", type=float, default=3.5, help="length of the synthetic speech")
        p.add_argument("--num-clips", type=int, default=0, help="clips to generate (0: follow the audio)")
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--frames-per-clip", type=int, default=48)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--prompt", default="a person talking to the camera")
        p.set_defaults(run=self.run)

    def run(self, args: argparse.Namespace) -> int:
        from .demo import run_demo

        path = run_demo(args)
        print(f"wrote {path}")
        return 0


ALL = [Info(), Demo()]
