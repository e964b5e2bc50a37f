"""A package that installs like one: ``pip install .`` into a fresh virtual environment gives a working
``lora-analysis`` console script (and the dashboard's files), and ``--help`` starts without torch.

The venv sees the system's packages (``--system-site-packages``), so nothing is downloaded: the install
builds this project only (``--no-deps --no-build-isolation --no-index``), from a copy of its files, so the
checkout gets no build/ or egg-info folders."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import psutil
import pytest

from lora_analysis.cli import COMMANDS, build_parser
from tests.test_server import check_local_only, free_port, server

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "pandas", "streamlit", "numpy")


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with this project installed by pip; returns its bin folder."""
    base = tmp_path_factory.mktemp("pkg")
    source = base / "src"
    source.mkdir()
    for name in ["pyproject.toml", "README.md", "LICENSE", *(p.name for p in ROOT.glob("requirements*.txt"))]:
        shutil.copy(ROOT / name, source / name)
    for package in ("lora_analysis", "dashboard"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(env_dir)],
                   check=True)
    python = env_dir / "bin" / "python"
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "-q", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return env_dir / "bin"


def run_in(folder: Path, *command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with ``folder`` as working directory and a clean PYTHONPATH (so the checkout is not
    importable: what runs is what pip installed)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, env={**environ, **(env or {})})


def imported(importtime_log: str) -> set[str]:
    """Top-level package names in a ``-X importtime`` log."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime_log.splitlines()
            if line.startswith("import time:") and "|" in line}


def test_pip_install_gives_the_console_script_and_the_dashboard_files(venv, tmp_path):
    where = run_in(tmp_path, str(venv / "python"), "-c",
                   "import lora_analysis, dashboard; print(lora_analysis.__file__); print(dashboard.__file__)")
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv.parent), path        # the installed copy, not the checkout
    installed = Path(where.stdout.split()[1]).parent
    shipped = {p.relative_to(ROOT / "dashboard") for p in (ROOT / "dashboard").rglob("*.py")}
    assert shipped <= {p.relative_to(installed) for p in installed.rglob("*.py")}
    version = run_in(tmp_path, str(venv / "lora-analysis"), "--version")
    assert version.stdout.strip() == "lora-analysis 0.1.0"
    meta = run_in(tmp_path, str(venv / "python"), "-c", "from importlib.metadata import metadata as m; "
                  "print(m('lora-analysis')['License-Expression'])")
    assert meta.stdout.strip() == "MIT", meta.stderr                 # the LICENSE file's license, declared


def test_console_script_help_is_fast_and_imports_no_torch(venv, tmp_path):
    done = run_in(tmp_path, str(venv / "lora-analysis"), "--help", env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: lora-analysis ")
    for command in COMMANDS:
        assert f"    {command}" in done.stdout
    assert "lora_analysis" in imported(done.stderr)                # the log is read: it names our package
    assert not imported(done.stderr) & set(HEAVY), imported(done.stderr) & set(HEAVY)


def test_console_script_counts_parameters(venv, tmp_path):
    done = run_in(tmp_path, str(venv / "lora-analysis"), "params", "--shape", "8x8", "--rank", "2", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert (out["lora_params"], out["full_params"], out["shape"]) == (2 * (8 + 8), 64, [8, 8])


def test_installed_dashboard_command_serves_on_loopback_only(venv, tmp_path):
    """``lora-analysis dashboard`` from the installed package, in a folder without any Streamlit config."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with server([str(venv / "lora-analysis"), "dashboard", "--port", str(port)], tmp_path, port,
                env={**environ, "LORA_ANALYSIS_HOME": str(tmp_path / "home")}) as (proc, log_path):
        check_local_only(proc.pid, port)
        command = psutil.Process(proc.pid).cmdline()            # the CLI replaced itself with Streamlit
        assert Path(command[command.index("run") + 1]).is_relative_to(venv.parent)
    log = log_path.read_text()
    assert f"http://127.0.0.1:{port} (this machine only" in log and "Network URL" not in log


def test_module_help_imports_no_heavy_package():
    """``python -m lora_analysis --help`` and ``dashboard --help``: only the chosen command's module is
    imported, and these need neither torch nor pandas."""
    for argv in (["--help"], ["dashboard", "--help"], ["--version"]):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "lora_analysis", *argv], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        names = imported(done.stderr)
        assert "lora_analysis" in names and not names & set(HEAVY), (argv, names & set(HEAVY))


def _examples(parser: argparse.ArgumentParser) -> list[list[str]]:
    """The arguments of each example line (``  PROG args``) of a parser's epilog."""
    return [shlex.split(line.split("%(prog)s", 1)[1]) for line in (parser.epilog or "").splitlines()
            if line.startswith("  %(prog)s")]


def test_every_command_says_what_it_does_with_examples_that_parse():
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == set(COMMANDS)
    listed = {action.dest: action.help for action in sub._choices_actions}
    for name, (_, help_text) in COMMANDS.items():
        assert listed[name] == help_text, name                   # the top level's list is the commands' own
        command = sub.choices[name]
        assert command.description, name
        examples = _examples(command)
        assert examples, f"{name} --help shows no example"
        assert "examples:" in command.format_help()
        for argv in examples:
            args = build_parser().parse_args([name, *argv])     # SystemExit (a failure) if it does not parse
            assert args.command == name
    for argv in _examples(parser):
        build_parser().parse_args(argv)


def test_example_layout_is_kept_and_prog_is_the_console_script_name(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/bin/lora-analysis"])
    text = build_parser(["params"])._subparsers._group_actions[0].choices["params"].format_help()
    assert "\n  lora-analysis params --shape 4096x4096 --rank 8\n" in text
    monkeypatch.setattr(sys, "argv", ["/repo/lora_analysis/__main__.py"])
    assert build_parser(["--help"]).prog == "python -m lora_analysis"


def test_extras_match_their_requirements_files():
    """Each requirements-<extra>.txt is the extra ``[extra]`` of the package (requirements-dev.txt: dev),
    and the runtime dependencies are requirements.txt itself; the torch pin stays."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    extras = project["project"]["optional-dependencies"]
    for path in ROOT.glob("requirements-*.txt"):
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        wanted = [line for line in lines if line and not line.startswith("-r")]
        extra = path.stem.removeprefix("requirements-")
        assert extras.get(extra) == wanted, f"pyproject.toml's [{extra}] extra differs from {path.name}"
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text().split()
