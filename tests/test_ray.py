"""Sweeps on Ray: one real local Ray (2 CPUs) for the module. Same runs and metrics as the local executor,
runs brought back as bytes without a shared folder, cancel mid-sweep, a killed worker reported while the
rest of the sweep finishes, the CLI and the background-job entry point."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install -r requirements-ray.txt)")

from lora_analysis import runstore  # noqa: E402
from lora_analysis.training.ray_executor import RayExecutor, local_runtime_env  # noqa: E402
from lora_analysis.training.sweep import run_sweep, run_sweep_job, sweep_settings  # noqa: E402
from lora_analysis.training.trainer import TrainConfig  # noqa: E402

COMMON = {"pretrain_steps": 30, "eval_every": 100_000}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, _shared_cache):
    """A local Ray whose workers share the session's cache of pretrained bases (their own home otherwise:
    runs always go to the run store the driver names)."""
    home = tmp_path_factory.mktemp("ray-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    env = {"LORA_ANALYSIS_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=local_runtime_env(env=env))
    yield home
    ray.shutdown()


def _split(events):
    return [e for e in events if "finished" not in e], [e for e in events if "finished" in e]


def test_same_runs_as_local_and_they_travel_back_as_bytes(lora_home, ray_cluster):
    settings = sweep_settings(ranks=[1, 4], alphas=[16], full_ft=True, steps=8, **COMMON)
    local = run_sweep(settings).frame
    events = []
    # "bytes": each worker writes into its own temporary folder and sends the run back as a bundle
    result = run_sweep(settings, executor=RayExecutor(transfer="bytes"), progress=lambda **e: events.append(e))
    remote = result.frame
    assert remote["status"].tolist() == ["completed"] * 3
    assert remote["name"].tolist() == local["name"].tolist()
    for column in ("val_loss", "val_accuracy", "base_val_accuracy", "final_train_loss"):
        assert remote[column].tolist() == pytest.approx(local[column].tolist(), rel=1e-6), column
    assert remote["trainable_params"].tolist() == local["trainable_params"].tolist()
    steps, ends = _split(events)
    assert sorted((e["run_index"], e["finished"]) for e in ends) == [(0, "completed"), (1, "completed"),
                                                                      (2, "completed")]
    assert {(e["run_index"], e["step"]) for e in steps} >= {(0, 8), (1, 8), (2, 8)}   # every last step arrives
    stored = {r.id: r for r in runstore.list_runs()}
    for row in remote.itertuples():
        run = stored[row.run_id]
        assert run.status == "completed" and run.sweep_id == result.sweep_id
        assert run.record["imported_from"] == "run.zip"          # imported here, not written by the worker
        assert run.dir.parent == runstore.runs_root()
    lora = [r for r in result.results if r.config.method == "lora"]
    updates = runstore.load_updates(lora[1].run_id)
    assert sorted(updates) == ["fc1", "fc2", "fc3"]
    local_updates = runstore.load_updates(local["run_id"][1])
    assert float((updates["fc1"].dense_delta() - local_updates["fc1"].dense_delta()).abs().max()) < 1e-5


def test_cancel_drops_pending_trials_and_stops_running_ones(lora_home, ray_cluster):
    """Two CPUs: the short run and the first long run start; when the short one is done the second long
    run takes its CPU and the last short run waits in Ray's queue. Cancel then: the waiting trial never
    starts, both long runs stop at their next step as "cancelled", the finished run is intact."""
    settings = [("short", TrainConfig(rank=1, steps=5, **COMMON)),
                ("long-1", TrainConfig(rank=2, steps=50_000, **COMMON)),
                ("long-2", TrainConfig(rank=4, steps=50_000, **COMMON)),
                ("waiting", TrainConfig(rank=8, steps=5, **COMMON))]
    stop, steps, ends = threading.Event(), {}, []

    def progress(run_index, step=0, finished=None, **_):
        if finished:
            ends.append((run_index, finished))
            return
        steps[run_index] = step
        if ends == [(0, "completed")] and steps.get(1, 0) >= 3 and steps.get(2, 0) >= 3:
            stop.set()

    result = run_sweep(settings, executor=RayExecutor(), progress=progress, cancel=stop)
    assert [r.status for r in result.results] == ["completed", "cancelled", "cancelled", "cancelled"]
    assert result.results[3].run_id is None and result.results[3].error == "cancelled before it started"
    for r in result.results[1:3]:
        assert 3 <= r.metrics["steps_done"] < 50_000 and r.error.startswith("cancelled before step")
    assert sorted(ends) == [(0, "completed"), (1, "cancelled"), (2, "cancelled"), (3, "cancelled")]
    stored = {r.name: r for r in runstore.list_runs()}
    assert {n: r.status for n, r in stored.items()} == {"short": "completed", "long-1": "cancelled",
                                                        "long-2": "cancelled"}
    assert sorted(runstore.load_updates(stored["short"])) == ["fc1", "fc2", "fc3"]


def test_ctrl_c_on_the_driver_stops_the_trials_like_a_cancel(lora_home, ray_cluster):
    """Ctrl-C while the sweep runs (here: raised from the progress hook): the trials in flight stop at
    their next step and their runs, sent back as bytes, are still imported, recorded "cancelled"."""
    settings = [("long-1", TrainConfig(rank=1, steps=50_000, **COMMON)),
                ("long-2", TrainConfig(rank=2, steps=50_000, **COMMON)),
                ("waiting", TrainConfig(rank=4, steps=5, **COMMON))]
    steps = {}

    def progress(run_index, step=0, **_):
        steps[run_index] = step
        if steps.get(0, 0) >= 3 and steps.get(1, 0) >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(settings, executor=RayExecutor(transfer="bytes"), progress=progress)
    stored = {r.name: r for r in runstore.list_runs()}
    assert {n: r.status for n, r in stored.items()} == {"long-1": "cancelled", "long-2": "cancelled"}
    assert all(r.record["imported_from"] == "run.zip" for r in stored.values())


def test_a_killed_worker_is_reported_and_the_rest_finishes(lora_home, ray_cluster):
    settings = [("doomed", TrainConfig(rank=2, steps=50_000, **COMMON)),
                ("a", TrainConfig(rank=1, steps=5, **COMMON)),
                ("b", TrainConfig(method="full", steps=5, **COMMON))]
    killed = []

    def progress(run_index, step=0, run_id=None, finished=None, **_):
        if run_index == 0 and not finished and step >= 3 and not killed:
            # on this machine the folder is shared: the worker wrote the run in place, with its pid
            record = json.loads((runstore.runs_root() / run_id / runstore.RUN_FILE).read_text())
            os.kill(record["pid"], signal.SIGKILL)
            killed.append(record["pid"])

    result = run_sweep(settings, executor=RayExecutor(), progress=progress)
    doomed, a, b = result.results
    assert killed and doomed.status == "interrupted"
    assert f"its Ray worker (pid {killed[0]}" in doomed.error and "died: WorkerCrashedError" in doomed.error
    assert (a.status, b.status) == ("completed", "completed")
    stored = {r.name: r for r in runstore.list_runs()}
    assert stored["doomed"].status == "interrupted" and stored["doomed"].error == doomed.error
    assert stored["doomed"].id == doomed.run_id and len(stored["doomed"].metrics_frame()) < 50_000
    assert "imported_from" not in stored["a"].record          # written in place by the worker
    assert sorted(runstore.load_updates(stored["a"])) == ["fc1", "fc2", "fc3"]


def test_cli_sweep_on_ray_writes_runs_the_spectra_cli_reads(lora_home, ray_cluster, tmp_path, capsys):
    from lora_analysis.cli import main

    out = tmp_path / "out"
    assert main(["sweep", "--model", "mlp-digits", "--ranks", "1,4", "--full-ft", "--steps", "5",
                 "--pretrain-steps", "30", "--executor", "ray", "--out", str(out), "-q", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["completed"] * 3
    adapters = sorted(out.glob("*/adapter"))
    assert len(adapters) == 2 and {r["run_id"] for r in rows} == {p.name for p in out.iterdir() if p.is_dir()}
    assert main(["spectra", str(adapters[0]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)


def test_job_entry_point_on_ray(lora_home, ray_cluster):
    reports = []
    ids = run_sweep_job({"model": "mlp-digits", "ranks": [2], "alphas": [4], "full_ft": True, "steps": 5,
                         **COMMON, "executor": {"kind": "ray", "workers": 1}},
                        progress=lambda **p: reports.append(p), home=lora_home)
    assert len(ids) == 2 and {r.id for r in runstore.list_runs()} == set(ids)
    assert reports[-1]["final"] and reports[-1]["message"] == "2 runs written"
    running = [r for r in reports if r["running"]]
    assert running and running[0]["message"].startswith("Ray: 0/2 runs done · LoRA r=2 α=4 step ")
    assert all(len(r["running"]) <= 1 for r in reports)           # workers=1: one trial in flight


def test_a_lost_trial_whose_run_never_reached_this_store_is_recorded_here(lora_home):
    """Runs travelling as bytes: a worker that dies takes its run folder with it; the driver records the
    run (its settings, the reason) so the run store shows what happened. No Ray needed for this part."""
    from lora_analysis.training.sweep import SweepJob, _unwritten

    job = SweepJob(TrainConfig(rank=2, steps=5), "LoRA r=2", "sweep-x", str(runstore.runs_root()))
    result = RayExecutor._lost(job, [], "interrupted", "its Ray worker died: NodeDiedError: node lost", _unwritten)
    [run] = runstore.list_runs()
    assert (run.id, run.status, run.name, run.sweep_id) == (result.run_id, "interrupted", "LoRA r=2", "sweep-x")
    assert run.error == result.error == "its Ray worker died: NodeDiedError: node lost"
    assert run.config["rank"] == 2
    # cancelled before it started: nothing is written
    assert RayExecutor._lost(job, [], "cancelled", "cancelled before it started", _unwritten).run_id is None
    assert len(runstore.list_runs()) == 1
