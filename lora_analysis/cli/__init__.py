"""``python -m lora_analysis``: a thin command line over the library.

Each sub-command lives in its own module of this package with ``register(subparsers)``; a module adds
its parser and sets ``func`` to a function taking the parsed args and returning an exit code.
Library errors (``ValueError`` and friends) are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# One entry per sub-command module in this package.
COMMANDS = ("params", "train", "spectra", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_analysis",
                                     description="Measure what LoRA does: parameters, training, spectra.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
