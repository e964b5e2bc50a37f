"""Background jobs: a sweep runs in another process, reports progress, can be cancelled, and a worker that
died is reported as interrupted. Closing the dashboard changes nothing: everything lives on disk."""

import json
import os
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
    job = wait(job)
    assert job.status == "completed", (job.error, (job.dir / "log.txt").read_text()[-2000:])
    assert len(job.run_ids) == 2
    assert job.progress["final"] and job.progress["done"] == job.progress["total"] == 40
    stored = {r.id: r for r in runstore.list_runs()}
    assert set(job.run_ids) == set(stored) and all(r.status == "completed" for r in stored.values())
    assert [j.id for j in jobs.list_jobs()] == [job.id]


def test_cancel_stops_the_run_and_records_it(lora_home):
    job = jobs.start_job("sweep", SPEC | {"ranks": [1], "full_ft": False, "steps": 100_000})
    wait(job, until=lambda j: j.progress.get("done", 0) > 5)
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
