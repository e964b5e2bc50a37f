"""The run store: every training run is one directory on disk that the analyses and the dashboard read.

    <runs root>/<run id>/
        run.json                  config, seed, environment, status, error, final metrics, timestamps
        metrics.csv               one row per step: train_loss (+ val_* on evaluation steps)
        adapter/                  LoRA runs: the adapter in PEFT format (adapter_config.json + safetensors)
        full_weights.safetensors  full fine-tuning runs: W_ft of every adaptable module, (out, in) float32
        base_weights.safetensors  W0 of the same modules, (out, in), when small enough to keep beside the run

The runs root is ``--runs-dir`` when given, else ``$LORA_ANALYSIS_HOME/runs``, else the user data folder.
Crash safety: every file is written to a temporary name and renamed over the old one, so a reader sees the
old or the new file, never half of one. A run left "running" by a process that died (its pid is gone, or
its heartbeat is stale) is reported as "interrupted". A directory without a readable run.json is skipped
with a warning. Run ids are a timestamp plus a random suffix, and a directory is claimed with an exclusive
``mkdir``, so concurrent runs never share one. Zip bundles hold only json/csv/safetensors/txt files and
are validated before anything is extracted; nothing is ever unpickled.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import secrets
import shutil
import socket
import stat
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
import torch

from .paths import home_dir
from .weights import ModuleUpdate

STATUSES = ("running", "completed", "failed", "interrupted", "cancelled")
RUN_FILE, METRICS_FILE = "run.json", "metrics.csv"
ADAPTER_DIR, FULL_WEIGHTS, BASE_WEIGHTS = "adapter", "full_weights.safetensors", "base_weights.safetensors"
# every parameter of a fully fine-tuned model (biases and norms too), kept when small, to restore the model
FULL_MODEL = "full_model.safetensors"
HEARTBEAT_STALE_S = 300.0          # a "running" run silent for this long is reported as interrupted
ALLOWED_SUFFIXES = (".json", ".csv", ".safetensors", ".txt")
MAX_BUNDLE_BYTES = 2 * 2**30       # uncompressed size limit of an imported zip
MAX_BUNDLE_FILES = 1000
FORMAT_VERSION = 1


# ---- low-level writing --------------------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(3)}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tmp = _tmp_name(path)
    try:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def runs_root(runs_dir: str | os.PathLike | None = None) -> Path:
    """``runs_dir`` if given, else ``<home>/runs`` (home: ``$LORA_ANALYSIS_HOME`` or the user data folder)."""
    return Path(runs_dir).expanduser() if runs_dir else home_dir() / "runs"


def environment(device: torch.device | str | None = None) -> dict:
    """Versions and hardware a run used (recorded in run.json)."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "host": socket.gethostname(), "cpu_threads": torch.get_num_threads()}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device is not None:
        device = torch.device(device)
        env["device"] = str(device)
        if device.type == "cuda":
            env["device_name"] = torch.cuda.get_device_name(device)
    return env


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


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

    @property
    def method(self) -> str:
        return self.config.get("method", "lora")

    @property
    def model(self) -> str:
        return self.config.get("model", "")

    def metrics_frame(self) -> pd.DataFrame:
        """Per-step metrics (step, train_loss, val_loss, val_accuracy or val_perplexity, lr, elapsed_s)."""
        path = self.dir / METRICS_FILE
        if not path.is_file():
            return pd.DataFrame(columns=["step", "train_loss"])
        return pd.read_csv(path)


def _effective_status(record: dict, now: float | None = None) -> str:
    status = record.get("status", "running")
    if status != "running":
        return status if status in STATUSES else "failed"
    now = time.time() if now is None else now
    silent = now - float(record.get("heartbeat") or record.get("created") or 0.0)
    if record.get("host") == socket.gethostname():
        # on this machine the pid decides; a very old heartbeat also catches a recycled pid
        alive = pid_alive(record.get("pid"))
        return "running" if alive and silent < 12 * HEARTBEAT_STALE_S else "interrupted"
    return "running" if silent < HEARTBEAT_STALE_S else "interrupted"


def read_run(directory: str | os.PathLike) -> Run:
    """Read one run directory; raises ``ValueError`` if its run.json is missing or unreadable."""
    directory = Path(directory)
    path = directory / RUN_FILE
    if not path.is_file():
        raise ValueError(f"'{directory}' has no {RUN_FILE}: not a run directory")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("config", {}), dict):
        raise ValueError(f"{path} does not hold a run record")
    return Run(id=str(record.get("id", directory.name)), dir=directory, status=_effective_status(record),
               config=record.get("config") or {}, metrics=record.get("metrics") or {},
               created=float(record.get("created") or 0.0), finished=record.get("finished"),
               error=record.get("error"), name=str(record.get("name") or directory.name),
               sweep_id=record.get("sweep_id"), environment=record.get("environment") or {},
               task=record.get("task") or {}, record=record)


def list_runs(runs_dir: str | os.PathLike | None = None) -> list[Run]:
    """Every readable run under the root, newest first. Unreadable directories are skipped with a warning;
    hidden entries (temporary files, imports in progress) are ignored."""
    root = runs_root(runs_dir)
    runs = []
    for d in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            runs.append(read_run(d))
        except (ValueError, OSError) as exc:
            warnings.warn(f"skipping run directory {d}: {exc}", stacklevel=2)
    runs.sort(key=lambda r: (r.created, r.id), reverse=True)
    return runs


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
            "error": run.error}


def _targets_label(targets) -> str | None:
    if targets is None:
        return None
    return targets if isinstance(targets, str) else ",".join(targets)


def runs_frame(runs_dir: str | os.PathLike | None = None, runs: list[Run] | None = None) -> pd.DataFrame:
    """One row per run: id, name, status, model, method, rank, alpha, targets, lr, steps, seed, created,
    and the final metrics (val_loss, val_accuracy or val_perplexity, base_*, trainable_params,
    samples_per_s, train_seconds, training_state_bytes, peak_rss_bytes, ...)."""
    runs = list_runs(runs_dir) if runs is None else runs
    columns = ["id", "name", "sweep_id", "status", "model", "method", "rank", "alpha", "scaling", "rslora",
               "targets", "init", "lr", "steps", "seed", "created", "duration_s"]
    frame = pd.DataFrame([_row(r) for r in runs])
    return frame if len(frame) else pd.DataFrame(columns=columns)


def load_metrics(runs: list[Run]) -> pd.DataFrame:
    """Per-step metrics of several runs in one long frame, with ``run_id`` and ``name`` columns."""
    frames = [r.metrics_frame().assign(run_id=r.id, name=r.name, method=r.method) for r in runs]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "name", "step"])


def _resolve(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> Path:
    if isinstance(run, Run):
        return run.dir
    path = Path(run)
    if path.is_dir() and (path / RUN_FILE).exists():
        return path
    root = runs_root(runs_dir)
    candidate = root / str(run)
    if str(run) and "/" not in str(run) and not str(run).startswith(".") and candidate.is_dir():
        return candidate
    matches = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(str(run))] if root.is_dir() else []
    if len(matches) == 1 and str(run):
        return matches[0]
    raise ValueError(f"run {str(run)!r} not found under {root}" + (" (the prefix is ambiguous)" if matches else ""))


def load_run(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> Run:
    """A run by id (or unique id prefix, or directory path)."""
    return read_run(_resolve(run, runs_dir))


def delete_run(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> None:
    """Remove a run directory. A run still running in a live process is refused."""
    path = _resolve(run, runs_dir)
    current = read_run(path) if (path / RUN_FILE).is_file() else None
    if current is not None and current.status == "running":
        raise ValueError(f"run {current.id} is still running (pid {current.record.get('pid')}): cancel it first")
    # rename first so a half-deleted run never lists as a damaged one
    trash = path.with_name(f".deleting-{path.name}-{secrets.token_hex(3)}")
    os.replace(path, trash)
    shutil.rmtree(trash)


# ---- writing a run ---------------------------------------------------------------------------------------

class RunWriter:
    """Writes one run while it trains. ``log`` buffers metric rows; run.json (with a heartbeat) and
    metrics.csv are rewritten atomically at most every ``flush_every_s`` seconds and on ``flush``."""

    def __init__(self, directory: Path, record: dict, flush_every_s: float = 2.0) -> None:
        self.dir, self.record, self.rows = directory, record, []
        self.flush_every_s, self._last_flush = flush_every_s, 0.0
        self._columns: list[str] = []

    @property
    def id(self) -> str:
        return self.record["id"]

    def log(self, row: dict) -> None:
        self.rows.append(row)
        for key in row:
            if key not in self._columns:
                self._columns.append(key)
        if time.time() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            out = io.StringIO()
            w = csv.DictWriter(out, fieldnames=self._columns, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(self.rows)
            atomic_write_text(self.dir / METRICS_FILE, out.getvalue())
        self.record["heartbeat"] = time.time()
        atomic_write_text(self.dir / RUN_FILE, json.dumps(self.record, indent=2, default=_json_default) + "\n")
        self._last_flush = time.time()

    def update(self, **fields) -> None:
        self.record.update(fields)

    def save_tensors(self, filename: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_tensors(self.dir / filename, tensors)

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
    run.json with status "running"."""
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
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
    record = {"format_version": FORMAT_VERSION, "id": run_id, "name": name or run_id, "sweep_id": sweep_id,
              "status": "running", "created": now, "heartbeat": now, "finished": None, "pid": os.getpid(),
              "host": socket.gethostname(), "config": config, "task": task or {},
              "environment": environment(device), "metrics": {}, "error": None}
    writer = RunWriter(directory, record)
    writer.flush()
    return writer


# ---- the hand-off to the analyses ---------------------------------------------------------------------------

def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc


def _base_weights_from_model(run: Run, names: list[str]) -> dict[str, torch.Tensor]:
    """W0 (out, in) of ``names`` rebuilt from the run's base model (the cached built-in base, or the
    Hugging Face model it names), for runs that did not keep base_weights.safetensors."""
    from .lora.layer import weight_out_in
    from .training.models import prepare_task

    c = run.config
    task = prepare_task(c["model"], c.get("data"), pretrain_steps=c.get("pretrain_steps"),
                        seq_len=c.get("seq_len"), label_column=c.get("label_column"),
                        text_field=c.get("text_field"))
    modules = dict(task.build_model().named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"run {run.id}: the base model has no module {missing[0]!r}")
    return {n: weight_out_in(modules[n]).detach().float().clone() for n in names}


def load_updates(run: str | os.PathLike | Run, runs_dir: str | os.PathLike | None = None) -> dict[str, ModuleUpdate]:
    """What each adapted module learned in a run, as :class:`~lora_analysis.weights.ModuleUpdate`.

    LoRA runs: A (r, in), B (out, r), scaling from ``adapter/``, W0 (out, in) from base_weights.safetensors
    (or the base model when the run did not keep it). Full fine-tuning runs: W0 and W_ft (out, in).
    """
    run = run if isinstance(run, Run) else load_run(run, runs_dir)
    if run.status != "completed":
        raise ValueError(f"run {run.id} is {run.status}: only completed runs have updates to analyse")
    base_path = run.dir / BASE_WEIGHTS
    if run.method == "full":
        w_ft = _read_tensors(run.dir / FULL_WEIGHTS)
        w0 = _read_tensors(base_path) if base_path.is_file() else _base_weights_from_model(run, list(w_ft))
        return {n: ModuleUpdate(name=n, w0=w0[n], w_ft=w) for n, w in w_ft.items()}
    from .lora.adapter_io import read_adapter
    adapter = read_adapter(run.dir / ADAPTER_DIR)
    names = list(adapter.modules)
    w0 = _read_tensors(base_path) if base_path.is_file() else _base_weights_from_model(run, names)
    return {n: ModuleUpdate(name=n, w0=w0.get(n), lora_A=m.lora_A.float(), lora_B=m.lora_B.float(),
                            scaling=m.scaling) for n, m in adapter.modules.items()}


# ---- sharing: one zip per run ---------------------------------------------------------------------------------

def export_run(run: str | os.PathLike | Run, destination: str | os.PathLike | None = None,
               runs_dir: str | os.PathLike | None = None) -> Path:
    """Write the run as one zip (``<id>.zip`` in the current folder, or ``destination``: a .zip path or a
    folder). Entries are relative to the run directory; only json/csv/safetensors/txt files go in."""
    run = run if isinstance(run, Run) else load_run(run, runs_dir)
    if run.status == "running":
        raise ValueError(f"run {run.id} is still running: export it when it has finished")
    dest = Path(destination) if destination else Path.cwd() / f"{run.id}.zip"
    if dest.is_dir() or (destination and not str(dest).endswith(".zip")):
        dest.mkdir(parents=True, exist_ok=True)
        dest = dest / f"{run.id}.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dest)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(run.dir.rglob("*")):
                rel = path.relative_to(run.dir)
                if (path.is_file() and not path.is_symlink() and path.suffix in ALLOWED_SUFFIXES
                        and not any(part.startswith(".") for part in rel.parts)):
                    zf.write(path, rel.as_posix())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _check_entries(zf: zipfile.ZipFile, source: Path, max_bytes: int) -> tuple[list[zipfile.ZipInfo], str]:
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if not infos:
        raise ValueError(f"'{source}' is an empty zip")
    if len(infos) > MAX_BUNDLE_FILES:
        raise ValueError(f"'{source}' holds {len(infos)} files: a run bundle holds at most {MAX_BUNDLE_FILES}")
    total = 0
    for info in infos:
        name = info.filename
        parts = PurePosixPath(name).parts
        if (name.startswith(("/", "\\")) or "\\" in name or ":" in name or ".." in parts or not parts
                or any(p.startswith(".") for p in parts)):
            raise ValueError(f"'{source}' holds the entry {name!r}, whose path is not allowed (absolute, "
                             "parent '..', hidden or Windows-style paths are refused)")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ValueError(f"'{source}' holds the symbolic link {name!r}: links are refused")
        if PurePosixPath(name).suffix not in ALLOWED_SUFFIXES:
            raise ValueError(f"'{source}' holds {name!r}: only {', '.join(ALLOWED_SUFFIXES)} files are allowed "
                             "in a run bundle (no pickles, no code)")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
    names = [i.filename for i in infos]
    if RUN_FILE in names:
        prefix = ""
    else:
        tops = {PurePosixPath(n).parts[0] for n in names}
        if len(tops) == 1 and f"{next(iter(tops))}/{RUN_FILE}" in names:
            prefix = next(iter(tops)) + "/"
        else:
            raise ValueError(f"'{source}' has no {RUN_FILE} at its top level: not a run bundle")
    return infos, prefix


def import_run(bundle: str | os.PathLike, runs_dir: str | os.PathLike | None = None,
               max_bytes: int = MAX_BUNDLE_BYTES) -> Run:
    """Import a zip written by :func:`export_run` and return the run. The zip is checked before anything is
    written (paths, file types, size, a valid run.json, readable safetensors headers); the run keeps its
    id unless that id is taken here, then it gets a new one."""
    source = Path(bundle)
    if not source.is_file():
        raise ValueError(f"bundle '{source}' does not exist")
    try:
        zf = zipfile.ZipFile(source)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"'{source}' is not a zip file ({exc})") from exc
    root = runs_root(runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".import-{secrets.token_hex(4)}"
    with zf:
        infos, prefix = _check_entries(zf, source, max_bytes)
        try:
            record = json.loads(zf.read(prefix + RUN_FILE).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"'{source}': {RUN_FILE} is not valid JSON ({exc})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise ValueError(f"'{source}': {RUN_FILE} does not hold a run record")
        staging.mkdir()
        try:
            written = 0
            for info in infos:
                target = staging / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):   # count real bytes: headers can lie about sizes
                        written += len(chunk)
                        if written > max_bytes:
                            raise ValueError(f"'{source}' unpacks to more than {max_bytes / 2**20:.0f} MiB: refused")
                        dst.write(chunk)
            for path in staging.rglob("*.safetensors"):
                from safetensors import safe_open
                try:
                    with safe_open(str(path), framework="pt") as f:
                        list(f.keys())
                except Exception as exc:
                    raise ValueError(f"'{source}': {path.relative_to(staging)} is not a valid safetensors "
                                     f"file ({exc})") from exc
            run_id = str(record.get("id") or "")
            if not run_id or run_id.startswith(".") or "/" in run_id or "\\" in run_id or (root / run_id).exists():
                record["imported_as_new_id_of"] = run_id or None
                run_id = new_run_id()
            record.update(id=run_id, imported_from=source.name, imported=time.time())
            atomic_write_text(staging / RUN_FILE, json.dumps(record, indent=2) + "\n")
            os.rename(staging, root / run_id)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return read_run(root / run_id)
