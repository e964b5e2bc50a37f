"""The run store under its first name: every training run is one directory on disk (see
:mod:`lora_analysis.store.runs` for the layout). This module only gathers the names callers use; the code
lives in the storage floor, which imports nothing above it:

    store/files.py         the one atomic writer (temp file, fsync, rename) and the append for metrics
    store/liveness.py      is a run's or a job's process still alive (pid + start time)
    store/runs.py          run records, metrics, listing, reading, writing runs, load_updates
    store/base_weights.py  W0 from a file, a model folder or a hub revision that the caller names
    store/bundles.py       export / import of one run as a zip
"""

from __future__ import annotations

from .store.bundles import (ALLOWED_SUFFIXES, LIMITS, MAX_BUNDLE_BYTES, MAX_BUNDLE_FILES, BundleLimits, export_run,
                            import_run)
from .store.files import atomic_save_tensors, atomic_write, atomic_write_text
from .store.liveness import is_alive, process_identity
from .store.runs import (ADAPTER_DIR, BASE_REVISION_KEY, BASE_WEIGHTS, DAMAGED, FORMAT_VERSION, MAX_METRICS_READ_BYTES,
                         RunRecord, read_metrics_csv, validate_record, FULL_MODEL, FULL_WEIGHTS,
                         HEARTBEAT_STALE_S, METRICS_FILE, RUN_FILE, STATUSES, Run, RunWriter, clean_leftovers,
                         create_run, delete_run, effective_status, environment, latest_sweep, list_runs,
                         load_metrics, load_run, load_updates, new_run_id, read_run, read_tensors, recorded_base,
                         runs_frame, runs_root, unique_runs)

_read_tensors = read_tensors            # the name training/restore.py uses


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` names a live, non-zombie process (the pid alone: prefer :func:`is_alive` with a
    recorded identity, which also catches a reused pid)."""
    return is_alive({"pid": pid})


__all__ = ["ADAPTER_DIR", "ALLOWED_SUFFIXES", "BundleLimits", "DAMAGED", "LIMITS", "MAX_METRICS_READ_BYTES",
           "RunRecord", "read_metrics_csv", "validate_record", "BASE_REVISION_KEY", "BASE_WEIGHTS", "FORMAT_VERSION", "FULL_MODEL",
           "FULL_WEIGHTS", "HEARTBEAT_STALE_S", "MAX_BUNDLE_BYTES", "MAX_BUNDLE_FILES", "METRICS_FILE", "RUN_FILE",
           "STATUSES", "Run", "RunWriter", "atomic_save_tensors", "atomic_write", "atomic_write_text",
           "clean_leftovers", "create_run", "delete_run", "effective_status", "environment", "export_run",
           "import_run", "is_alive", "latest_sweep", "list_runs", "load_metrics", "load_run", "load_updates",
           "new_run_id", "pid_alive", "process_identity", "read_run", "read_tensors", "recorded_base", "runs_frame",
           "runs_root", "unique_runs"]
