"""Runs on disk: every training run is one directory that the analyses and the dashboard read.

    <runs root>/<run id>/
        run.json                  config, seed, environment (what the numbers depend on: versions, threads,
                                  BLAS, CPU, device), status, error, final metrics, timestamps, the writer's
                                  identity (pid, its start time, host) and the run's origin (its first id)
        metrics.csv               one row per step: train_loss (+ val_* on evaluation steps); appended to
        spectra_history.csv       LoRA runs that recorded it: one row per recording step and module, the
                                  factored spectrum's numbers (see :data:`HISTORY_COLUMNS`); appended to
        adapter/                  LoRA runs: the adapter in PEFT format (adapter_config.json + safetensors)
        full_weights.safetensors  full fine-tuning runs: W_ft of every adaptable module, (out, in) float32
        base_weights.safetensors  W0 of the same modules, (out, in), when small enough to keep beside the run

The runs root is ``--runs-dir`` when given, else ``$LORA_ANALYSIS_HOME/runs``, else the user data folder.
Crash safety: run.json and the tensors are replaced through :mod:`.files` (temp file, fsync, rename), so a
reader sees the old or the new file; metrics.csv only grows, so a flush appends its new rows. A run left
"running" by a process that died (its pid is gone or now names another process, or its heartbeat is stale)
is reported as "interrupted". Every run.json is checked against one schema (:class:`RunRecord`,
:func:`validate_record`) before it is used; a folder whose run.json is missing, unreadable or off-schema
lists as a "damaged" run that says why and can be deleted, so one bad run never breaks a listing. Run ids
are a timestamp plus a random suffix, and a directory is claimed with an exclusive ``mkdir``, so concurrent
runs never share one. Only run folders directly inside the runs root are ever deleted. metrics.csv is read
bounded (:data:`MAX_METRICS_READ_BYTES`: the header and the newest rows).

A run keeps its ``origin`` (the id it was first given) through every export and import, so a re-imported
copy, even under a new id, is recognised as the same run (:func:`unique_runs` keeps one per origin).
Temporary files and folders that killed writers and imports left are removed when a process first lists
the store or starts a run (:func:`clean_leftovers`).

Reading a run never trains, downloads or rebuilds anything: :func:`load_updates` takes W0 from the run's
own base_weights.safetensors, or from a ``base`` the caller names.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import psutil
import torch

from ..paths import home_dir
from ..weights import ModuleUpdate
from .environment import environment
from .files import append_text, atomic_save_tensors, atomic_write_text
from .liveness import is_alive, on_this_host, process_identity

STATUSES = ("running", "completed", "failed", "interrupted", "cancelled")
RUN_FILE, METRICS_FILE = "run.json", "metrics.csv"
HISTORY_FILE = "spectra_history.csv"
# spectra_history.csv: these columns, then sigma_1 .. sigma_K (the top K singular values of the scaled ΔW,
# K fixed by the run's first recording: its largest rank, at most HISTORY_TOP_K)
HISTORY_COLUMNS = ["step", "module", "rank", "effective_rank", "stable_rank", "norm", "spectral_norm"]
HISTORY_TOP_K = 64
ADAPTER_DIR, FULL_WEIGHTS, BASE_WEIGHTS = "adapter", "full_weights.safetensors", "base_weights.safetensors"
# every parameter of a fully fine-tuned model (biases and norms too), kept when small, to restore the model
FULL_MODEL = "full_model.safetensors"
HEARTBEAT_STALE_S = 300.0          # a "running" run on another host silent for this long is interrupted
FORMAT_VERSION = 1                 # later fields (pid_start_time, base_revision) are additions: still 1
# the run's task record keeps the resolved revision of its base model under this key (commit hash)
BASE_REVISION_KEY = "base_revision"
DELETING_PREFIX, IMPORTING_PREFIX = ".deleting-", ".import-"
_IMPORT_NAME = re.compile(r"^\.import-(?P<pid>\d+)-(?P<ms>\d+)-[0-9a-f]+$")
STALE_LEFTOVER_S = 24 * 3600.0     # an import folder whose owner cannot be told is dropped after a day
DAMAGED = "damaged"                # the status a listing shows for a folder whose run.json cannot be read
CLAIM_GRACE_S = 60.0               # a run folder without run.json younger than this is being created
MAX_RUN_JSON_BYTES = 16 * 2**20     # a run.json is a few KiB; a larger one is not read
MAX_METRICS_READ_BYTES = 16 * 2**20   # a page reads at most the header and the last this many bytes of metrics
_TMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)\.\d+\.[0-9a-f]+\.tmp$")   # store.files' temporary files


def runs_root(runs_dir: str | os.PathLike | None = None) -> Path:
    """``runs_dir`` if given, else ``<home>/runs`` (home: ``$LORA_ANALYSIS_HOME`` or the user data folder)."""
    return Path(runs_dir).expanduser() if runs_dir else home_dir() / "runs"


# ---- reading -----------------------------------------------------------------------------------------

@dataclass
class Run:
    """A run as read from disk. ``status`` is the effective one (a dead "running" run reads "interrupted");
    ``record`` is run.json as stored."""

    id: str
    dir: Path
    status: str
    config: dict
    metrics: dict
    created: float
    finished: float | None
    error: str | None
    name: str
    sweep_id: str | None
    environment: dict
    task: dict
    record: dict = field(repr=False, default_factory=dict)
    store: Path | None = field(repr=False, default=None)   # the runs root it was listed from, if any

    @property
    def damaged(self) -> bool:
        return self.status == DAMAGED

    @property
    def origin(self) -> str:
        """The id the run was first given, wherever it was made: an imported copy (even under a new id)
        has the origin of the run it copies. Older records without it: the id they were imported as a new
        id of, or their own id."""
        return str(self.record.get("origin") or self.record.get("imported_as_new_id_of") or self.id)

    @property
    def imported(self) -> bool:
        return self.record.get("imported") is not None

    @property
    def method(self) -> str:
        return self.config.get("method", "lora")

    @property
    def model(self) -> str:
        return self.config.get("model", "")

    def metrics_frame(self, max_bytes: int = MAX_METRICS_READ_BYTES) -> pd.DataFrame:
        """Per-step metrics (step, train_loss, val_loss, val_accuracy or val_perplexity, lr, elapsed_s).

        At most ``max_bytes`` are read: a larger file gives its header and its last rows (the curves'
        recent end), so a page run never reads a whole huge file. Every column is numeric (a value that is
        not reads NaN); a file that is not CSV reads as no rows, with a warning."""
        return read_metrics_csv(self.dir / METRICS_FILE, max_bytes)

    def spectra_history(self, max_bytes: int = MAX_METRICS_READ_BYTES) -> pd.DataFrame | None:
        """The spectra recorded during training (spectra_history.csv: one row per recording step and
        module: step, module, rank, effective_rank, stable_rank, norm = ‖ΔW‖_F, spectral_norm = σ₁,
        sigma_1 .. sigma_K), or None when the run recorded none. Read bounded like :meth:`metrics_frame`."""
        return read_history_csv(self.dir / HISTORY_FILE, max_bytes)


def effective_status(record: dict, now: float | None = None) -> str:
    """The status to show: a "running" record whose process is gone reads "interrupted"."""
    status = record.get("status", "running")
    if status != "running":
        return status if status in STATUSES else "failed"
    now = time.time() if now is None else now
    silent = now - float(record.get("heartbeat") or record.get("created") or 0.0)
    if not on_this_host(record):
        # a heartbeat from the future (beyond clock skew) is no sign of life either
        return "running" if -HEARTBEAT_STALE_S < silent < HEARTBEAT_STALE_S else "interrupted"
    if record.get("pid_start_time") is not None:
        return "running" if is_alive(record) else "interrupted"
    # a run written before start times were kept: its pid, and a very old heartbeat for a recycled pid
    return "running" if is_alive(record) and silent < 12 * HEARTBEAT_STALE_S else "interrupted"


def _read_csv_tail(path: Path, max_bytes: int, what: str, **read_csv) -> tuple[pd.DataFrame | None, bool]:
    """A CSV file's header and its last ``max_bytes`` bytes (the first, partial line of the tail dropped), as
    a frame (``read_csv``: options of :func:`pandas.read_csv`), and whether the file was cut; (None, False)
    when the file is missing, unreadable or not CSV (with a warning for the last two)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size <= max_bytes:
                data, cut = f.read(), False
            else:
                header = f.readline(64 * 2**10)
                f.seek(size - max_bytes)
                tail = f.read(max_bytes)
                data, cut = header + tail[tail.find(b"\n") + 1:], True
    except FileNotFoundError:
        return None, False
    except OSError as exc:          # a folder named metrics.csv, no permission: no curves, not a crash
        warnings.warn(f"{path} cannot be read ({exc}): no {what} shown", stacklevel=4)
        return None, False
    try:
        return pd.read_csv(io.BytesIO(data), **read_csv), cut
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        warnings.warn(f"{path} is not a readable CSV file ({exc}): no {what} shown", stacklevel=4)
        return None, False


def read_metrics_csv(path: Path, max_bytes: int = MAX_METRICS_READ_BYTES) -> pd.DataFrame:
    """metrics.csv as numbers, reading at most the header and the last ``max_bytes`` bytes."""
    frame, _ = _read_csv_tail(path, max_bytes, "metrics")
    if frame is None:
        return pd.DataFrame(columns=["step", "train_loss"])
    return frame.apply(pd.to_numeric, errors="coerce")


def read_history_csv(path: Path, max_bytes: int = MAX_METRICS_READ_BYTES) -> pd.DataFrame | None:
    """spectra_history.csv (:data:`HISTORY_COLUMNS` + ``sigma_1`` ..), reading at most the header and the
    last ``max_bytes`` bytes; None when the run has no readable history. ``module`` is text, every other
    column numeric (a value that is not reads NaN); rows without a step or a module are dropped. A cut file
    loses its oldest recording in the window too (it may hold only some of the modules), so every step
    shown is whole."""
    frame, cut = _read_csv_tail(path, max_bytes, "spectra history", dtype={"module": str}, keep_default_na=False)
    if frame is None or "step" not in frame.columns or "module" not in frame.columns:
        if frame is not None:
            warnings.warn(f"{path} has no step and module columns: no spectra history shown", stacklevel=3)
        return None
    numeric = [c for c in frame.columns if c != "module"]
    frame[numeric] = frame[numeric].apply(pd.to_numeric, errors="coerce")
    frame = frame[frame["step"].notna() & (frame["module"] != "")]
    if cut and len(frame):
        frame = frame[frame["step"] != frame["step"].iloc[0]]
    return frame.reset_index(drop=True)


# ---- the run.json schema ----------------------------------------------------------------------------------

@dataclass
class RunRecord:
    """The fields of run.json and their types: every record read or imported is checked against it
    (:func:`validate_record`) before anything uses it. Other keys are kept as they are."""

    status: str
    config: dict
    created: float = 0.0
    format_version: int = FORMAT_VERSION
    id: str | None = None
    name: str | None = None
    sweep_id: str | None = None
    heartbeat: float | None = None
    finished: float | None = None
    pid: int | None = None
    pid_start_time: float | None = None
    host: str | None = None
    task: dict | None = None
    environment: dict | None = None
    metrics: dict | None = None
    error: str | None = None
    imported: float | None = None
    imported_from: str | None = None
    imported_as_new_id_of: str | None = None
    origin: str | None = None          # the run's first id, kept by export and import: the same run anywhere


# config keys the pages read, and their types (None is always allowed)
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "method": (str,), "init": (str,), "rank": (int,), "steps": (int,), "seed": (int,),
    "alpha": (int, float), "lr": (int, float), "rslora": (bool,), "targets": (str, list)}
EARLIEST_CREATED = 946684800.0      # 2000-01-01: an imported run is not older
LATEST_STORED = 4102444800.0        # 2100-01-01: any timestamp beyond is not a time


def _type_ok(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False                # json's true is not a number here
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, types)


def _field_types(annotation: str) -> tuple[tuple[type, ...], bool]:
    names = [t.strip() for t in annotation.split("|")]
    table = {"str": str, "dict": dict, "float": float, "int": int}
    return tuple(table[n] for n in names if n != "None"), "None" in names


def validate_record(record, source: str | os.PathLike, imported: bool = False) -> dict:
    """Check a run.json against :class:`RunRecord` and return it; ``ValueError`` naming the first bad field.

    Types of every known field, ``status`` one of :data:`STATUSES`, timestamps finite (``created`` from
    2000 to tomorrow when ``imported``; a record without it reads as created at an unknown time),
    ``metrics`` a flat object of numbers, text, booleans or nulls, ``config.targets`` text, a list of text
    or null, and the other config values the pages read."""
    from dataclasses import MISSING, fields

    if not isinstance(record, dict):
        raise ValueError(f"{source}: {RUN_FILE} does not hold a run record (a JSON object)")
    for f in fields(RunRecord):
        if f.name not in record:
            if f.default is MISSING:
                raise ValueError(f"{source}: {RUN_FILE} has no {f.name!r} field")
            continue
        value = record[f.name]
        types, optional = _field_types(str(f.type))
        if value is None and optional:
            continue
        if not _type_ok(value, types):
            raise ValueError(f"{source}: {RUN_FILE} field {f.name}={_short(value)} is not allowed: it must be "
                             f"{' or '.join(t.__name__ for t in types)}{' or null' if optional else ''}")
        if float in types and not math.isfinite(value):
            raise ValueError(f"{source}: {RUN_FILE} field {f.name}={value!r} is not allowed: it must be finite")
    if record["status"] not in STATUSES:
        raise ValueError(f"{source}: {RUN_FILE} field status={_short(record['status'])} is not allowed: it must be "
                         f"one of {', '.join(STATUSES)}")
    for key in ("created", "heartbeat", "finished", "imported"):
        value = record.get(key)
        if value is not None and not 0 <= value <= LATEST_STORED:
            raise ValueError(f"{source}: {RUN_FILE} field {key}={value!r} is not allowed: it must be a time "
                             "(seconds since 1970) before the year 2100")
    if imported and "created" in record and not EARLIEST_CREATED <= record["created"] <= time.time() + 86400:
        raise ValueError(f"{source}: {RUN_FILE} field created={record.get('created')!r} is not allowed: it must "
                         "be the time the run started (seconds since 1970), from the year 2000 until today")
    for key, value in (record.get("metrics") or {}).items():
        if value is not None and not isinstance(value, (int, float, str, bool)):
            raise ValueError(f"{source}: {RUN_FILE} metric {key!r}={_short(value)} is not allowed: metrics are "
                             "numbers, text or null")
    for key, types in CONFIG_TYPES.items():
        value = record["config"].get(key)
        if value is not None and not _type_ok(value, types):
            raise ValueError(f"{source}: {RUN_FILE} config.{key}={_short(value)} is not allowed: it must be "
                             f"{' or '.join(t.__name__ for t in types)} or null")
    targets = record["config"].get("targets")
    if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
        raise ValueError(f"{source}: {RUN_FILE} config.targets={_short(targets)} is not allowed: a list of "
                         "module names must hold only text")
    return record


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_run(directory: str | os.PathLike, store: Path | None = None) -> Run:
    """Read one run directory; raises ``ValueError`` if its run.json is missing, unreadable or does not
    fit :class:`RunRecord`."""
    directory = Path(directory)
    path = directory / RUN_FILE
    if not path.is_file():
        raise ValueError(f"'{directory}' has no {RUN_FILE}: not a run directory")
    if path.stat().st_size > MAX_RUN_JSON_BYTES:
        raise ValueError(f"{path} holds {path.stat().st_size:,} bytes: a run.json is at most "
                         f"{MAX_RUN_JSON_BYTES:,} bytes")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({type(exc).__name__}: {exc})") from None
    validate_record(record, path)
    return Run(id=str(record.get("id") or directory.name), dir=directory, status=effective_status(record),
               config=record["config"], metrics=record.get("metrics") or {},
               created=float(record.get("created") or 0.0), finished=record.get("finished"),
               error=record.get("error"), name=str(record.get("name") or directory.name),
               sweep_id=record.get("sweep_id"), environment=record.get("environment") or {},
               task=record.get("task") or {}, record=record, store=store)


def damaged_run(directory: Path, reason: str, store: Path | None = None) -> Run:
    """What a listing shows for a run folder that cannot be read: status "damaged", the reason as its
    error, and nothing else; it can be deleted like any run."""
    try:
        created = directory.stat().st_mtime
    except OSError:
        created = 0.0
    return Run(id=directory.name, dir=directory, status=DAMAGED, config={}, metrics={}, created=created,
               finished=None, error=reason, name=directory.name, sweep_id=None, environment={}, task={},
               record={}, store=store)


def _remove_tree(path: Path) -> None:
    """``rmtree`` that lets another process remove the same tree at the same time."""
    def gone_already(func, failed, exc_info):
        if not issubclass(exc_info[0], FileNotFoundError):
            raise exc_info[1]
    shutil.rmtree(path, onerror=gone_already)


def _leftover_is_stale(entry: Path) -> bool:
    """A ``.deleting-*`` folder always is (its run was already removed from the listing); an ``.import-*``
    folder is when the importing process is gone."""
    if entry.name.startswith(DELETING_PREFIX):
        return True
    match = _IMPORT_NAME.match(entry.name)
    if match:
        return not is_alive({"pid": int(match["pid"]), "pid_start_time": int(match["ms"]) / 1000})
    return time.time() - entry.stat().st_mtime > STALE_LEFTOVER_S   # named by an older version


_TEMP_CLEANED: set[str] = set()


def _stale_temp_files(root: Path) -> list[Path]:
    """Temporary files of :mod:`.files` (``.<name>.<pid>.<thread>.<hex>.tmp``) in the root, the run folders
    and their sub-folders whose writing process is gone (or that are older than a day: a pid may have been
    reused), and the Ray executor's probe files (``.ray-probe-*``) older than a day."""
    found, old = [], time.time() - STALE_LEFTOVER_S
    for pattern in (".*.tmp", "*/.*.tmp", "*/*/.*.tmp", ".ray-probe-*"):
        for path in root.glob(pattern):
            match = _TMP_NAME.match(path.name)
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                if (match and not psutil.pid_exists(int(match["pid"]))) or path.stat().st_mtime < old:
                    found.append(path)
            except OSError:         # removed meanwhile
                continue
    return found


def clean_leftovers(runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove what interrupted deletes and imports left under the runs root; returns what was removed.

    The first call in a process (its start-up) also removes temporary files whose writer died."""
    root = runs_root(runs_dir)
    removed = []
    if root.is_dir() and str(root.resolve()) not in _TEMP_CLEANED:
        _TEMP_CLEANED.add(str(root.resolve()))
        for path in _stale_temp_files(root):
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    for entry in root.iterdir() if root.is_dir() else []:
        if not entry.name.startswith((DELETING_PREFIX, IMPORTING_PREFIX)) or entry.is_symlink():
            continue
        try:
            if entry.is_dir() and _leftover_is_stale(entry):
                _remove_tree(entry)
                removed.append(entry)
        except FileNotFoundError:   # another process (or thread) removed it first
            continue
        except OSError as exc:      # e.g. a read-only shared store: reading it must still work
            warnings.warn(f"could not remove the leftover {entry}: {exc}", stacklevel=3)
    return removed


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[Run]:
    """Every run under the root, newest first. A folder whose run.json cannot be read or does not fit the
    schema lists as a "damaged" run (its error says why) that can be deleted; one bad run never stops a
    listing. Hidden entries (temporary files, imports in progress) are ignored, a folder without run.json
    younger than a minute is a run being created, and leftovers of interrupted deletes and imports are
    removed."""
    root = runs_root(runs_dir)
    clean_leftovers(root)
    runs = []
    for d in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            runs.append(read_run(d, store=root))
        except (ValueError, OSError) as exc:
            try:
                young = not (d / RUN_FILE).exists() and time.time() - d.stat().st_mtime < CLAIM_GRACE_S
            except OSError:
                continue        # deleted meanwhile
            if not young:
                runs.append(damaged_run(d, str(exc), store=root))
    runs.sort(key=lambda r: (r.created, r.id), reverse=True)
    return runs


def unique_runs(runs: list[Run]) -> list[Run]:
    """One run per :attr:`Run.origin`, in the given order: a re-imported copy of a run is the same run.
    The run made in this store wins over imports of it; among imports, the first imported."""
    chosen: dict[str, Run] = {}
    for run in runs:
        kept = chosen.get(run.origin)
        if kept is None or _preferred(run) < _preferred(kept):
            chosen[run.origin] = run
    keep = {id(r) for r in chosen.values()}
    return [r for r in runs if id(r) in keep]


def _preferred(run: Run) -> tuple:
    imported = run.record.get("imported")
    return (run.damaged, imported is not None, imported or 0.0, run.created, run.id)


def latest_sweep(runs: list[Run]) -> list[Run]:
    """The completed runs of the newest sweep, or all completed runs when none belongs to a sweep."""
    done = [r for r in runs if r.status == "completed"]
    sweep = next((r.sweep_id for r in done if r.sweep_id), None)
    return [r for r in done if r.sweep_id == sweep] if sweep else done


def _row(run: Run) -> dict:
    c, m = run.config, run.metrics
    return {"id": run.id, "name": run.name, "sweep_id": run.sweep_id, "status": run.status,
            "model": c.get("model"), "method": c.get("method"), "rank": c.get("rank") if c.get("method") == "lora"
            else None, "alpha": c.get("alpha") if c.get("method") == "lora" else None,
            "scaling": m.get("scaling"), "rslora": c.get("rslora"), "targets": _targets_label(c.get("targets")),
            "init": c.get("init"), "lr": c.get("lr"), "steps": c.get("steps"), "seed": c.get("seed"),
            "created": pd.Timestamp(run.created, unit="s") if run.created else pd.NaT,
            "duration_s": m.get("train_seconds"), **{k: v for k, v in m.items() if k not in ("scaling",)},
            "error": run.error, "origin": run.origin}


def _targets_label(targets) -> str | None:
    if targets is None:
        return None
    return targets if isinstance(targets, str) else ",".join(targets)


def runs_frame(runs_dir: str | os.PathLike | None = None, runs: list[Run] | None = None) -> pd.DataFrame:
    """One row per run: id, name, status, model, method, rank, alpha, targets, lr, steps, seed, created,
    origin (the same run imported twice has one origin), and the final metrics (val_loss, val_accuracy or
    val_perplexity, base_*, trainable_params, samples_per_s, train_seconds, training_state_bytes,
    peak_rss_bytes, ...)."""
    runs = list_runs(runs_dir) if runs is None else runs
    columns = ["id", "name", "sweep_id", "status", "model", "method", "rank", "alpha", "scaling", "rslora",
               "targets", "init", "lr", "steps", "seed", "created", "duration_s", "origin"]
    frame = pd.DataFrame([_row(r) for r in runs])
    return frame if len(frame) else pd.DataFrame(columns=columns)


def load_metrics(runs: list[Run]) -> pd.DataFrame:
    """Per-step metrics of several runs in one long frame, with ``run_id`` and ``name`` columns."""
    frames = [r.metrics_frame().assign(run_id=r.id, name=r.name, method=r.method) for r in runs]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "name", "step"])


def resolve_run_dir(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> Path:
    """The directory of a run given by id, unique id prefix, directory path or :class:`Run`. Hidden
    folders (imports and deletes in progress) are never matched."""
    if isinstance(run, Run):
        return run.dir
    path = Path(run)
    if path.is_dir() and (path / RUN_FILE).exists() and not path.resolve().name.startswith("."):
        return path
    root = runs_root(runs_dir)
    text = str(run)
    if not text or text.startswith(".") or "/" in text or "\\" in text or "\0" in text:
        raise ValueError(f"run {text!r} not found under {root}" + (": run ids never start with '.'"
                                                                    if text.startswith(".") else ""))
    candidate = root / text
    if candidate.is_dir():
        return candidate
    matches = ([d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                and d.name.startswith(text)] if root.is_dir() else [])
    if len(matches) == 1:
        return matches[0]
    raise ValueError(f"run {text!r} not found under {root}" + (" (the prefix is ambiguous)" if matches else ""))


def _in_store(directory: Path, root: Path) -> bool:
    """Whether ``directory`` is a visible run folder directly inside the runs root ``root``."""
    try:
        return (directory.resolve().parent == root.resolve() and not directory.name.startswith(".")
                and not directory.is_symlink())
    except OSError:
        return False


def load_run(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> Run:
    """A run by id (or unique id prefix, or directory path)."""
    directory = resolve_run_dir(run, runs_dir)
    root = runs_root(runs_dir)
    return read_run(directory, store=root if _in_store(directory, root) else None)


def delete_run(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> None:
    """Remove a run folder of the run store (a damaged one too). A run still running in a live process is
    refused, and so is any folder that is not a run folder directly inside the runs root."""
    if isinstance(run, Run):
        path, root = run.dir, run.store if run.store is not None and runs_dir is None else runs_root(runs_dir)
    else:
        path, root = resolve_run_dir(run, runs_dir), runs_root(runs_dir)
    if path.is_symlink():
        raise ValueError(f"'{path}' is a link to {path.resolve()}: only real run folders are deleted (remove "
                         "the link yourself)")
    if not _in_store(path, root):
        raise ValueError(f"'{path}' is not a run folder of the run store {root}: only runs inside it are deleted")
    try:
        current = read_run(path) if (path / RUN_FILE).is_file() else None
    except ValueError:
        current = None                     # a damaged run: nothing in it runs
    if current is not None and current.status == "running":
        raise ValueError(f"run {current.id} is still running (pid {current.record.get('pid')}): cancel it first")
    # rename first so a half-deleted run never lists as a damaged one; if the removal stops half way, the
    # next listing (clean_leftovers) finishes it
    trash = path.with_name(f"{DELETING_PREFIX}{path.name}-{secrets.token_hex(3)}")
    os.replace(path, trash)
    _remove_tree(trash)


# ---- writing a run ---------------------------------------------------------------------------------------

def _csv_text(columns: list[str], rows: list[dict], header: bool) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class RunWriter:
    """Writes one run while it trains. ``log`` buffers metric rows; at most every ``flush_every_s`` seconds
    and on ``flush``, the new rows are appended to metrics.csv and run.json (small: config, heartbeat) is
    replaced atomically. A flush costs the new rows, not the whole history. A column first seen after the
    header was written (rare: evaluation columns are logged from step 0) rewrites metrics.csv once."""

    def __init__(self, directory: Path, record: dict, flush_every_s: float = 2.0) -> None:
        self.dir, self.record = directory, record
        self.rows: list[dict] = []           # every row logged; kept for the one rewrite a new column needs
        self.flush_every_s, self._last_flush = flush_every_s, 0.0
        self._columns: list[str] = []        # metrics.csv's header as written
        self._written = 0                    # rows already in metrics.csv
        self._history_columns: list[str] = []   # spectra_history.csv's header as written

    @property
    def id(self) -> str:
        return self.record["id"]

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if time.time() - self._last_flush >= self.flush_every_s:
            self.flush()

    def _write_metrics(self) -> None:
        new = self.rows[self._written:]
        if not new:
            return
        columns = list(self._columns)
        for row in new:
            columns += [key for key in row if key not in columns]
        path = self.dir / METRICS_FILE
        if columns != self._columns or self._written == 0:
            atomic_write_text(path, _csv_text(columns, self.rows, header=True))
        else:
            append_text(path, _csv_text(columns, new, header=False))
        self._columns, self._written = columns, len(self.rows)

    def log_history(self, rows: list[dict]) -> None:
        """Append one recording of the spectra (a row per module: :data:`HISTORY_COLUMNS` and ``sigma_i``)
        to spectra_history.csv at once. The first call fixes the columns: ``sigma_1`` .. ``sigma_K``, K the
        most values any of its rows has (at most :data:`HISTORY_TOP_K`); later values past K are left out
        and missing ones are empty. The first write creates the file atomically; later ones append."""
        if not rows:
            return
        path = self.dir / HISTORY_FILE
        if not self._history_columns:
            k = min(HISTORY_TOP_K, max(sum(1 for key in row if key.startswith("sigma_")) for row in rows))
            self._history_columns = HISTORY_COLUMNS + [f"sigma_{i}" for i in range(1, k + 1)]
            atomic_write_text(path, _csv_text(self._history_columns, rows, header=True))
        else:
            append_text(path, _csv_text(self._history_columns, rows, header=False))

    def flush(self) -> None:
        self._write_metrics()
        self.record["heartbeat"] = time.time()
        atomic_write_text(self.dir / RUN_FILE, json.dumps(self.record, indent=2, default=_json_default) + "\n")
        self._last_flush = time.time()

    def touch(self, max_age_s: float = 30.0) -> None:
        """Flush (new metric rows, and the heartbeat) when the last flush is older than ``max_age_s``: a run
        that goes on without logging still shows it is alive."""
        if time.time() - self._last_flush >= max_age_s:
            self.flush()

    def update(self, **fields) -> None:
        self.record.update(fields)

    def save_tensors(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save ``tensors`` beside the run as float32 safetensors."""
        atomic_save_tensors(self.dir / filename, tensors, dtype=torch.float32)

    def discard(self) -> None:
        """Remove this run's folder (a run refused before it trained: it leaves nothing)."""
        trash = self.dir.with_name(f"{DELETING_PREFIX}{self.dir.name}-{secrets.token_hex(3)}")
        try:
            os.replace(self.dir, trash)
        except FileNotFoundError:
            return
        _remove_tree(trash)
        try:
            self.dir.parent.rmdir()      # a store this run created is removed too (only if left empty)
        except OSError:
            pass

    def finish(self, status: str, metrics: dict | None = None, error: str | None = None) -> None:
        if status not in STATUSES or status == "running":
            raise ValueError(f"status={status!r}: a run finishes as completed, failed, interrupted or cancelled")
        self.record.update(status=status, finished=time.time(), error=error)
        if metrics is not None:
            self.record["metrics"] = metrics
        self.flush()


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (torch.Tensor,)):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)


def create_run(config: dict, runs_dir: str | os.PathLike | None = None, name: str | None = None,
               sweep_id: str | None = None, task: dict | None = None, device=None) -> RunWriter:
    """Claim a new run directory (exclusive mkdir: concurrent creators never share one) and write its
    run.json with status "running" and this process's identity (pid, start time, host)."""
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(root)           # once per process: what killed writers left (cheap afterwards)
    for _ in range(100):
        run_id = new_run_id()
        directory = root / run_id
        try:
            directory.mkdir()
            break
        except FileExistsError:
            continue
    else:  # pragma: no cover - 100 collisions of 32 random bits
        raise RuntimeError(f"could not create a unique run directory under {root}")
    now = time.time()
    record = {"format_version": FORMAT_VERSION, "id": run_id, "origin": run_id, "name": name or run_id,
              "sweep_id": sweep_id,
              "status": "running", "created": now, "heartbeat": now, "finished": None, **process_identity(),
              "config": config, "task": task or {}, "environment": environment(device), "metrics": {},
              "error": None}
    writer = RunWriter(directory, record)
    writer.flush()
    return writer


# ---- the hand-off to the analyses ---------------------------------------------------------------------------

def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; ``ValueError`` when it is missing or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def recorded_base(run: Run) -> str | None:
    """The base model the run names (a hub id or a local model folder), for a caller who wants W0 of a run
    that did not keep it: ``load_updates(run, base=recorded_base(run))``. None for built-in models."""
    return run.task.get("base_model_name_or_path") or None


def base_revision(run: Run, base: str | os.PathLike) -> str | None:
    """The revision the run recorded for its base model, when ``base`` names that model (a hub id)."""
    recorded = {run.task.get("base_model_name_or_path"), run.task.get("model"), run.model} - {None, ""}
    return run.task.get(BASE_REVISION_KEY) if str(base) in recorded else None


def _base_weights(run: Run, shapes: dict[str, tuple[int, int]], base: str | os.PathLike | None,
                  fan_in_fan_out: bool | None) -> dict[str, torch.Tensor] | None:
    """W0 (out, in) float32 of the modules in ``shapes``: the run's own copy (a module it lacks is left
    out, as before), else from ``base``, else None."""
    stored = run.dir / BASE_WEIGHTS
    if stored.is_file():
        w0 = read_tensors(stored)
    elif base is not None:
        from .base_weights import load_base_weights
        w0 = load_base_weights(base, shapes, fan_in_fan_out, revision=base_revision(run, base))
    else:
        return None
    return {n: w0[n].float() for n in shapes if n in w0}


def load_updates(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None, *,
                 base: str | os.PathLike | None = None) -> dict[str, ModuleUpdate]:
    """What each adapted module learned in a run, as :class:`~lora_analysis.weights.ModuleUpdate`.

    LoRA runs: A (r, in), B (out, r), scaling from ``adapter/``. Full fine-tuning runs: W_ft (out, in).
    W0 (out, in) float32 comes from the run's base_weights.safetensors; a run that did not keep it (a large
    model) takes it from ``base`` when given: a ``.safetensors`` file, a local Hugging Face model folder,
    or a hub id (fetched at the revision the run recorded, when it is the run's base). Nothing is trained
    or rebuilt. Without either, LoRA updates have ``w0=None`` and a full fine-tuning run raises
    ``ValueError`` (its update is W_ft - W0).
    """
    run = run if isinstance(run, Run) else load_run(run, runs_dir)
    if run.status != "completed":
        raise ValueError(f"run {run.id} is {run.status}: only completed runs have updates to analyse")
    if run.method == "full":
        w_ft = read_tensors(run.dir / FULL_WEIGHTS)
        w0 = _base_weights(run, {n: tuple(w.shape) for n, w in w_ft.items()}, base, None)
        if w0 is None:
            raise ValueError(f"run {run.id} kept no base weights ({BASE_WEIGHTS}), and a full fine-tuning "
                             "update is W_ft - W0: pass base= a .safetensors file of W0, the base model's "
                             f"folder, or its hub id (e.g. base={run.task.get('base_model_name_or_path') or run.model!r})")
        missing = [n for n in w_ft if n not in w0]
        if missing:
            raise ValueError(f"run {run.id}: the base weights have no W0 for module {missing[0]!r}")
        return {n: ModuleUpdate(name=n, w0=w0[n], w_ft=w.float()) for n, w in w_ft.items()}
    from ..lora.adapter_io import read_adapter

    adapter = read_adapter(run.dir / ADAPTER_DIR)
    shapes = {n: m.shape for n, m in adapter.modules.items()}
    w0 = _base_weights(run, shapes, base, bool(adapter.raw_config.get("fan_in_fan_out", False)))
    return {n: ModuleUpdate(name=n, w0=None if w0 is None else w0.get(n), lora_A=m.lora_A.float(),
                            lora_B=m.lora_B.float(), scaling=m.scaling) for n, m in adapter.modules.items()}
