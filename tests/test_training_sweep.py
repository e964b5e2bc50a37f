"""Sweeps: one run per setting, shared base and split, executors, job entry point, cancel. (Ray: test_ray.py.)"""

from __future__ import annotations

import threading

import pytest

from lora_analysis import runstore
from lora_analysis.training.sweep import (LocalExecutor, SweepProgress, executor_from_spec, make_executor, run_sweep,
                                          run_sweep_job, sweep_frame, sweep_settings)
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
    seen, ends = [], []
    result = run_sweep(settings, progress=lambda **p: (ends if "finished" in p else seen).append(
        (p["run_index"], p["step"], p.get("finished"))))
    frame = result.frame
    assert len(frame) == 4 and (frame["status"] == "completed").all()
    assert frame["name"].tolist() == ["LoRA r=1 α=16", "LoRA r=4 α=16", "LoRA r=16 α=16", "full FT"]
    # one base for all: the same frozen-base accuracy in every run
    assert frame["base_val_accuracy"].nunique() == 1
    assert frame["trainable_params"].is_monotonic_increasing
    assert len(seen) == 4 * 40 and seen[-1] == (3, 40, None)
    assert ends == [(i, 40, "completed") for i in range(4)]     # one "finished" event per run
    stored = sweep_frame(result.sweep_id)
    assert sorted(stored["id"]) == sorted(frame["run_id"]) and set(stored["sweep_id"]) == {result.sweep_id}
    assert sorted(stored["name"]) == sorted(frame["name"])


def test_cancel_stops_the_sweep_and_skips_the_rest(lora_home):
    stop = threading.Event()
    settings = sweep_settings(ranks=[1, 2, 4], alphas=[4], full_ft=True, steps=30)

    def progress(run_index, step, **_):
        if run_index == 1 and step == 5:
            stop.set()

    ends = []

    def watch(**p):
        if "finished" in p:
            ends.append((p["run_index"], p["finished"]))
        else:
            progress(**p)

    result = run_sweep(settings, progress=watch, cancel=stop)
    assert [r.status for r in result.results] == ["completed", "cancelled", "cancelled", "cancelled"]
    assert ends == [(0, "completed"), (1, "cancelled"), (2, "cancelled"), (3, "cancelled")]
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
    assert all(r["total"] == 3 for r in reports)
    # one bar for the sweep: runs done, a run in progress counting by its share of steps
    done = [r["done"] for r in reports if not r["final"]]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 3
    runs_done = [r["runs_done"] for r in reports if not r["final"]]
    assert runs_done == sorted(runs_done) and set(runs_done) == {0, 1, 2, 3}
    assert all(r["runs_done"] <= r["done"] < r["runs_done"] + 1 + 1e-9 for r in reports)
    assert reports[-1]["final"] and reports[-1]["message"] == "3 runs written"
    second = next(r for r in reports if r["running"] and r["running"][0]["run"] == "LoRA r=8 α=16")
    assert second["message"].startswith("1/3 runs done · LoRA r=8 α=16 step 1/10 loss ")
    assert second["running"][0]["step"] == 1 and second["running"][0]["total"] == 10


def test_settings_must_share_model_and_data(lora_home):
    with pytest.raises(ValueError, match="must share the model and data"):
        run_sweep([("a", TrainConfig(model="mlp-digits")), ("b", TrainConfig(model="tiny-gpt"))])


def test_sweep_refuses_a_missing_model_folder_before_any_run(lora_home, tmp_path):
    with pytest.raises(ValueError, match="model folder .*nowhere' does not exist"):
        sweep_settings(model=str(tmp_path / "nowhere"), ranks=[1])
    with pytest.raises(ValueError, match="Did you mean 'mlp-digits'"):
        sweep_settings(model="mlp_digits", ranks=[1])


def test_two_executors_and_options_only_where_they_mean_something():
    assert isinstance(make_executor(), LocalExecutor) and isinstance(executor_from_spec(None), LocalExecutor)
    with pytest.raises(ValueError, match=r"executor='process' is not known: choose one of local, ray"):
        make_executor("process")
    # the local executor runs one run at a time: asking for more is refused, not ignored
    with pytest.raises(ValueError, match=r"workers=2 needs executor='ray'"):
        make_executor("local", workers=2)
    with pytest.raises(ValueError, match=r"ray_address='auto', retries=1 needs executor='ray'"):
        make_executor("local", address="auto", retries=1)
    with pytest.raises(ValueError, match=r"workers=-1 is not allowed"):
        make_executor("ray", workers=-1)
    with pytest.raises(ValueError, match=r"executor setting 'nodes' is not known"):
        executor_from_spec({"kind": "ray", "nodes": 3})


def test_sweep_cli_refuses_workers_without_ray(lora_home, capsys):
    from lora_analysis.cli import main
    assert main(["sweep", "--ranks", "1", "--workers", "2", "--steps", "2"]) == 2
    assert "workers=2 needs executor='ray' (--executor ray)" in capsys.readouterr().err
    assert runstore.list_runs() == []


def test_sweep_progress_counts_runs_done_and_shows_the_runs_in_progress():
    state = SweepProgress(3)
    state(run_index=0, step=5, total=10, loss=0.5, label="a")
    state(run_index=1, step=2, total=4, loss=1.25, label="b")
    assert state.fraction == pytest.approx((0.5 + 0.5) / 3) and state.done == 0
    assert state.summary() == "0/3 runs done · a step 5/10 loss 0.5000 · b step 2/4 loss 1.2500"
    state(run_index=0, step=7, total=10, loss=0.4, label="a", finished="cancelled")
    state(run_index=0, step=8, total=10, loss=0.3, label="a")        # a late event of a finished run
    assert state.done == 1 and state.fraction == pytest.approx((1 + 0.5) / 3)
    assert state.summary() == "1/3 runs done, 1 cancelled · b step 2/4 loss 1.2500"


def test_ray_executor_without_ray_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)       # as if Ray were not installed: the base install
    with pytest.raises(ValueError, match=r"executor 'ray' needs Ray, which is not installed: "
                                         r"pip install -r requirements-ray.txt"):
        make_executor("ray")
    with pytest.raises(ValueError, match="needs Ray"):
        executor_from_spec({"kind": "ray", "address": "auto"})


def test_a_sweep_applies_the_trainers_divergence_rule(lora_home):
    """Issue 13: at lr 1e6 the losses stay finite (1e17) yet the runs diverged: a sweep marks them failed as
    train does, with the same one-line message; lr 1e38 is refused before any run starts."""
    result = run_sweep(sweep_settings(ranks=[2], alphas=[16], full_ft=True, steps=3, eval_every=3, lr=1e6))
    assert [r.status for r in result.results] == ["failed", "failed"]
    for r in result.results:
        assert r.error.startswith("diverged at step ") and r.error.endswith("lower the learning rate (lr=1e+06)")
        assert runstore.load_run(r.run_id).status == "failed"
    with pytest.raises(ValueError, match=r"lr=1e\+38 is not allowed"):
        sweep_settings(ranks=[2], lr=1e38)


def test_pretraining_message_gives_step_loss_and_time_left():
    from lora_analysis.training.sweep import pretrain_message

    assert pretrain_message("tiny-gpt", 2, 100, 3.2, 1.0).endswith("step 2/100 · loss 3.2000")   # too early to tell
    assert pretrain_message("tiny-gpt", 10, 200, 3.2, 1.5).endswith("step 10/200 · loss 3.2000 · about 28 s left")
    assert pretrain_message("tiny-gpt", 10, 2000, 3.2, 20.0).endswith("about 1 h 6 min left")
