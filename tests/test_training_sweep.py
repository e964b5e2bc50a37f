"""Sweeps: one run per setting, shared base and split, executor interface, job entry point, cancel."""

from __future__ import annotations

import threading

import pytest

from lora_analysis import runstore
from lora_analysis.training.sweep import (LocalExecutor, ProcessExecutor, run_sweep, run_sweep_job,
                                          sweep_frame, sweep_settings)
from lora_analysis.training.trainer import TrainConfig


def test_settings_cover_the_grid_plus_full_ft():
    s = sweep_settings(ranks=[1, 4], alphas=["r", "2r", 16], rslora=[False, True],
                       targets=["fc1,fc2", "all-linear"], full_ft=True, steps=5)
    assert len(s) == 2 * 3 * 2 * 2 + 1
    labels = [label for label, _ in s]
    assert len(set(labels)) == len(labels)
    by_label = dict(s)
    cfg = by_label["LoRA r=4 α=8 α/√r fc1,fc2"]
    assert (cfg.rank, cfg.alpha, cfg.rslora, cfg.targets, cfg.steps) == (4, 8.0, True, ["fc1", "fc2"], 5)
    assert by_label["full FT"].method == "full"
    with pytest.raises(ValueError, match="alpha='x' is not allowed"):
        sweep_settings(ranks=[1], alphas=["x"])
    with pytest.raises(ValueError, match=r"ranks=\[0\] is not allowed.*rank=0"):
        sweep_settings(ranks=[0])
    with pytest.raises(ValueError, match="lr=-1"):
        sweep_settings(ranks=[1], lr=-1.0)
    with pytest.raises(ValueError, match="empty"):
        sweep_settings(ranks=[], full_ft=False)


def test_sweep_writes_one_run_per_setting_on_one_base(lora_home):
    settings = sweep_settings(ranks=[1, 4, 16], alphas=[16], full_ft=True, steps=40, eval_every=20)
    seen = []
    result = run_sweep(settings, progress=lambda **p: seen.append((p["run_index"], p["step"])))
    frame = result.frame
    assert len(frame) == 4 and (frame["status"] == "completed").all()
    assert frame["name"].tolist() == ["LoRA r=1 α=16", "LoRA r=4 α=16", "LoRA r=16 α=16", "full FT"]
    # one base for all: the same frozen-base accuracy in every run
    assert frame["base_val_accuracy"].nunique() == 1
    assert frame["trainable_params"].is_monotonic_increasing
    assert len(seen) == 4 * 40 and seen[-1] == (3, 40)
    stored = sweep_frame(result.sweep_id)
    assert sorted(stored["id"]) == sorted(frame["run_id"]) and set(stored["sweep_id"]) == {result.sweep_id}
    assert sorted(stored["name"]) == sorted(frame["name"])


def test_cancel_stops_the_sweep_and_skips_the_rest(lora_home):
    stop = threading.Event()
    settings = sweep_settings(ranks=[1, 2, 4], alphas=[4], full_ft=True, steps=30)

    def progress(run_index, step, **_):
        if run_index == 1 and step == 5:
            stop.set()

    result = run_sweep(settings, progress=progress, cancel=stop)
    assert [r.status for r in result.results] == ["completed", "cancelled", "cancelled", "cancelled"]
    assert result.results[2].run_id is None          # never started: nothing written
    assert len(runstore.list_runs()) == 2


def test_failed_run_does_not_stop_the_sweep(lora_home):
    settings = [("diverges", TrainConfig(method="full", lr=1e12, grad_clip=None, steps=30)),
                ("fine", TrainConfig(rank=2, steps=10))]
    result = run_sweep(settings, executor=LocalExecutor())
    assert [r.status for r in result.results] == ["failed", "completed"]
    assert "lower the learning rate" in result.results[0].error


def test_job_entry_point_reports_done_and_total(lora_home):
    reports = []
    ids = run_sweep_job({"model": "mlp-digits", "ranks": [2, 8], "alphas": [16], "full_ft": True, "steps": 10},
                        progress=lambda **p: reports.append(p), home=lora_home)
    assert len(ids) == 3 and {r.id for r in runstore.list_runs()} == set(ids)
    assert all(r["total"] == 30 for r in reports)
    assert [r["done"] for r in reports if not r["final"]] == list(range(1, 31))
    assert reports[-1]["final"] and reports[-1]["message"] == "3 runs written"
    assert "run 2/3 · LoRA r=8 α=16 · step 1/10" in reports[10]["message"]


def test_settings_must_share_model_and_data(lora_home):
    with pytest.raises(ValueError, match="must share the model and data"):
        run_sweep([("a", TrainConfig(model="mlp-digits")), ("b", TrainConfig(model="tiny-gpt"))])


def test_process_executor_runs_jobs_in_other_processes(lora_home):
    settings = sweep_settings(ranks=[2], alphas=[4], full_ft=True, steps=5)
    local = run_sweep(settings, executor=LocalExecutor()).frame
    seen = []
    pooled = run_sweep(settings, executor=ProcessExecutor(max_workers=2),
                       progress=lambda **p: seen.append((p["run_index"], p["step"], p["total"], p["label"]))).frame
    assert (pooled["status"] == "completed").all()
    # the workers' progress reaches this process: at least each run's last step, with its label
    assert {(0, 5, 5, "LoRA r=2 α=4"), (1, 5, 5, "full FT")} <= set(seen)
    # same seed, same base from the cache: the same numbers in another process
    assert pooled["val_loss"].tolist() == pytest.approx(local["val_loss"].tolist(), rel=1e-6)
    assert pooled["run_id"].nunique() == 2 and set(pooled["run_id"]).isdisjoint(local["run_id"])


def test_sweep_refuses_a_missing_model_folder_before_any_run(lora_home, tmp_path):
    with pytest.raises(ValueError, match="model folder .*nowhere' does not exist"):
        sweep_settings(model=str(tmp_path / "nowhere"), ranks=[1])
    with pytest.raises(ValueError, match="Did you mean 'mlp-digits'"):
        sweep_settings(model="mlp_digits", ranks=[1])


def test_cancel_reaches_the_runs_in_worker_processes(lora_home):
    """Defect 4: cancel set in this process stops the run in the worker process and skips the rest; the
    run that completed before is intact. One worker, so the runs go in order; the long run is long
    enough that it is still going when the cancel arrives."""
    stop = threading.Event()
    common = dict(pretrain_steps=30, eval_every=100_000)
    settings = [("short", TrainConfig(rank=1, steps=5, **common)),
                ("long", TrainConfig(rank=2, steps=50_000, **common)),
                ("skipped", TrainConfig(rank=4, steps=5, **common)),
                ("full", TrainConfig(method="full", steps=5, **common))]

    def progress(run_index, step, total, **_):
        if run_index == 0 and step == total:
            stop.set()

    result = run_sweep(settings, executor=ProcessExecutor(max_workers=1), progress=progress, cancel=stop)
    assert [r.status for r in result.results] == ["completed", "cancelled", "cancelled", "cancelled"]
    assert result.results[1].metrics.get("steps_done", 0) < 50_000
    stored = {r.name: r for r in runstore.list_runs()}
    assert set(stored) <= {"short", "long"} and stored["short"].status == "completed"
    assert "long" not in stored or stored["long"].status == "cancelled"
    assert sorted(runstore.load_updates(stored["short"])) == ["fc1", "fc2", "fc3"]
