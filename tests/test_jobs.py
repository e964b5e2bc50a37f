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
