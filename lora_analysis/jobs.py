"""Background jobs: long work (training, sweeps) in a separate process that the dashboard only watches.

Streamlit re-runs a page script on every click, so training must not live in it. ``start_job`` writes a
job spec to ``<home>/jobs/<id>/job.json`` and starts ``python -m lora_analysis.jobs <job dir>`` in its own
process group. The worker runs the library call and keeps ``progress.json`` up to date; a page polls
``read_job``. ``cancel_job`` sends SIGTERM to the worker: it asks the trainer to stop at the next step and the
run is recorded as cancelled. A worker that died without saying so is reported as interrupted; a job that
ended without one completed run (none written, or every run failed) is "empty", with the reason as its
error, never a success. ``active_jobs`` finds the running jobs again from disk (after a page reload, a
server restart, in another tab), each with its live progress. A worker
is known by its pid and its start time (:mod:`lora_analysis.store.liveness`, as runs are), so a pid that
the system gave to another process after the worker died is neither "running" nor ever signalled.
Closing the browser tab changes nothing: the job and its runs live on disk.

A sweep job's spec may name its executor: ``spec["executor"] = {"kind": "ray", "address": "auto", ...}``
(see :func:`lora_analysis.training.sweep.executor_from_spec`); the job's process is then the Ray driver,
its progress and cancel work as for a local sweep (cancel stops the running trials, drops the pending ones).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from .paths import home_dir
from .store.files import atomic_write_text
from .store.liveness import is_alive, on_this_host, process_identity

# "empty": the work ended without one completed run (none written, or every one failed): not a success
TERMINAL = ("completed", "empty", "failed", "cancelled", "interrupted")


@dataclass
class Job:
    """A job as read from disk. ``progress`` holds what the worker last reported (step, total, loss, run)."""

    id: str
    dir: Path
    kind: str
    spec: dict
    status: str
    pid: int | None
    started: float
    finished: float | None = None
    error: str | None = None
    progress: dict = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)
    pid_start_time: float | None = None     # with ``pid``, the worker's identity (None: an older record)
    host: str | None = None
    runs_completed: int | None = None       # None: still running, or an older record

    @property
    def runs_written(self) -> int:
        """Run folders the job wrote (completed or not)."""
        return len(self.run_ids)

    @property
    def summary(self) -> str:
        """One plain line for any state, e.g. "completed: 3 runs written", "empty: no run completed: ...",
        "running: 1/3 runs done · LoRA r=4 step 20/40 loss 0.41"."""
        if self.status in ("running", "starting"):
            return f"{self.status}: {self.progress.get('message') or 'starting…'}"
        if self.status == "completed":
            failed = self.runs_written - (self.runs_completed if self.runs_completed is not None
                                          else self.runs_written)
            return (f"completed: {self.runs_written} run{'s' if self.runs_written != 1 else ''} written"
                    + (f", {failed} of them not completed" if failed else ""))
        return f"{self.status}: {self.error}" if self.error else self.status

    @property
    def identity(self) -> dict:
        return {"pid": self.pid, "pid_start_time": self.pid_start_time, "host": self.host}

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


def jobs_dir(home: Path | None = None) -> Path:
    return (home or home_dir()) / "jobs"


def _write_json(path: Path, value: dict) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, default=str))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _worker_identity(pid: int) -> dict:
    try:
        return process_identity(pid)
    except psutil.NoSuchProcess:      # already gone (and reaped): a start time no process will ever match
        return {"pid": pid, "pid_start_time": 0.0, "host": process_identity()["host"]}


def start_job(kind: str, spec: dict, home: Path | None = None) -> Job:
    """Validate ``spec`` for ``kind`` and start the worker process; returns at once."""
    if kind not in KINDS:
        raise ValueError(f"job kind {kind!r} is not known: choose one of {', '.join(KINDS)}")
    KINDS[kind].validate(spec)
    job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    directory = jobs_dir(home) / job_id
    directory.mkdir(parents=True)
    record = {"id": job_id, "kind": kind, "spec": spec, "status": "starting", "pid": None,
              "started": time.time(), "home": str(home or home_dir())}
    _write_json(directory / "job.json", record)
    log = open(directory / "log.txt", "ab")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen([sys.executable, "-m", "lora_analysis.jobs", str(directory)], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    log.close()
    record.update(_worker_identity(proc.pid), status="running")
    _write_json(directory / "job.json", record)
    return read_job(directory)


def read_job(directory: Path | str) -> Job:
    directory = Path(directory)
    record = _read_json(directory / "job.json")
    if not record:
        raise ValueError(f"'{directory}' holds no readable job.json")
    progress = _read_json(directory / "progress.json")
    status = record.get("status", "running")
    # a worker on another machine (a shared home) cannot be checked from here: its record says
    if status in ("running", "starting") and on_this_host(record) and not is_alive(record):
        # the worker writes its final status before exiting; re-read in case it just did
        record = _read_json(directory / "job.json") or record
        status = record.get("status", "running")
        if status in ("running", "starting"):
            status = "interrupted"
    missing = [key for key in ("id", "kind") if key not in record]
    if missing:
        raise ValueError(f"'{directory / 'job.json'}' has no {missing[0]!r}: not a job record")
    return Job(id=record["id"], dir=directory, kind=record["kind"], spec=record.get("spec", {}), status=status,
               pid=record.get("pid"), started=record.get("started", 0.0), finished=record.get("finished"),
               error=record.get("error"), progress=progress, run_ids=record.get("run_ids", []),
               pid_start_time=record.get("pid_start_time"), host=record.get("host"),
               runs_completed=record.get("runs_completed"))


def list_jobs(home: Path | None = None) -> list[Job]:
    """All jobs, newest first; unreadable job folders are skipped."""
    root = jobs_dir(home)
    jobs = []
    for d in sorted(root.iterdir(), reverse=True) if root.is_dir() else []:
        try:
            jobs.append(read_job(d))
        except ValueError:
            continue
    return jobs


def active_jobs(home: Path | None = None) -> list[Job]:
    """The jobs still running (a worker that died reads "interrupted" and is left out), newest first, each
    with its progress as last written: call it on every poll to find running jobs again after a page
    reload, a server restart or in another tab."""
    return [job for job in list_jobs(home) if not job.done]


def recent_jobs(home: Path | None = None, within_s: float = 3600.0) -> list[Job]:
    """The running jobs and those that ended within ``within_s`` seconds, newest first (what to show a user
    who comes back: "finished while you were away")."""
    now = time.time()
    return [job for job in list_jobs(home) if not job.done or (job.finished or job.started) >= now - within_s]


def cancel_job(job: Job) -> None:
    """Ask the worker to stop (SIGTERM to the worker process); the run in progress is marked cancelled.

    Only the worker itself is signalled, not its process group: a sweep on a Ray that the worker started
    has Ray's processes in that group, and they must stop through the worker (which cancels its trials),
    not by a signal. Only a worker that is still the process the job started is signalled: once it has
    died, its pid may name an unrelated process."""
    if job.done or not (on_this_host(job.identity) and is_alive(job.identity)):
        return
    try:
        os.kill(job.pid, signal.SIGTERM)
    except ProcessLookupError:        # it exited between the check and the signal
        pass


# ---- the worker side -----------------------------------------------------------------------------

@dataclass
class JobKind:
    """``validate(spec)`` raises ValueError on bad specs (before a process starts); ``run(spec, report,
    cancelled, home)`` does the work and returns the ids of the runs it made."""

    validate: Callable[[dict], None]
    run: Callable[..., list[str]]


def _sweep_validate(spec: dict) -> None:
    from .training.sweep import executor_from_spec, split_job_spec, sweep_settings
    sweep, executor = split_job_spec(spec)
    executor_from_spec(executor)        # a Ray executor also checks that Ray is installed
    sweep_settings(**sweep)


def _sweep_run(spec: dict, report, cancelled, home: Path) -> list[str]:
    from .training.runtime import use_threads
    from .training.sweep import run_sweep_job

    # the one thread rule (one thread for the small models): the worker process is the sweep's
    use_threads(spec.get("model", "mlp-digits"), requested=spec.get("threads"))
    return run_sweep_job(spec, progress=report, cancelled=cancelled, home=home)


def _outcome(run_ids: list[str], home: Path, final: dict) -> tuple[int, str | None]:
    """(runs completed, why none did: one line, or None when some did)."""
    from . import runstore

    completed, reasons = 0, []
    for run_id in run_ids:
        try:
            run = runstore.load_run(run_id, Path(home) / "runs")
        except (ValueError, OSError):
            continue
        if run.status == "completed":
            completed += 1
        else:
            reasons.append(f"{run.name} {run.status}" + (f" ({run.error})" if run.error else ""))
    reasons += [f"{f.get('run')} failed ({f.get('error')})" for f in final.get("failures") or []]
    if completed:
        return completed, None
    why = f"no run completed ({len(run_ids)} written)"
    if reasons:
        why += f": {reasons[0]}" + (f"; and {len(reasons) - 1} more" if len(reasons) > 1 else "")
    return 0, " ".join(why.split())


KINDS: dict[str, JobKind] = {"sweep": JobKind(_sweep_validate, _sweep_run)}


def _worker(directory: Path) -> int:
    record = _read_json(directory / "job.json")
    cancelled = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancelled.set())
    last, final = [0.0], {}

    def report(**progress) -> None:
        # at most a few writes a second: the page polls about once a second
        now = time.time()
        if progress.get("final"):
            final.update(progress)
        if now - last[0] >= 0.25 or progress.get("final"):
            last[0] = now
            _write_json(directory / "progress.json", progress | {"time": now})

    try:
        run_ids = KINDS[record["kind"]].run(record["spec"], report, cancelled, Path(record["home"]))
        completed, why_empty = _outcome(run_ids, Path(record["home"]), final)
        record.update(status="cancelled" if cancelled.is_set() else "empty" if why_empty else "completed",
                      run_ids=run_ids, runs_completed=completed, error=why_empty)
    except Exception as exc:  # the process boundary: recorded for the page, the traceback in the job's log
        traceback.print_exc()
        record.update(status="cancelled" if cancelled.is_set() else "failed", error=str(exc))
    record["finished"] = time.time()
    _write_json(directory / "job.json", record)
    return 0 if record["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(_worker(Path(sys.argv[1])))
