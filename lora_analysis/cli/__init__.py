"""``lora-analysis`` (or ``python -m lora_analysis``): a thin command line over the library.

Each sub-command lives in a module of this package with ``register(subparsers)``; a module adds its
parsers and sets ``func`` to a function taking the parsed args and returning an exit code. ``COMMANDS``
names each command's module and its one-line help, so the top-level parser (and ``--help``) is built
without importing any command module: only the chosen command's module is imported, and with it torch,
pandas or transformers when that command needs them.

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

# command -> (module of this package that registers it, its one-line help). A module registering a
# command takes its help from here (``help_for``); the test suite checks both agree.
COMMANDS: dict[str, tuple[str, str]] = {
    "params": ("params", "count trainable parameters of LoRA versus full fine-tuning"),
    "train": ("train", "fine-tune one model with LoRA or fully, into the run store"),
    "sweep": ("train", "many LoRA runs (ranks × alphas × scaling × targets) plus full FT"),
    "runs": ("train", "list, show, delete, export or import runs of the run store"),
    "spectra": ("spectra", "singular spectra, ranks and (with --base) amplification and intruders of an "
                           "adapter's ΔW"),
    "similarity": ("spectra", "subspace similarity φ between two adapters (LoRA paper Eq. 4)"),
    "report": ("report", "write a self-contained HTML report of runs"),
    "findings": ("findings", "check published LoRA findings (Hu et al., Biderman et al., Shuttleworth et al.) "
                             "on runs"),
    "dashboard": ("dashboard", "start the Streamlit dashboard (on this machine only, unless --expose)"),
}

# Examples shown under ``--help`` of commands whose module does not set its own ``epilog``.
# (train and runs live in cli/train.py; these move there when that module sets them itself.)
EXAMPLES = {
    "train": """\
examples:
  %(prog)s --model mlp-digits --rank 8 --alpha 16 --name r8
      LoRA at rank 8 on the built-in digits MLP (seconds on a CPU); the run lands in the run store, and
      later commands name it r8 (lora-analysis spectra r8, runs show r8)
  %(prog)s --model mlp-digits --method full --steps 300 --name full-ft
      full fine-tuning of the same base, for comparison
  %(prog)s --model tiny-gpt --rank 8 --targets q_proj,k_proj,v_proj --json
      the small built-in language model, LoRA on three attention projections; metrics as JSON""",
    "runs": """\
examples:
  %(prog)s list
      one line per run in the run store (the default action)
  %(prog)s show r8
      a run's record, metrics and where its files are (adapter, base weights); by name, id or id prefix
  %(prog)s list --runs-dir shared/runs
      the runs of another run store (what sweep --out shared/runs wrote)
  %(prog)s export 20260130-1201 --to shared/
      write the run as one zip to share; the recipient runs: %(prog)s import shared/RUN_ID.zip
  %(prog)s delete 20260130-1201""",
}


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that a line of a description or epilog that starts with a space
    (an example command, its explanation) is kept as written; other lines are filled as usual."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n".join(indent + line if not line or line.startswith(" ") else
                         super(HelpFormatter, self)._fill_text(line, width, indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """An ArgumentParser using :class:`HelpFormatter`; sub-parsers are of this class too, so every
    command's examples keep their layout."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def help_for(command: str) -> str:
    """The one-line help of ``command`` (what ``--help`` of the top level lists)."""
    return COMMANDS[command][1]


def _prog() -> str:
    """``lora-analysis`` for the console script, ``python -m lora_analysis`` for the module."""
    argv0 = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m lora_analysis" if argv0 in ("__main__.py", "-m", "-c", "") else "lora-analysis"


# ---- the run store, the same option on every command that reads or writes it ---------------------------

RUNS_DIR_HELP = ("run store folder (default: $LORA_ANALYSIS_HOME/runs, else the user data folder's runs/, "
                 "now {default}); --out is the same option")


def default_runs_root() -> Path:
    """The run store a command uses without ``--runs-dir`` (``runstore.runs_root(None)``, without importing
    the store, which needs torch)."""
    from ..paths import home_dir
    return home_dir() / "runs"


def add_runs_dir(parser: argparse.ArgumentParser, dest: str = "runs_dir", alias: bool = True) -> None:
    """``--runs-dir DIR`` (alias ``--out``): every command that reads or writes runs takes it, same name,
    same meaning. ``alias=False`` where ``--out`` would read as the command's own output (``runs export``)."""
    text = RUNS_DIR_HELP.format(default=str(default_runs_root()).replace("%", "%%"))
    parser.add_argument("--runs-dir", *(["--out"] if alias else []), dest=dest, default=None, metavar="DIR",
                        help=text if alias else text.split("; --out")[0])


def _shell_word(text: str) -> str:
    import shlex
    return shlex.quote(text)


def elsewhere_note(runs_dir: str | os.PathLike | None, what: str = "the runs") -> str | None:
    """When ``runs_dir`` is a run store other than the default one, the command lines that read it (a
    command without ``--runs-dir`` reads the default store and would not see these runs); else None."""
    if not runs_dir:
        return None
    store, default = Path(runs_dir).expanduser(), default_runs_root()
    try:
        if store.resolve() == default.resolve():
            return None
    except OSError:
        pass
    prog, where = _prog(), _shell_word(str(runs_dir))
    verb, them = ("are", "them") if what.endswith("s") else ("is", "it")
    lines = [f"{what} {verb} in {runs_dir}, not in the default run store ({default}); read {them} with:",
             f"  {prog} runs list --runs-dir {where}",
             f"  {prog} report --runs-dir {where} --html report.html"]
    if store.name == "runs":      # the dashboard reads <LORA_ANALYSIS_HOME>/runs (and keeps its jobs there)
        lines.append(f"  LORA_ANALYSIS_HOME={_shell_word(str(store.parent.resolve()))} {prog} dashboard")
    return "\n".join(lines)


def store_hint(runs_dir: str | os.PathLike | None) -> str:
    """For a message saying the default run store lacks something: where else runs are (``./runs`` holding
    runs, the usual ``--out`` of the README's older examples), as a sentence to append; else ``""``."""
    if runs_dir:
        return ""
    here = Path("runs")
    try:
        if here.resolve() == default_runs_root().resolve() or not here.is_dir():
            return ""
        count = sum(1 for d in here.iterdir() if (d / "run.json").is_file())
    except OSError:
        return ""
    return (f" ({here.resolve()} holds {plural(count, 'run')}: add --runs-dir runs to read "
            f"{'them' if count > 1 else 'it'})" if count else "")


def plural(count: int, noun: str) -> str:
    """``1 run``, ``2 runs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _chosen(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first argument that is not an option), or None."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. With ``argv``, only the module of the command it names is imported and
    registers its full parser; the other commands get a placeholder with their help line (enough for the
    top-level ``--help`` and for argparse to list the choices). Without ``argv``, every command's full
    parser is built."""
    from .. import __version__

    parser = Parser(prog=_prog(), description="Measure what LoRA does: parameter savings, training, spectra, "
                                              "subspaces, merges, reports, and a dashboard to see them.",
                    epilog="examples:\n"
                           "  %(prog)s params --preset llama-2-7b --rank 8\n"
                           "  %(prog)s train --model mlp-digits --rank 4 --alpha 16\n"
                           "  %(prog)s dashboard\n"
                           "each command's --help says what it does, with examples")
    parser.add_argument("--version", action="version", version=f"lora-analysis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    modules = ({COMMANDS[chosen][0]} if chosen else set()) if argv is not None else \
        {module for module, _ in COMMANDS.values()}
    for name, (module, help_text) in COMMANDS.items():
        if name in sub.choices:
            continue
        if module in modules:
            importlib.import_module(f"{__name__}.{module}").register(sub)
            for registered, command in sub.choices.items():
                if command.epilog is None and registered in EXAMPLES:
                    command.epilog = EXAMPLES[registered]
        else:
            sub.add_parser(name, help=help_text)      # a placeholder: never parses (another command was named)
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
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:       # the reader went away (``... | head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        if not _about_a_named_file(exc, argv):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
