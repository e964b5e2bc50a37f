"""What a command line names when it names something to analyse: a run of the run store (by id, unique id
prefix, name or folder), a PEFT adapter folder (any: ours, a run's, PEFT's) or one adapter ``.safetensors``
file (kohya / diffusers / loralib, :mod:`lora_analysis.lora.formats`). One resolver, so
``runs show``, ``spectra``, ``similarity`` and ``report`` accept the same words, and an error says what was
tried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import runstore
from . import plural, store_hint

ADAPTER_CONFIG = "adapter_config.json"


def find_run(text: str, runs_dir: str | os.PathLike | None = None) -> runstore.Run:
    """The run ``text`` names: a run id, a unique id prefix, a run folder, or a run's name (``train --name
    r8``; the newest run of that name when several share it). ``ValueError`` says what was tried."""
    try:
        return runstore.load_run(text, runs_dir)
    except ValueError as by_id:
        root = runstore.runs_root(runs_dir)
        named = [r for r in runstore.list_runs(runs_dir) if r.name == text and not r.damaged]
        if named:
            return max(named, key=lambda r: r.created)
        count = len([d for d in root.iterdir() if not d.name.startswith(".")]) if root.is_dir() else 0
        reason = str(by_id).split(": ", 1)[1] if ": run ids never" in str(by_id) else (
            "the prefix is ambiguous" if "ambiguous" in str(by_id) else "no run id, id prefix or run name matches")
        raise ValueError(f"run {text!r} not found in the run store {root.resolve()} ({plural(count, 'run')} there): "
                         f"{reason}"
                         f"{store_hint(runs_dir)}") from None


def run_files(run: runstore.Run) -> dict[str, str]:
    """Where a run keeps what an analysis reads: {"folder", "adapter" (LoRA), "full_weights" (full
    fine-tuning), "base_weights" (W0, when kept beside the run), "metrics"}: absolute paths of files that
    exist."""
    folder = run.dir.resolve()
    files = {"folder": folder, "adapter": folder / runstore.ADAPTER_DIR,
             "full_weights": folder / runstore.FULL_WEIGHTS, "base_weights": folder / runstore.BASE_WEIGHTS,
             "metrics": folder / runstore.METRICS_FILE}
    return {k: str(v) for k, v in files.items() if v.exists()}


@dataclass
class Subject:
    """A thing to analyse: ``run`` (when it is, or holds, a run of the store) and/or ``adapter`` (a PEFT
    adapter folder or an adapter file; None for a full fine-tuning run). ``label`` is how outputs name it."""

    text: str
    label: str
    run: runstore.Run | None
    adapter: Path | None

    @property
    def base_weights(self) -> Path | None:
        """The run's own W0 file, when it kept one."""
        path = None if self.run is None else self.run.dir / runstore.BASE_WEIGHTS
        return path if path is not None and path.is_file() else None

    def describe(self) -> str:
        """What this is and where its files are (a run: three lines)."""
        if self.run is None:
            return f"adapter {'file' if self.adapter.is_file() else 'folder'} {self.adapter.resolve()}"
        files = run_files(self.run)
        weights = (f"  adapter:      {files['adapter']}" if "adapter" in files else
                   f"  weights:      {files.get('full_weights', 'missing')}")
        base = (f"  base weights: {files['base_weights']}" if "base_weights" in files else
                "  base weights: not kept beside the run (pass --base)")
        return "\n".join([f"run {self.run.id} ({self.run.name}, {self.run.method}) in {files['folder']}", weights, base])


def _run_of(folder: Path) -> runstore.Run | None:
    return runstore.load_run(folder) if (folder / runstore.RUN_FILE).is_file() else None


def resolve(text: str, runs_dir: str | os.PathLike | None = None) -> Subject:
    """An adapter folder, an adapter ``.safetensors`` file, a run folder, or a run of the store by id / unique
    id prefix / name. A run must be completed. A pickle file is refused (never unpickled). ``ValueError``
    names what was tried."""
    from ..lora.formats import PICKLE_SUFFIXES, refuse_pickle

    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() == ".safetensors":
        folder = path.parent        # a run's or PEFT folder's own weights file: that folder, its config included
        if path.name == "adapter_model.safetensors" and (folder / ADAPTER_CONFIG).is_file():
            run = _run_of(folder.parent) if folder.name == runstore.ADAPTER_DIR else None
            subject = Subject(text, text, run, folder)
        else:
            subject = Subject(text, text, None, path)
    elif path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    elif path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        run = _run_of(path.parent) if path.name == runstore.ADAPTER_DIR else None
        subject = Subject(text, text, run, path)
    elif path.is_dir() and (path / runstore.RUN_FILE).is_file():
        run = runstore.load_run(path)
        subject = Subject(text, text, run, None)
    elif path.exists():
        what = "a folder without" if path.is_dir() else "a file, neither .safetensors nor a folder with"
        raise ValueError(f"'{text}' is {what} {ADAPTER_CONFIG} (a PEFT adapter) or {runstore.RUN_FILE} (a run "
                         "folder); an adapter file is one .safetensors file (kohya/diffusers, PEFT-style keys or "
                         "loralib)")
    else:
        try:
            run = find_run(text, runs_dir)
        except ValueError as exc:
            raise ValueError(f"'{text}' is neither an adapter folder or file ({path.resolve()} does not exist) nor "
                             f"a run: {exc}") from None
        subject = Subject(text, run.name, run, None)
    run = subject.run
    if run is not None:
        if run.status != "completed":
            raise ValueError(f"run {run.id} is {run.status}: only completed runs have updates to analyse")
        if subject.adapter is None and run.method != "full":
            adapter = run.dir / runstore.ADAPTER_DIR
            if not (adapter / ADAPTER_CONFIG).is_file():
                raise ValueError(f"run {run.id} has no adapter: {adapter} holds no {ADAPTER_CONFIG}")
            subject.adapter = adapter
    return subject


def load_subject_updates(subject: Subject, base: str | os.PathLike | None = None) -> dict:
    """{module: ModuleUpdate} of a subject: a run's through the run store (W0 from the run's own base
    weights, else from ``base``), an adapter folder's from its files (W0 from ``base``)."""
    if subject.run is not None:
        return runstore.load_updates(subject.run, base=base)
    from ..analysis.sources import load_updates
    return load_updates(subject.adapter, base)[1]
