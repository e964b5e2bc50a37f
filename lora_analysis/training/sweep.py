"""Sweeps: many runs over rank, alpha, scaling (α/r vs rsLoRA's α/√r) and target modules, plus the full
fine-tuning baseline, all on one pretrained base and one data split.

    settings = sweep_settings(model="mlp-digits", ranks=[1, 2, 4, 8, 16, 32], alphas=[16], full_ft=True)
    result = run_sweep(settings, progress=print_progress, cancel=stop_event)
    result.frame          # one row per run (runstore.runs_frame columns)

Each run is an independent job handed to an :class:`Executor` (``map(fn, jobs)``): ``LocalExecutor``
runs them in turn in this process (sharing the prepared base in memory); ``ProcessExecutor`` runs them in
a process pool (each worker reloads the base from the cache). A cluster engine plugs in the same way.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import pandas as pd

from .. import runstore
from ..lora.config import ALL_LINEAR
from .models import Task, prepare_task
from .trainer import Cancel, TrainConfig, TrainResult, _is_cancelled, train

J = TypeVar("J")
R = TypeVar("R")


class Executor(Protocol):
    """Runs independent jobs; yields their results in job order."""

    def map(self, fn: Callable[[J], R], jobs: Iterable[J]) -> Iterator[R]: ...


class LocalExecutor:
    """Runs the jobs one after another in this process (the default: deterministic, shares memory)."""

    def map(self, fn, jobs):
        for job in jobs:
            yield fn(job)


class ProcessExecutor:
    """Runs the jobs in a pool of ``max_workers`` fresh processes (spawned: no state is shared, each
    worker loads the pretrained base from the cache). Progress is reported per finished run."""

    def __init__(self, max_workers: int = 2) -> None:
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers={max_workers!r} is not allowed: give an integer >= 1")
        self.max_workers = max_workers

    def map(self, fn, jobs):
        jobs = list(jobs)
        with concurrent.futures.ProcessPoolExecutor(self.max_workers,
                                                    mp_context=multiprocessing.get_context("spawn")) as pool:
            yield from pool.map(fn, [replace(j, task=None) for j in jobs])


@dataclass
class SweepJob:
    """One run of a sweep: its config and label, where to write it, and (in-process only) the shared task."""

    config: TrainConfig
    label: str
    sweep_id: str
    runs_dir: str | None
    task: Task | None = None
    index: int = 0
    count: int = 1


def _parse_alpha(value, rank: int) -> float:
    """Alpha as a number, or relative to the rank: "r", "2r", "0.5r"."""
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            return float(text[:-1] or 1) * rank if text.endswith("r") else float(text)
        except ValueError:
            raise ValueError(f"alpha={value!r} is not allowed: give a number or a multiple of the rank like "
                             "'r' or '2r'") from None
    return value


def _parse_targets(value):
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    text = str(value).strip()
    if text.lower() in (ALL_LINEAR, "default", ""):
        return ALL_LINEAR if text.lower() == ALL_LINEAR else None
    return [t.strip() for t in text.split(",") if t.strip()]


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and "," in value:
        return [v.strip() for v in value.split(",") if v.strip()]
    return [value]


def sweep_settings(model: str = "mlp-digits", ranks: Sequence[int] | str = (1, 2, 4, 8, 16, 32),
                   alphas: Sequence[float | str] | str = (16,), rslora: Sequence[bool] | bool = (False,),
                   targets: Sequence | None = (None,), full_ft: bool = True, **common) -> list[tuple[str, TrainConfig]]:
    """The (label, config) list of a sweep: the grid ranks × alphas × scalings × target choices of LoRA
    runs, plus one full fine-tuning run when ``full_ft``. ``common`` holds any other :class:`TrainConfig`
    field (steps, lr, seed, data, device...), shared by all runs. Alphas may be numbers or multiples of the
    rank ("r", "2r"); a target choice is a list of module suffixes, "q_proj,v_proj", "all-linear" or None
    (the model's default). Every config is validated here, so a bad sweep fails before any run starts.

    The classic studies: rank sweep ``ranks=[1..32], alphas=[16]``; alpha at fixed rank ``ranks=[8],
    alphas=["r", "2r", 16]``; α/r vs rsLoRA ``rslora=[False, True]``; targets ``targets=["q_proj,v_proj",
    "all-linear"]``.
    """
    ranks_l = [int(r) if isinstance(r, str) and r.strip().isdigit() else r for r in _as_list(ranks)]
    alphas_l, rslora_l = _as_list(alphas), _as_list(rslora)
    targets_l = _as_list(targets) if not isinstance(targets, str) or "," not in targets else [targets]
    targets_l = [_parse_targets(t) for t in (targets_l or [None])]
    if not ranks_l and not full_ft:
        raise ValueError("the sweep is empty: give at least one rank or full_ft=True")
    if ranks_l and not alphas_l:
        raise ValueError("alphas is empty: give at least one alpha (a number, 'r' or '2r')")
    common.pop("method", None)
    settings: list[tuple[str, TrainConfig]] = []
    for target in targets_l:
        for scaling_rs in rslora_l or [False]:
            for alpha in alphas_l:
                for rank in ranks_l:
                    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                        raise ValueError(f"rank={rank!r} is not allowed: ranks must be integers >= 1")
                    a = _parse_alpha(alpha, rank)
                    cfg = TrainConfig(model=model, method="lora", rank=rank, alpha=a, rslora=bool(scaling_rs),
                                      targets=target, **common)
                    cfg.validate()
                    parts = [f"r={rank}", f"α={a:g}"]
                    if len(rslora_l) > 1 or scaling_rs:
                        parts.append("α/√r" if scaling_rs else "α/r")
                    if len(targets_l) > 1 or target is not None:
                        parts.append(target if isinstance(target, str) else ",".join(target or ["default"]))
                    settings.append(("LoRA " + " ".join(parts), cfg))
    if full_ft:
        cfg = TrainConfig(model=model, method="full", **common)
        cfg.validate()
        settings.append(("full FT", cfg))
    return settings


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


# progress and cancel hooks cannot cross into other processes: they live here, keyed by sweep id
_HOOKS: dict[str, tuple[Callable | None, Cancel]] = {}


def _run_job(job: SweepJob) -> TrainResult:
    progress, cancel = _HOOKS.get(job.sweep_id, (None, None))
    task = job.task or _task_for(job.config)

    def report(**p) -> None:
        if progress is not None:
            progress(**p, run_index=job.index, run_count=job.count, label=job.label)

    if _is_cancelled(cancel):
        return TrainResult(None, None, "cancelled", "cancelled before it started", {"label": job.label},
                           pd.DataFrame(), job.config)
    try:
        result = train(job.config, task=task, runs_dir=job.runs_dir, progress=report, cancel=cancel,
                       name=job.label, sweep_id=job.sweep_id, keep_model=False)
    except ValueError as exc:   # e.g. a target missing on this model: recorded, the sweep goes on
        return TrainResult(None, None, "failed", str(exc), {"label": job.label}, pd.DataFrame(), job.config)
    result.metrics["label"] = job.label
    return result


_TASKS: dict[tuple, Task] = {}


def _task_key(c: TrainConfig) -> tuple:
    return (c.model, c.data, c.pretrain_steps, c.seq_len, c.label_column, c.text_field)


def _task_for(config: TrainConfig, progress: Callable[..., None] | None = None) -> Task:
    key = _task_key(config)
    if key not in _TASKS:
        _TASKS.clear()      # keep one base in memory at a time
        _TASKS[key] = prepare_task(config.model, config.data, pretrain_steps=config.pretrain_steps,
                                   seq_len=config.seq_len, label_column=config.label_column,
                                   text_field=config.text_field, progress=progress)
    return _TASKS[key]


def run_sweep(settings: Sequence[tuple[str, TrainConfig]], *, runs_dir: str | Path | None = None,
              executor: Executor | None = None, progress: Callable[..., None] | None = None,
              cancel: Cancel = None, task: Task | None = None) -> SweepResult:
    """Run every (label, config) of ``settings`` as one run each, sharing one pretrained base and split.

    ``progress`` receives the trainer's keywords (step, total, loss, run_id, metrics) plus run_index,
    run_count and label. ``cancel`` stops the run in progress (recorded "cancelled") and skips the rest.
    A run that fails (NaN loss) is recorded and the sweep goes on.
    """
    if not settings:
        raise ValueError("the sweep is empty")
    keys = {_task_key(c) for _, c in settings}
    if len(keys) > 1:
        raise ValueError("all runs of a sweep must share the model and data settings (model, data, "
                         "pretrain_steps, seq_len, label_column, text_field)")
    executor = executor or LocalExecutor()
    sweep_id = time.strftime("sweep-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    if task is None and isinstance(executor, LocalExecutor):
        task = _task_for(settings[0][1])
    elif task is None:
        _task_for(settings[0][1])   # pretrain (and cache) once here, not in every worker at the same time
    jobs = [SweepJob(cfg, label, sweep_id, str(runs_dir) if runs_dir else None, task, i, len(settings))
            for i, (label, cfg) in enumerate(settings)]
    _HOOKS[sweep_id] = (progress, cancel)
    try:
        results = []
        for result in executor.map(_run_job, jobs):
            results.append(result)
            if progress is not None and not isinstance(executor, LocalExecutor):
                progress(step=result.config.steps, total=result.config.steps, loss=result.metrics.get(
                    "final_train_loss"), run_id=result.run_id, metrics=None, run_index=len(results) - 1,
                    run_count=len(jobs), label=result.metrics.get("label"))
    finally:
        _HOOKS.pop(sweep_id, None)
    return SweepResult(sweep_id, results)


def run_sweep_job(spec: dict, progress: Callable[..., None] | None = None, cancelled: Cancel = None,
                  home: str | Path | None = None) -> list[str]:
    """Entry point for background jobs (:mod:`lora_analysis.jobs`): run the sweep ``spec`` (keyword
    arguments of :func:`sweep_settings`) into ``<home>/runs`` and return the run ids written. ``progress``
    receives ``done``, ``total`` (steps over the whole sweep), ``message``, ``run``, ``loss`` and
    ``final``."""
    settings = sweep_settings(**spec)
    runs_dir = Path(home) / "runs" if home else None

    def pretraining(step, total, loss, **_) -> None:
        # a built-in base pretrains once (tiny-gpt: a couple of minutes); say so instead of "starting…"
        if _is_cancelled(cancelled):   # nothing is cached: the next job pretrains afresh
            raise RuntimeError(f"cancelled while pretraining the base, at step {step} of {total}")
        if progress is not None:
            progress(done=0, total=1, run=None, loss=loss, final=False,
                     message=f"pretraining the {spec.get('model')} base once (cached afterwards) · step "
                             f"{step}/{total} · loss {loss:.4f}")

    task = _task_for(settings[0][1], pretraining)
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
