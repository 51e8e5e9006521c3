"""``python -m liveavatar``: bootstrap the pack under its fixed name, then run the CLI."""
import sys

from .bootstrap import load_pack


def main() -> int:
    pack = load_pack()
    from importlib import import_module

    cli = import_module(f"{pack.__name__}.cli")
    return cli.run(sys.argv[1:])  # main() + one-line errors for the unexpected too


if __name__ == "__main__":
    sys.exit(main())
