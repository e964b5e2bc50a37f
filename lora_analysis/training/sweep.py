"""Sweeps: many runs over rank, alpha, scaling (α/r vs rsLoRA's α/√r) and target modules, plus the full
fine-tuning baseline, all on one pretrained base and one data split.

    settings = sweep_settings(model="mlp-digits", ranks=[1, 2, 4, 8, 16, 32], alphas=[16], full_ft=True)
    result = run_sweep(settings, progress=print_progress, cancel=stop_event)
    result.frame          # one row per run (runstore.runs_frame columns)

Each run is an independent job handed to an :class:`Executor` together with the caller's ``progress`` and
``cancel``. There are two: :class:`LocalExecutor` (the default) runs the jobs in turn in this process,
sharing the prepared base in memory; :class:`RayExecutor` (``training/ray_executor.py``, needs the optional
``ray`` package) makes each run a Ray task that asks for its own CPUs or GPU, on this machine or on a
cluster, and brings progress, cancel and the finished runs back to this process.

Both report the same progress: the trainer's keywords for every step (fewer over Ray: at most ~10 a second
per run, always evaluation and last steps), and one ``finished=<status>`` event per run when it ends.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import pandas as pd

from .. import runstore
from .config import SweepSpec, TrainConfig
from .models import DEFAULTS, TASK_SETTINGS, Task
from .trainer import Cancel, TrainResult, is_cancelled, task_for, train

J = TypeVar("J")
R = TypeVar("R")
Progress = Callable[..., None]
EXECUTORS = ("local", "ray")


class Executor(Protocol):
    """Runs independent jobs as ``fn(job, progress, cancel)`` wherever it runs them, and yields their
    results in job order. ``progress(**fields)`` must reach the caller's ``progress`` and ``cancel()``
    must answer the caller's ``cancel``, from every worker. ``shares_memory``: the jobs run in this
    process, so a base prepared here is handed to them (otherwise each worker loads its own);
    ``on_this_machine``: they run on this machine, so a base cached here is theirs too."""

    shares_memory: bool
    on_this_machine: bool

    def map(self, fn: Callable[[J, Progress | None, Cancel], R], jobs: Iterable[J],
            progress: Progress | None = None, cancel: Cancel = None) -> Iterator[R]: ...


class LocalExecutor:
    """Runs the jobs one after another in this process (the default: deterministic, shares memory)."""

    shares_memory = True
    on_this_machine = True

    def map(self, fn, jobs, progress=None, cancel=None):
        for job in jobs:
            yield fn(job, progress, cancel)


def make_executor(kind: str = "local", *, address: str | None = None, workers: int | None = None,
                  trial_cpus: float = 1.0, trial_gpus: float | None = None, retries: int = 0) -> Executor:
    """The executor named ``kind`` ("local" or "ray") with its options (see :class:`RayExecutor`).
    ``workers`` is how many runs go at once: on Ray at most that many trials are in flight (default:
    as many as the cluster's free resources allow); the local executor runs one run at a time, so
    ``workers`` > 1 (or any Ray option) without "ray" is refused rather than ignored."""
    if kind not in EXECUTORS:
        raise ValueError(f"executor={kind!r} is not known: choose one of {', '.join(EXECUTORS)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers={workers!r} is not allowed: give an integer >= 1 (0: the default)")
    if kind == "local":
        ray_only = {"workers": workers if workers and workers > 1 else None, "ray_address": address,
                    "retries": retries or None, "trial_gpus": trial_gpus,
                    "trial_cpus": None if trial_cpus == 1.0 else trial_cpus}
        given = [f"{k}={v!r}" for k, v in ray_only.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} needs executor='ray' (--executor ray): the local executor "
                             "runs one run at a time in this process")
        return LocalExecutor()
    from .ray_executor import RayExecutor
    return RayExecutor(address, max_concurrent=workers or None, num_cpus=trial_cpus, num_gpus=trial_gpus,
                       max_retries=retries)


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


def finished_event(job: SweepJob, result: TrainResult, total: int | None = None) -> dict:
    """The progress fields that say a run is over (sent once per run, by every executor)."""
    history = result.history
    losses = history["train_loss"].dropna() if "train_loss" in history else ()
    return {"finished": result.status, "step": result.metrics.get("steps_done") or 0,
            "total": total or result.config.steps, "loss": float(losses.iloc[-1]) if len(losses) else None,
            "run_id": result.run_id, "metrics": None, "error": result.error, "run_index": job.index,
            "run_count": job.count, "label": job.label}


def run_job(job: SweepJob, progress: Progress | None = None, cancel: Cancel = None) -> TrainResult:
    """Run one job of a sweep (in whichever process the executor chose); ends with a ``finished`` event."""
    seen = {"total": None}

    def report(**p) -> None:
        seen["total"] = p.get("total")
        if progress is not None:
            progress(**p, run_index=job.index, run_count=job.count, label=job.label)

    if is_cancelled(cancel):
        result = _unwritten(job, "cancelled", "cancelled before it started")
    else:
        try:
            result = train(job.config, task=job.task or task_for(job.config), runs_dir=job.runs_dir,
                           progress=report, cancel=cancel, name=job.label, sweep_id=job.sweep_id, keep_model=False)
        except ValueError as exc:   # e.g. a target missing on this model: recorded, the sweep goes on
            result = _unwritten(job, "failed", str(exc))
        result.metrics["label"] = job.label
    if progress is not None:
        progress(**finished_event(job, result, seen["total"]))
    return result


def _data_key(c: TrainConfig) -> tuple:
    return tuple(getattr(c, k) for k in TASK_SETTINGS)


def run_sweep(settings: Sequence[tuple[str, TrainConfig]], *, runs_dir: str | Path | None = None,
              executor: Executor | None = None, progress: Progress | None = None,
              cancel: Cancel = None, task: Task | None = None) -> SweepResult:
    """Run every (label, config) of ``settings`` as one run each, sharing one pretrained base and split.

    ``progress`` receives the trainer's keywords (step, total, loss, run_id, metrics) plus run_index,
    run_count and label, and once per run ``finished=<status>`` (with ``error``) when it ends, whatever
    the executor. ``cancel`` stops the runs in progress (recorded "cancelled") and skips the rest, under
    every executor. A run that fails (NaN loss, a worker that died) is recorded and the sweep goes on.
    ``task`` reuses a prepared base; otherwise the local executor prepares it (pretrained and cached)
    once, here, and a remote executor's workers load it themselves. ``runs_dir`` is resolved here, so
    remote workers write to (or send their runs back to) the run store this process looks at.
    """
    if not settings:
        raise ValueError("the sweep is empty")
    if len({_data_key(c) for _, c in settings}) > 1:
        raise ValueError(f"all runs of a sweep must share the model and data settings ({', '.join(TASK_SETTINGS)})")
    executor = executor or LocalExecutor()
    if getattr(executor, "shares_memory", True):
        task = task or task_for(settings[0][1])
    sweep_id = time.strftime("sweep-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    root = str(runstore.runs_root(runs_dir).absolute())
    jobs = [SweepJob(cfg, label, sweep_id, root, task, i, len(settings)) for i, (label, cfg) in enumerate(settings)]
    return SweepResult(sweep_id, list(executor.map(run_job, jobs, progress, cancel)))


class SweepProgress:
    """A sweep's progress as one bar: runs done out of the total, with the latest step and loss of each
    run in progress. Fed the events of :func:`run_sweep`'s ``progress`` (in any order: runs may go in
    parallel); ``fraction`` counts a run in progress by its share of steps."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.finished: dict[int, str] = {}
        self.running: dict[int, dict] = {}

    def __call__(self, run_index: int = 0, step: int = 0, total: int | None = None, loss: float | None = None,
                 label: str | None = None, finished: str | None = None, **_) -> None:
        if finished is not None:
            self.finished[run_index] = finished
            self.running.pop(run_index, None)
        elif run_index not in self.finished:
            self.running[run_index] = {"run": label, "step": step, "total": total, "loss": loss}

    @property
    def done(self) -> int:
        return len(self.finished)

    @property
    def fraction(self) -> float:
        partial = sum(r["step"] / r["total"] for r in self.running.values() if r["total"])
        return (self.done + partial) / self.count if self.count else 1.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for status in self.finished.values():
            out[status] = out.get(status, 0) + 1
        return out

    def losses(self, limit: int = 3) -> str:
        """The runs in progress, e.g. "LoRA r=4 α=16 step 20/40 loss 0.4123 · full FT step 3/40 loss 1.02"."""
        parts = [f"{r['run']} step {r['step']}/{r['total']}" + (f" loss {r['loss']:.4f}" if r["loss"] is not None
                                                                  else "")
                 for _, r in sorted(self.running.items())]
        return " · ".join(parts[:limit] + ([f"+{len(parts) - limit} more"] if len(parts) > limit else []))

    def summary(self) -> str:
        text = f"{self.done}/{self.count} runs done"
        failed = {s: n for s, n in self.counts().items() if s != "completed"}
        text += "".join(f", {n} {s}" for s, n in failed.items())
        return text + (f" · {self.losses()}" if self.running else "")


class Cancelled(Exception):
    """The work was cancelled before any run started (e.g. while pretraining the base)."""


def executor_from_spec(spec: dict | None) -> Executor:
    """The executor a job spec names: ``{"kind": "ray", "address": ..., "workers": ..., "trial_cpus": ...,
    "trial_gpus": ..., "retries": ...}`` or None (local)."""
    spec = dict(spec or {})
    allowed = ("kind", "address", "workers", "trial_cpus", "trial_gpus", "retries")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ValueError(f"executor setting {unknown[0]!r} is not known: allowed are {', '.join(allowed)}")
    return make_executor(spec.pop("kind", "local"), **spec)


def split_job_spec(spec: dict) -> tuple[dict, dict | None]:
    """A job's sweep spec without its ``executor`` entry, and that entry."""
    spec = dict(spec)
    return spec, spec.pop("executor", None)


def run_sweep_job(spec: dict, progress: Progress | None = None, cancelled: Cancel = None,
                  home: str | Path | None = None) -> list[str]:
    """Entry point for background jobs (:mod:`lora_analysis.jobs`): run the sweep ``spec`` (the fields of
    :class:`~.config.SweepSpec`, as for :func:`sweep_settings`, plus an optional ``executor`` entry, see
    :func:`executor_from_spec`) into ``<home>/runs`` and return the run ids written. ``progress``
    receives ``done`` (runs done, a run in progress counting by its share of steps), ``total`` (runs),
    ``runs_done``, ``running`` (each run in progress: run, step, total, loss), ``message``, ``run``,
    ``loss`` and ``final``."""
    sweep, executor_spec = split_job_spec(spec)
    executor = executor_from_spec(executor_spec)
    settings = sweep_settings(**sweep)
    runs_dir = Path(home) / "runs" if home else None
    state = SweepProgress(len(settings))

    def send(final: bool = False, **extra) -> None:
        if progress is not None:
            running = [dict(r) for _, r in sorted(state.running.items())]
            progress(done=round(state.fraction * state.count, 4), total=state.count, runs_done=state.done,
                     running=running, run=running[0]["run"] if running else None,
                     loss=running[0]["loss"] if running else None, final=final,
                     message=f"{'Ray: ' if not executor.shares_memory else ''}{state.summary()}", **extra)

    pretrain_started: list[float] = []

    def pretraining(step, total, loss, **_) -> None:
        # a built-in base pretrains once (tiny-gpt: a couple of minutes); say so instead of "starting…"
        if is_cancelled(cancelled):   # nothing is cached: the next job pretrains afresh
            raise Cancelled(f"cancelled while pretraining the base, at step {step} of {total}")
        if progress is not None:
            pretrain_started[:] = pretrain_started or [time.time()]
            progress(done=0, total=state.count, runs_done=0, running=[], run=None, loss=loss, final=False,
                     phase="pretrain", pretrain_step=step, pretrain_total=total,
                     message=pretrain_message(sweep.get("model"), step, total, loss,
                                              time.time() - pretrain_started[0]))

    # prepared here when the runs are in this process or on this machine (the workers read the cache)
    task = task_for(settings[0][1], pretraining) if executor.shares_memory or executor.on_this_machine else None

    def report(**p) -> None:
        state(**p)
        send()

    send()
    result = run_sweep(settings, runs_dir=runs_dir, task=task, cancel=cancelled, progress=report, executor=executor)
    ids = [r.run_id for r in result.results if r.run_id]
    # runs that failed before writing a run folder (e.g. a target the model lacks) exist only here
    unwritten = [{"run": r.metrics.get("label"), "error": r.error} for r in result.results
                 if r.status == "failed" and not r.run_id]
    counts = {s: sum(r.status == s for r in result.results) for s in ("failed", "cancelled", "interrupted")}
    state.running.clear()
    if progress is not None:
        progress(done=state.count, total=state.count, runs_done=state.count, running=[], run=None, loss=None,
                 final=True, failures=unwritten,
                 message=f"{len(ids)} run{'s' if len(ids) != 1 else ''} written"
                 + "".join(f", {n} {s}" for s, n in counts.items() if n))
    return ids


def pretrain_message(model: str | None, step: int, total: int, loss: float, elapsed_s: float) -> str:
    """"pretraining the tiny-gpt base once (cached afterwards) · step 120/2000 · loss 3.2100 · about 4 min
    left": the estimate from the steps so far (shown once a few steps have gone)."""
    text = f"pretraining the {model} base once (cached afterwards) · step {step}/{total} · loss {loss:.4f}"
    if step >= 3 and total > step and elapsed_s > 0:
        return text + f" · about {format_duration(elapsed_s / step * (total - step))} left"
    return text


def format_duration(seconds: float) -> str:
    """3 s, 45 s, 2 min 5 s, 1 h 20 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s" if seconds < 600 else f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def resolve_steps(config: TrainConfig, task: Task | None = None) -> int:
    """A run's steps: its own, else the model's default (from the prepared ``task`` when there is one)."""
    if config.steps:
        return config.steps
    return (task.defaults if task is not None else DEFAULTS.get(config.model, DEFAULTS["hf"]))["steps"]


def sweep_frame(sweep_id: str, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """The run-store rows of one sweep (as :func:`runstore.runs_frame`)."""
    frame = runstore.runs_frame(runs_dir)
    return frame[frame["sweep_id"] == sweep_id].reset_index(drop=True) if len(frame) else frame
