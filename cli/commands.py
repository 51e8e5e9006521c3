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


ALL = [Info()]
