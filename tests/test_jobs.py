"""Background jobs: a sweep runs in another process, reports progress, can be cancelled, and a worker that
died is reported as interrupted. Closing the dashboard changes nothing: everything lives on disk."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lora_analysis import jobs, runstore

SPEC = {"model": "mlp-digits", "ranks": [2], "alphas": [4.0], "full_ft": True, "steps": 20, "pretrain_steps": 60}


def wait(job, timeout=120.0, until=lambda j: j.done):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = jobs.read_job(job.dir)
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job.id} did not get there in {timeout}s (status {job.status})")


def test_sweep_job_runs_in_background_and_fills_the_store(lora_home):
    job = jobs.start_job("sweep", SPEC)
    assert job.status == "running" and job.pid and job.pid != os.getpid()
    assert job.pid_start_time is not None and job.pid_start_time >= job.started - 1.0   # the worker, not a pid
    job = wait(job)
    assert job.status == "completed", (job.error, (job.dir / "log.txt").read_text()[-2000:])
    assert len(job.run_ids) == 2
    assert job.progress["final"] and job.progress["done"] == job.progress["total"] == job.progress["runs_done"] == 2
    stored = {r.id: r for r in runstore.list_runs()}
    assert set(job.run_ids) == set(stored) and all(r.status == "completed" for r in stored.values())
    assert [j.id for j in jobs.list_jobs()] == [job.id]


def test_cancel_stops_the_run_and_records_it(lora_home):
    job = jobs.start_job("sweep", SPEC | {"ranks": [1], "full_ft": False, "steps": 100_000})
    wait(job, until=lambda j: any(r["step"] > 5 for r in j.progress.get("running") or []))
    jobs.cancel_job(jobs.read_job(job.dir))
    job = wait(job)
    assert job.status == "cancelled"
    runs = runstore.list_runs()
    assert len(runs) == 1 and runs[0].status == "cancelled"
    assert 5 < runs[0].metrics_frame()["step"].max() < 100_000


def test_bad_spec_fails_before_any_process(lora_home):
    with pytest.raises(ValueError, match="rank=0"):
        jobs.start_job("sweep", SPEC | {"ranks": [0]})
    with pytest.raises(ValueError, match="job kind 'train-everything'"):
        jobs.start_job("train-everything", {})
    assert jobs.list_jobs() == []


def test_dead_worker_reads_as_interrupted(lora_home):
    directory = jobs.jobs_dir() / "20260101-000000-abcdef"
    directory.mkdir(parents=True)
    (directory / "job.json").write_text(json.dumps({"id": directory.name, "kind": "sweep", "spec": SPEC,
                                                    "status": "running", "pid": 2**22 + 12345, "started": 0}))
    (jobs.jobs_dir() / "garbage").mkdir()
    (jobs.jobs_dir() / "garbage" / "job.json").write_text("{not json")
    [job] = jobs.list_jobs()
    assert job.status == "interrupted" and job.done


def test_cancel_while_the_base_pretrains(lora_home):
    cached_before = set((lora_home / "cache").glob("**/tiny-gpt*"))   # the cache is shared by the session
    job = jobs.start_job("sweep", {"model": "tiny-gpt", "ranks": [2], "alphas": [4.0], "full_ft": False,
                                   "steps": 5, "pretrain_steps": 100_000})
    wait(job, until=lambda j: "pretraining" in str(j.progress.get("message")))
    jobs.cancel_job(jobs.read_job(job.dir))
    job = wait(job)
    assert job.status == "cancelled" and "while pretraining" in job.error
    assert set((lora_home / "cache").glob("**/tiny-gpt*")) == cached_before   # nothing half-trained was cached


def test_a_job_whose_pid_was_reused_is_interrupted_and_cancel_never_signals_it(lora_home, monkeypatch):
    """The worker was SIGKILLed and its pid now belongs to an unrelated process: the job must not read as
    running, and Cancel must not signal that process."""
    import psutil

    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        directory = jobs.jobs_dir() / "20260101-000000-reused"
        directory.mkdir(parents=True)
        started = psutil.Process(stranger.pid).create_time()
        (directory / "job.json").write_text(json.dumps({
            "id": directory.name, "kind": "sweep", "spec": SPEC, "status": "running", "pid": stranger.pid,
            "pid_start_time": started - 1000.0, "started": started - 1000.0}))
        job = jobs.read_job(directory)
        assert job.status == "interrupted"
        signals = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
        # a page still holding the job as it read it while the worker lived
        jobs.cancel_job(dataclasses.replace(job, status="running"))
        assert signals == [] and stranger.poll() is None
    finally:
        monkeypatch.undo()          # Popen.kill goes through os.kill: restore it, or wait() sits out the sleep
        stranger.kill()
        stranger.wait()


def test_cancel_signals_a_live_worker(lora_home, monkeypatch):
    import psutil

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        directory = jobs.jobs_dir() / "20260101-000000-alive0"
        directory.mkdir(parents=True)
        (directory / "job.json").write_text(json.dumps({
            "id": directory.name, "kind": "sweep", "spec": SPEC, "status": "running", "pid": worker.pid,
            "pid_start_time": psutil.Process(worker.pid).create_time(), "started": time.time()}))
        job = jobs.read_job(directory)
        assert job.status == "running"
        signals = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: signals.append((pid, sig)))
        jobs.cancel_job(job)
        assert signals == [(worker.pid, signal.SIGTERM)]
    finally:
        monkeypatch.undo()
        worker.kill()
        worker.wait()


def test_a_job_record_without_its_keys_is_skipped(lora_home):
    directory = jobs.jobs_dir() / "20260101-000000-nokind"
    directory.mkdir(parents=True)
    (directory / "job.json").write_text(json.dumps({"id": directory.name, "status": "running"}))
    with pytest.raises(ValueError, match="kind"):
        jobs.read_job(directory)
    assert jobs.list_jobs() == []


def _job_dir(name: str, spec: dict) -> "os.PathLike":
    directory = jobs.jobs_dir() / name
    directory.mkdir(parents=True)
    (directory / "job.json").write_text(json.dumps({
        "id": name, "kind": "sweep", "spec": spec, "status": "running", "started": time.time(),
        "home": str(jobs.jobs_dir().parent), **jobs.process_identity()}))
    return directory


def test_a_job_without_a_completed_run_is_empty_not_done(lora_home):
    """Issue 14: a sweep whose every run diverged wrote runs but completed none: "empty", with the reason
    in one line, never "completed". The worker's code runs here, in this process, to stay fast."""
    import torch

    before, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    directory = _job_dir("20260101-000000-empty0", SPEC | {"ranks": [2], "full_ft": False, "steps": 2, "lr": 1e6})
    try:
        assert jobs._worker(directory) == 1
    finally:
        signal.signal(signal.SIGTERM, before)
        torch.set_num_threads(threads)
    job = jobs.read_job(directory)
    assert job.status == "empty" and job.done and job.runs_written == 1 and job.runs_completed == 0
    assert job.error.startswith("no run completed (1 written): ") and "diverged at step" in job.error
    assert "\n" not in job.error and job.summary == f"empty: {job.error}"
    assert jobs.active_jobs() == [] and [j.id for j in jobs.recent_jobs()] == [job.id]


def test_running_jobs_are_found_again_with_their_live_progress(lora_home):
    """After a page reload or in a new tab, the running jobs and their progress come from disk."""
    directory = _job_dir("20260101-000000-live00", SPEC)          # "running" in this (live) process
    dead = jobs.jobs_dir() / "20260101-000000-dead00"
    dead.mkdir()
    (dead / "job.json").write_text(json.dumps({"id": dead.name, "kind": "sweep", "spec": SPEC,
                                               "status": "running", "pid": 2**22 + 12345, "started": 0}))
    (directory / "progress.json").write_text(json.dumps({"done": 0.5, "total": 2, "message": "1/2 runs done"}))
    [job] = jobs.active_jobs()
    assert job.id == directory.name and job.progress["done"] == 0.5 and job.summary == "running: 1/2 runs done"
    (directory / "progress.json").write_text(json.dumps({"done": 1.5, "total": 2, "message": "1/2 runs done · x"}))
    assert jobs.active_jobs()[0].progress["done"] == 1.5                       # read afresh on each poll
    assert [j.id for j in jobs.recent_jobs()] == [directory.name]              # the dead one ended long ago
