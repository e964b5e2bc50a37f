"""``python -m lora_analysis``: a thin command line over the library.

Each sub-command lives in its own module of this package with ``register(subparsers)``; a module adds
its parser and sets ``func`` to a function taking the parsed args and returning an exit code.

User errors are printed as one line, ``error: ...``, exit code 2: a ``ValueError`` (the library's way of
saying "this value is not allowed, here is what is"), and an ``OSError`` about a file named on the
command line (missing, unreadable). Anything else is a bug and shows as one, with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

# One entry per sub-command module in this package.
COMMANDS = ("params", "train", "spectra", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_analysis",
                                     description="Measure what LoRA does: parameters, training, spectra.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _about_a_named_file(exc: OSError, argv: list[str]) -> bool:
    """True when the OSError concerns a path given on the command line: that file, a file inside that
    folder, or a temporary file beside it (writers write beside their target, then rename)."""
    if not exc.filename:
        return False
    failed = Path(os.fspath(exc.filename)).expanduser().resolve()
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if not value or value.startswith("-"):
            continue
        named = Path(value).expanduser().resolve()
        if failed == named or named in failed.parents or (failed.parent == named.parent and failed.name.startswith(
                f".{named.name}")):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if not _about_a_named_file(exc, argv):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
