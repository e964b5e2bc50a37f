"""Sweeps on Ray: each run of a sweep is one Ray task, on this machine or on a cluster.

    executor = RayExecutor()                       # ray.init(): a local Ray on this machine
    executor = RayExecutor("auto")                 # the cluster this machine belongs to (``ray start``)
    executor = RayExecutor("ray://head:10001")     # a remote cluster, through Ray Client
    result = run_sweep(settings, executor=executor, progress=..., cancel=...)

Each trial asks for ``num_cpus`` CPUs and ``num_gpus`` GPUs (default: one GPU when the run is on CUDA, or on
"auto" in a cluster that has GPUs; none otherwise), loads the pretrained base in its worker (built-in bases
from that node's cache, pretrained there once and deterministically; Hugging Face models from that node's
cache or the hub) and trains one run. Where the run goes:

- a **shared filesystem** (the driver's runs folder is visible on the worker, which this executor checks
  with a probe file): the worker writes the run in place, as a local run would;
- **otherwise** the worker writes the run into its own temporary folder, sends it back as the bytes of a run
  bundle (:func:`runstore.export_run`: run.json, metrics.csv, the PEFT adapter or the weights), and the
  driver imports it (:func:`runstore.import_run`, the same atomic writer); the run keeps its id.

``transfer`` forces one way ("shared" or "bytes"; "auto" probes). Progress travels through a small actor:
workers send at most ~10 events a second per run (always evaluation steps, the last step and the end), the
driver forwards them to the caller's ``progress``. Cancel: trials still waiting for resources are cancelled
with ``ray.cancel``; running ones are asked to stop at their next step (the run is recorded "cancelled"
with its metrics so far) and, if one has not stopped after ``cancel_grace_s``, ``ray.cancel``-ed (then
killed). Runs already finished are left as they are. A trial whose worker dies (killed, out of memory, node
lost) is recorded in the run store as "interrupted" ("failed" for out of memory) with the reason, and the
rest of the sweep goes on; ``max_retries`` > 0 retries such a trial from its start.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd

from .. import runstore
from ..store.files import atomic_write_bytes
from .record import TrainResult
from .trainer import is_cancelled

TRANSFERS = ("auto", "shared", "bytes")
PROBE_PREFIX = ".ray-probe-"


def import_ray():
    """``ray``, or a ValueError saying how to install it (Ray is an optional extra)."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError("executor 'ray' needs Ray, which is not installed: pip install -r requirements-ray.txt "
                         "(or pip install 'ray>=2.9')") from exc
    return ray


# ---- the worker side ------------------------------------------------------------------------------------

class Channel:
    """The sweeps' mailboxes (one Ray actor per driver, reused by its sweeps: an actor is a process to
    start): a sweep's workers put progress events and read its cancel flag; the driver drains the events
    and sets the flag."""

    def __init__(self) -> None:
        self.events: dict[str, list[dict]] = {}
        self.stopped: set[str] = set()

    def put(self, sweep: str, events: list[dict]) -> None:
        self.events.setdefault(sweep, []).extend(events)

    def drain(self, sweep: str) -> list[dict]:
        return self.events.pop(sweep, [])

    def cancel(self, sweep: str) -> None:
        self.stopped.add(sweep)

    def cancelled(self, sweep: str) -> bool:
        return sweep in self.stopped

    def close(self, sweep: str) -> None:
        self.events.pop(sweep, None)
        self.stopped.discard(sweep)


_CHANNELS: dict[str, Any] = {}        # Ray job id -> this driver's Channel actor


def _channel(ray):
    job = ray.get_runtime_context().get_job_id()
    if job not in _CHANNELS:
        _CHANNELS.clear()               # a Ray from before (shut down since) took its actor with it
        _CHANNELS[job] = ray.remote(num_cpus=0)(Channel).remote()
    return _CHANNELS[job]


class _WorkerHooks:
    """A trial's ``progress`` and ``cancel``: events are batched (the latest plain step replaces the one
    before it; evaluation steps, last steps and ``finished`` are always kept) and sent every ``every_s``;
    the cancel flag is asked for every ``every_s`` without waiting for the answer."""

    def __init__(self, ray, channel, sweep: str, every_s: float = 0.1) -> None:
        self.ray, self.channel, self.sweep, self.every_s = ray, channel, sweep, every_s
        self.buffer: list[dict] = []
        self.last_send = self.last_ask = 0.0
        self.asking = None
        self.stop = False

    def progress(self, **fields: Any) -> None:
        keep = fields.get("metrics") or fields.get("finished") or fields.get("step") == fields.get("total")
        if self.buffer and not self.buffer[-1].get("_keep") and not keep:
            self.buffer[-1] = fields
        else:
            self.buffer.append({**fields, "_keep": True} if keep else fields)
        if keep or time.monotonic() - self.last_send >= self.every_s:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send the buffered events; ``wait``: until they are in the mailbox (the trial's last flush, so
        the driver has them before it sees the trial's result)."""
        if self.buffer:
            sent = self.channel.put.remote(self.sweep, [{k: v for k, v in e.items() if k != "_keep"}
                                                         for e in self.buffer])
            self.buffer, self.last_send = [], time.monotonic()
            if wait:
                self.ray.get(sent)

    def cancelled(self) -> bool:
        if self.stop:
            return True
        if self.asking is not None:
            ready, _ = self.ray.wait([self.asking], timeout=0)
            if ready:
                self.stop, self.asking = bool(self.ray.get(self.asking)), None
        if self.asking is None and time.monotonic() - self.last_ask >= self.every_s:
            self.asking, self.last_ask = self.channel.cancelled.remote(self.sweep), time.monotonic()
        return self.stop


def _shared(runs_dir: str | None, probe: tuple[str, str] | None) -> bool:
    """Whether the driver's runs folder is this worker's too: the probe file holds the driver's token."""
    if probe is None or runs_dir is None:
        return False
    try:
        return (Path(runs_dir) / probe[0]).read_text(encoding="utf-8") == probe[1]
    except OSError:
        return False


def trial(fn, job, channel, sweep: str, transfer: str, probe: tuple[str, str] | None):
    """One trial, in a Ray worker: ``fn(job, progress, cancel)``; returns (result, bundle bytes or None)."""
    import ray

    hooks = _WorkerHooks(ray, channel, sweep)
    channel.put.remote(sweep, [{"started": True, "run_index": job.index, "pid": os.getpid(),
                         "node": ray.get_runtime_context().get_node_id()}])
    if transfer == "shared" or (transfer == "auto" and _shared(job.runs_dir, probe)):
        try:
            return fn(job, hooks.progress, hooks.cancelled), None
        finally:
            hooks.flush(wait=True)
    with tempfile.TemporaryDirectory(prefix="lora-analysis-ray-") as tmp:
        try:
            result = fn(replace(job, runs_dir=tmp), hooks.progress, hooks.cancelled)
        finally:
            hooks.flush(wait=True)
        payload = None
        if result.run_id is not None:
            bundle = runstore.export_run(result.run_id, Path(tmp) / ".bundle" / f"{result.run_id}.zip", tmp)
            payload = bundle.read_bytes()
        return replace(result, run_dir=None), payload


# ---- the driver side ------------------------------------------------------------------------------------

def mark_run(run_dir: Path, status: str, error: str) -> bool:
    """Record a run that its worker left "running" as ended (``status``, ``error``); False when the run
    is not there or has already ended."""
    path = Path(run_dir) / runstore.RUN_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("status") != "running":
        return False
    record.update(status=status, error=error, finished=time.time())
    runstore.atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return True


def local_runtime_env(runtime_env: dict | None = None, env: dict | None = None) -> dict:
    """A runtime environment for a Ray started on this machine: its workers import this very
    ``lora_analysis`` (installed or not: its folder goes first on their PYTHONPATH) and see ``env``
    (e.g. LORA_ANALYSIS_HOME)."""
    runtime_env = dict(runtime_env or {})
    env_vars = {**dict(runtime_env.get("env_vars") or {}), **(env or {})}
    root = str(Path(__file__).resolve().parents[2])
    current = env_vars.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    env_vars["PYTHONPATH"] = root + (os.pathsep + current if current else "")
    runtime_env["env_vars"] = env_vars
    return runtime_env


class RayExecutor:
    """Runs sweep jobs as Ray tasks (see the module's doc). ``address``: None starts a local Ray on this
    machine (``ray.init()``), "auto" joins the cluster this machine is part of, "ray://host:port" connects
    through Ray Client; when Ray is already initialised in this process it is used as it is.
    ``max_concurrent``: at most this many trials in flight (default: all, as resources allow). ``num_cpus``,
    ``num_gpus``: each trial's request (``num_gpus=None``: see the module's doc). ``max_retries``: how often
    Ray retries a trial whose worker died. ``init_kwargs`` go to ``ray.init`` (e.g. ``runtime_env``)."""

    shares_memory = False

    def __init__(self, address: str | None = None, *, max_concurrent: int | None = None, num_cpus: float = 1.0,
                 num_gpus: float | None = None, max_retries: int = 0, transfer: str = "auto",
                 cancel_grace_s: float = 10.0, poll_s: float = 0.05, init_kwargs: dict | None = None) -> None:
        if address is not None and not (address == "auto" or address.startswith("ray://")
                                        or ":" in address):
            raise ValueError(f"ray address {address!r} is not allowed: give 'auto', 'ray://HOST:PORT' or "
                             "HOST:PORT (none: start a local Ray)")
        if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                           or max_concurrent < 1):
            raise ValueError(f"max_concurrent={max_concurrent!r} is not allowed: give an integer >= 1 or None")
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or num_cpus <= 0:
            raise ValueError(f"num_cpus={num_cpus!r} is not allowed: give a number > 0 (CPUs per trial)")
        if num_gpus is not None and (isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float))
                                     or num_gpus < 0):
            raise ValueError(f"num_gpus={num_gpus!r} is not allowed: give a number >= 0 (GPUs per trial) or None")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries={max_retries!r} is not allowed: give an integer >= 0")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer={transfer!r} is not allowed: choose one of {', '.join(TRANSFERS)}")
        self.address, self.max_concurrent, self.num_cpus, self.num_gpus = address, max_concurrent, num_cpus, num_gpus
        self.max_retries, self.transfer = max_retries, transfer
        self.cancel_grace_s, self.poll_s = cancel_grace_s, poll_s
        self.init_kwargs = dict(init_kwargs or {})
        import_ray()                    # say now, not after pretraining, that Ray is missing

    @property
    def on_this_machine(self) -> bool:
        """Whether the trials run on this machine (a local Ray): a base cached here is theirs too."""
        return self.address is None

    def _ray(self):
        ray = import_ray()
        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            # the workers' output stays in Ray's session logs (/tmp/ray/session_latest/logs): a progress
            # bar, not interleaved worker lines, is what a sweep shows
            kwargs.setdefault("log_to_driver", False)
            if self.address is None:
                kwargs["runtime_env"] = local_runtime_env(kwargs.get("runtime_env"))
            # ray.init replaces this process's SIGTERM handler with an exit: a caller's own (a background
            # job's: SIGTERM means "cancel the sweep") is put back
            before = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() \
                else None
            ray.init(address=self.address, **kwargs)
            if callable(before):
                signal.signal(signal.SIGTERM, before)
        return ray

    def resources(self, job, cluster_gpus: float = 0.0) -> dict:
        """The Ray options of ``job``'s trial, in a cluster with ``cluster_gpus`` GPUs."""
        gpus = self.num_gpus
        if gpus is None:
            device = getattr(job.config, "device", "auto")
            gpus = 1 if device == "cuda" or (device == "auto" and cluster_gpus >= 1) else 0
        return {"num_cpus": self.num_cpus, "num_gpus": gpus, "max_retries": self.max_retries,
                "retry_exceptions": False}

    def map(self, fn, jobs, progress=None, cancel=None):
        from .sweep import _unwritten, finished_event

        jobs = list(jobs)
        if not jobs:
            return
        ray = self._ray()
        channel, sweep = _channel(ray), secrets.token_hex(8)
        remote = ray.remote(trial)
        probe = self._write_probe(jobs)
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0) if self.num_gpus is None else 0.0
        results: list[TrainResult | None] = [None] * len(jobs)
        refs: dict[Any, int] = {}                   # trials in flight -> job index
        started: dict[int, dict] = {}               # job index -> its "started" event
        run_ids: dict[int, list[str]] = {}          # job index -> the runs its attempts wrote
        cancelling_since: float | None = None
        stopped = 0                                 # 1: ray.cancel sent to running trials; 2: force-killed
        submitted = emitted = 0

        def forward() -> None:
            for event in ray.get(channel.drain.remote(sweep)):
                i = event.get("run_index")
                if event.get("started"):
                    started[i] = event
                    continue
                if event.get("run_id") and event["run_id"] not in run_ids.setdefault(i, []):
                    run_ids[i].append(event["run_id"])
                if progress is not None:
                    progress(**event)

        def finish(i: int, result: TrainResult, status_event: bool) -> None:
            results[i] = result
            if status_event and progress is not None:
                progress(**finished_event(jobs[i], result))

        try:
            while emitted < len(jobs):
                while (cancelling_since is None and submitted < len(jobs)
                       and (self.max_concurrent is None or len(refs) < self.max_concurrent)):
                    job = jobs[submitted]
                    ref = remote.options(**self.resources(job, cluster_gpus)).remote(fn, job, channel, sweep,
                                                                                     self.transfer, probe)
                    refs[ref] = submitted
                    submitted += 1
                ready = ray.wait(list(refs), num_returns=1, timeout=self.poll_s)[0] if refs else []
                forward()
                for ref in ready:
                    i = refs.pop(ref)
                    result, event = self._collect(ray, ref, jobs[i], started.get(i), run_ids.get(i, []), _unwritten)
                    finish(i, result, event)
                if cancelling_since is None and is_cancelled(cancel):
                    cancelling_since = time.monotonic()
                    channel.cancel.remote(sweep)
                    for ref, i in refs.items():
                        if i not in started:            # still waiting for resources: never starts
                            ray.cancel(ref)
                    for i in range(submitted, len(jobs)):
                        finish(i, _unwritten(jobs[i], "cancelled", "cancelled before it started"), True)
                    submitted = len(jobs)
                if cancelling_since is not None and refs:
                    waited = time.monotonic() - cancelling_since
                    if stopped < 2 and waited >= self.cancel_grace_s * (stopped + 1):
                        for ref in refs:
                            ray.cancel(ref, force=stopped == 1)
                        stopped += 1
                while emitted < len(jobs) and results[emitted] is not None:
                    yield results[emitted]
                    emitted += 1
        finally:
            if refs:        # Ctrl-C, the caller stopped early or something raised: stop what still runs
                self._stop(ray, channel, sweep, refs, jobs, started, run_ids, _unwritten)
            if probe is not None:
                try:
                    (Path(jobs[0].runs_dir) / probe[0]).unlink()
                except OSError:
                    pass
            channel.close.remote(sweep)

    def _stop(self, ray, channel, sweep: str, refs: dict, jobs, started: dict, run_ids: dict, unwritten) -> None:
        """Stop the trials in flight as a cancel does (pending ones never start, running ones stop at their
        next step, within ``cancel_grace_s``, else ``ray.cancel``), and keep what they wrote (runs sent as
        bytes are imported); a second Ctrl-C here leaves the rest to Ray."""
        channel.cancel.remote(sweep)
        running = [ref for ref, i in refs.items() if i in started]
        for ref, i in refs.items():
            if i not in started:
                ray.cancel(ref)
        ready = ray.wait(running, num_returns=len(running), timeout=self.cancel_grace_s)[0] if running else []
        for ref in refs:
            if ref not in ready:
                ray.cancel(ref)
        for ref in ready:
            try:
                self._collect(ray, ref, jobs[refs[ref]], started.get(refs[ref]), run_ids.get(refs[ref], []),
                              unwritten)
            except Exception:  # noqa: BLE001 - already leaving on another error: that one is reported
                continue

    def _write_probe(self, jobs) -> tuple[str, str] | None:
        runs_dir = getattr(jobs[0], "runs_dir", None)
        if self.transfer != "auto" or runs_dir is None:
            return None
        name, token = f"{PROBE_PREFIX}{secrets.token_hex(6)}.txt", secrets.token_hex(16)
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
        runstore.atomic_write_text(Path(runs_dir) / name, token)
        return name, token

    def _collect(self, ray, ref, job, started: dict | None, attempts: list[str], unwritten):
        """The trial's result, its run brought into the driver's store; (result, whether the trial's own
        ``finished`` event is missing and must be sent from here)."""
        try:
            result, payload = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return self._lost(job, attempts, "cancelled", "cancelled (Ray task cancelled)" if started
                              else "cancelled before it started", unwritten), True
        except ray.exceptions.RayTaskError:
            raise                       # the trial raised: a bug, as under the local executor
        except ray.exceptions.RayError as exc:      # the worker, its node or its result was lost
            status = "failed" if isinstance(exc, ray.exceptions.OutOfMemoryError) else "interrupted"
            where = f" (pid {started['pid']} on node {started['node'][:12]})" if started else ""
            reason = (f"its Ray worker{where} died: {type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}")
            if self.max_retries:
                reason += f" (after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'})"
            return self._lost(job, attempts, status, reason, unwritten), True
        if payload is not None:
            run = self._receive(payload, job.runs_dir)
            result = replace(result, run_id=run.id, run_dir=run.dir)
        for run_id in attempts:         # earlier attempts of a retried trial, left "running" by their worker
            if run_id != result.run_id:
                mark_run(Path(job.runs_dir) / run_id, "interrupted",
                         f"its Ray worker died; the trial was retried as run {result.run_id}")
        return result, False

    @staticmethod
    def _receive(payload: bytes, runs_dir: str | None) -> runstore.Run:
        """Write a run bundle's bytes to a temporary file and import it into the driver's run store."""
        with tempfile.TemporaryDirectory(prefix="lora-analysis-bundle-") as tmp:
            path = atomic_write_bytes(Path(tmp) / "run.zip", payload)
            return runstore.import_run(path, runs_dir)

    @staticmethod
    def _lost(job, attempts: list[str], status: str, reason: str, unwritten) -> TrainResult:
        """A trial that returned nothing: its run in the store (written in place by the worker, or created
        here) is marked ``status`` with ``reason``."""
        root = Path(job.runs_dir) if job.runs_dir else runstore.runs_root()
        for run_id in attempts:
            mark_run(root / run_id, status, reason)
        if attempts and (root / attempts[-1]).is_dir():
            run = runstore.read_run(root / attempts[-1])
            return TrainResult(run.id, run.dir, status, reason, {**run.metrics, "label": job.label},
                               run.metrics_frame(), job.config)
        if status == "cancelled" and not attempts:
            return unwritten(job, status, reason)
        # nothing reached this store (the run lived in the worker's own folder): record it here
        writer = runstore.create_run(job.config.to_dict(), job.runs_dir, name=job.label, sweep_id=job.sweep_id)
        writer.finish(status, error=reason)
        return TrainResult(writer.id, writer.dir, status, reason, {"label": job.label}, pd.DataFrame(), job.config)
