"""Sweeps: many runs over rank, alpha, scaling (α/r vs rsLoRA's α/√r) and target modules, plus the full
fine-tuning baseline, all on one pretrained base and one data split.

    settings = sweep_settings(model="mlp-digits", ranks=[1, 2, 4, 8, 16, 32], alphas=[16], full_ft=True)
    result = run_sweep(settings, progress=print_progress, cancel=stop_event)
    result.frame          # one row per run (runstore.runs_frame columns)

Each run is an independent job handed to an :class:`Executor` together with the caller's ``progress`` and
``cancel``: ``LocalExecutor`` runs the jobs in turn in this process (sharing the prepared base in memory);
``ProcessExecutor`` runs them in a pool of processes, each job loading the base from the disk cache, with
progress and cancel carried across by a ``multiprocessing`` manager (a queue and an event). A cluster
engine plugs in the same way: it must run ``fn(job, progress, cancel)`` and bring both hooks across.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import queue
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import pandas as pd

from .. import runstore
from .config import SweepSpec, TrainConfig
from .models import Task
from .trainer import Cancel, TrainResult, is_cancelled, task_for, train

J = TypeVar("J")
R = TypeVar("R")
Progress = Callable[..., None]


class Executor(Protocol):
    """Runs independent jobs as ``fn(job, progress, cancel)`` wherever it runs them, and yields their
    results in job order. ``progress(**fields)`` must reach the caller's ``progress`` and ``cancel()``
    must answer the caller's ``cancel``, from every worker."""

    def map(self, fn: Callable[[J, Progress | None, Cancel], R], jobs: Iterable[J],
            progress: Progress | None = None, cancel: Cancel = None) -> Iterator[R]: ...


class LocalExecutor:
    """Runs the jobs one after another in this process (the default: deterministic, shares memory)."""

    def map(self, fn, jobs, progress=None, cancel=None):
        for job in jobs:
            yield fn(job, progress, cancel)


class _QueueProgress:
    """A worker's ``progress``: puts the fields on the manager's queue, at most every ``every_s`` seconds
    (plus every evaluation step and the last step), so a fast loop does not wait on the queue each step."""

    def __init__(self, events, every_s: float = 0.1) -> None:
        self.events, self.every_s, self.last = events, every_s, 0.0

    def __call__(self, **fields: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s or fields.get("metrics") or fields.get("step") == fields.get("total"):
            self.last = now
            self.events.put(fields)


def _call_in_worker(fn, job, events, stop):
    """Runs in the worker process: ``fn`` with hooks that talk to the parent through the manager."""
    return fn(job, _QueueProgress(events), stop.is_set)


class ProcessExecutor:
    """Runs the jobs in a pool of ``max_workers`` fresh processes (spawned: no state is shared; each job
    loads the pretrained base from the disk cache). The parent forwards the workers' progress to the
    caller and the caller's cancel to the workers."""

    def __init__(self, max_workers: int = 2, poll_s: float = 0.05) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r} is not allowed: give an integer >= 1")
        self.max_workers, self.poll_s = max_workers, poll_s

    def map(self, fn, jobs, progress=None, cancel=None):
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, \
                concurrent.futures.ProcessPoolExecutor(self.max_workers, mp_context=context) as pool:
            events, stop = manager.Queue(), manager.Event()
            futures = [pool.submit(_call_in_worker, fn, job, events, stop) for job in jobs]
            try:
                for future in futures:
                    while True:
                        self._forward(events, progress)
                        if is_cancelled(cancel):
                            stop.set()
                        try:
                            result = future.result(timeout=self.poll_s)
                            break
                        except concurrent.futures.TimeoutError:
                            continue
                    self._forward(events, progress)
                    yield result
            finally:   # the caller stopped early or a job raised: stop the running jobs, drop the queued ones
                stop.set()
                for future in futures:
                    future.cancel()

    @staticmethod
    def _forward(events, progress: Progress | None) -> None:
        while True:
            try:
                fields = events.get_nowait()
            except queue.Empty:
                return
            if progress is not None:
                progress(**fields)


@dataclass
class SweepJob:
    """One run of a sweep: its config and label, where to write it, and (in this process only) the shared
    task. The task never crosses into another process (it holds closures): there it is loaded again."""

    config: TrainConfig
    label: str
    sweep_id: str
    runs_dir: str | None
    task: Task | None = None
    index: int = 0
    count: int = 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "task": None}


def sweep_settings(model: str = "mlp-digits", ranks: Sequence[int] | str = (1, 2, 4, 8, 16, 32),
                   alphas: Sequence[float | str] | str = (16,), rslora: Sequence[bool] | bool = (False,),
                   targets: Sequence | str | None = (None,), full_ft: bool = True,
                   **common) -> list[tuple[str, TrainConfig]]:
    """The (label, config) list of a sweep (see :class:`~.config.SweepSpec`, whose fields these are): the
    grid ranks × alphas × scalings × target choices of LoRA runs, plus one full fine-tuning run when
    ``full_ft``. ``common`` holds any other setting (steps, lr, seed, data, device...), shared by all runs.
    Alphas may be numbers or multiples of the rank ("r", "2r"). A target choice is in the one text form
    of targets: "q_proj,v_proj" (suffixes), "re:PATTERN" (a regex), "all-linear" or None (the model's
    default); a single string is one choice. Every config is validated here, so a bad sweep fails before
    any run starts.
    """
    common.pop("method", None)      # each run's method comes from the grid
    spec = SweepSpec.from_dict({"model": model, "ranks": ranks, "alphas": alphas, "rslora": rslora,
                                "targets": targets, "full_ft": full_ft, **common})
    return spec.settings()


@dataclass
class SweepResult:
    sweep_id: str
    results: list[TrainResult]

    @property
    def frame(self) -> pd.DataFrame:
        """One row per run: label, status, method, rank, alpha, rslora, targets, and the final metrics."""
        rows = []
        for r in self.results:
            c = r.config
            rows.append({"run_id": r.run_id, "name": r.metrics.get("label"), "status": r.status,
                         "method": c.method, "rank": c.rank if c.method == "lora" else None,
                         "alpha": c.alpha if c.method == "lora" else None, "rslora": c.rslora,
                         "targets": c.targets if isinstance(c.targets, str) or c.targets is None
                         else ",".join(c.targets), "error": r.error,
                         **{k: v for k, v in r.metrics.items() if k != "label"}})
        return pd.DataFrame(rows)


def _unwritten(job: SweepJob, status: str, error: str) -> TrainResult:
    """The result of a run that wrote no run folder (cancelled before it started, or refused)."""
    return TrainResult(None, None, status, error, {"label": job.label}, pd.DataFrame(), job.config)


def run_job(job: SweepJob, progress: Progress | None = None, cancel: Cancel = None) -> TrainResult:
    """Run one job of a sweep (in whichever process the executor chose)."""
    if is_cancelled(cancel):
        return _unwritten(job, "cancelled", "cancelled before it started")

    def report(**p) -> None:
        if progress is not None:
            progress(**p, run_index=job.index, run_count=job.count, label=job.label)

    try:
        result = train(job.config, task=job.task or task_for(job.config), runs_dir=job.runs_dir, progress=report,
                       cancel=cancel, name=job.label, sweep_id=job.sweep_id, keep_model=False)
    except ValueError as exc:   # e.g. a target missing on this model: recorded, the sweep goes on
        return _unwritten(job, "failed", str(exc))
    result.metrics["label"] = job.label
    return result


def _data_key(c: TrainConfig) -> tuple:
    return (c.model, c.data, c.pretrain_steps, c.seq_len, c.label_column, c.text_field)


def run_sweep(settings: Sequence[tuple[str, TrainConfig]], *, runs_dir: str | Path | None = None,
              executor: Executor | None = None, progress: Progress | None = None,
              cancel: Cancel = None, task: Task | None = None) -> SweepResult:
    """Run every (label, config) of ``settings`` as one run each, sharing one pretrained base and split.

    ``progress`` receives the trainer's keywords (step, total, loss, run_id, metrics) plus run_index,
    run_count and label (from a process pool, at most a few times a second per run, always on evaluation
    and last steps). ``cancel`` stops the runs in progress (recorded "cancelled") and skips the rest,
    under every executor. A run that fails (NaN loss) is recorded and the sweep goes on. ``task`` reuses
    a prepared base; otherwise it is prepared (pretrained and cached) once, here.
    """
    if not settings:
        raise ValueError("the sweep is empty")
    if len({_data_key(c) for _, c in settings}) > 1:
        raise ValueError("all runs of a sweep must share the model and data settings (model, data, "
                         "pretrain_steps, seq_len, label_column, text_field)")
    executor = executor or LocalExecutor()
    task = task or task_for(settings[0][1])
    sweep_id = time.strftime("sweep-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    jobs = [SweepJob(cfg, label, sweep_id, str(runs_dir) if runs_dir else None, task, i, len(settings))
            for i, (label, cfg) in enumerate(settings)]
    return SweepResult(sweep_id, list(executor.map(run_job, jobs, progress, cancel)))


class Cancelled(Exception):
    """The work was cancelled before any run started (e.g. while pretraining the base)."""


def run_sweep_job(spec: dict, progress: Progress | None = None, cancelled: Cancel = None,
                  home: str | Path | None = None) -> list[str]:
    """Entry point for background jobs (:mod:`lora_analysis.jobs`): run the sweep ``spec`` (the fields of
    :class:`~.config.SweepSpec`, as for :func:`sweep_settings`) into ``<home>/runs`` and return the run ids
    written. ``progress`` receives ``done``, ``total`` (steps over the whole sweep), ``message``, ``run``,
    ``loss`` and ``final``."""
    settings = sweep_settings(**spec)
    runs_dir = Path(home) / "runs" if home else None

    def pretraining(step, total, loss, **_) -> None:
        # a built-in base pretrains once (tiny-gpt: a couple of minutes); say so instead of "starting…"
        if is_cancelled(cancelled):   # nothing is cached: the next job pretrains afresh
            raise Cancelled(f"cancelled while pretraining the base, at step {step} of {total}")
        if progress is not None:
            progress(done=0, total=1, run=None, loss=loss, final=False,
                     message=f"pretraining the {spec.get('model')} base once (cached afterwards) · step "
                             f"{step}/{total} · loss {loss:.4f}")

    task = task_for(settings[0][1], pretraining)
    steps = [resolve_steps(c, task) for _, c in settings]
    total_steps, before = sum(steps), [sum(steps[:i]) for i in range(len(steps))]

    def report(step, total, loss, label, run_index, run_count, **_) -> None:
        if progress is not None:
            progress(done=before[run_index] + step, total=total_steps, run=label, loss=loss,
                     message=f"run {run_index + 1}/{run_count} · {label} · step {step}/{total} · loss {loss:.4f}",
                     final=False)

    result = run_sweep(settings, runs_dir=runs_dir, task=task, cancel=cancelled, progress=report)
    ids = [r.run_id for r in result.results if r.run_id]
    if progress is not None:
        counts = {s: sum(r.status == s for r in result.results) for s in ("failed", "cancelled")}
        # runs that failed before writing a run folder (e.g. a target the model lacks) exist only here
        unwritten = [{"run": r.metrics.get("label"), "error": r.error} for r in result.results
                     if r.status == "failed" and not r.run_id]
        progress(done=sum(r.metrics.get("steps_done") or 0 for r in result.results), total=total_steps,
                 run=None, loss=None, final=True, failures=unwritten,
                 message=f"{len(ids)} run{'s' if len(ids) != 1 else ''} written"
                 + "".join(f", {n} {s}" for s, n in counts.items() if n))
    return ids


def resolve_steps(config: TrainConfig, task: Task) -> int:
    return config.steps or task.defaults["steps"]


def sweep_frame(sweep_id: str, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The run-store rows of one sweep (as :func:`runstore.runs_frame`)."""
    frame = runstore.runs_frame(runs_dir)
    return frame[frame["sweep_id"] == sweep_id].reset_index(drop=True) if len(frame) else frame
