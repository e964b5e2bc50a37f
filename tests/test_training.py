"""The trainer: LoRA and full fine-tuning on the built-in models, determinism, hooks, failures, validation."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from lora_analysis import runstore
from lora_analysis.lora import lora_layers
from lora_analysis.training import TrainConfig, train
from lora_analysis.training.trainer import adaptable_modules, task_for

GPT = dict(model="tiny-gpt", pretrain_steps=20, seq_len=32, batch_size=16, max_eval_tokens=1024)


@pytest.fixture
def digits(lora_home):
    return task_for(TrainConfig(model="mlp-digits"))     # task_for: pretrained on the thread rule's one thread


def test_lora_on_mlp_digits_learns_and_leaves_the_base_bit_identical(digits, lora_home):
    base = digits.build_model().state_dict()
    result = train(TrainConfig(model="mlp-digits", rank=4, alpha=16, steps=120, eval_every=40), task=digits)
    assert result.status == "completed" and result.error is None
    m = result.metrics
    # the frozen base is near chance on rotated digits; rank-4 LoRA recovers most of it
    assert m["base_val_accuracy"] < 0.3
    assert m["val_accuracy"] > 0.75
    losses = result.history["train_loss"].dropna()
    assert losses.tail(10).mean() < 0.5 * losses.head(10).mean()
    for name, layer in lora_layers(result.model).items():
        assert torch.equal(layer.base_layer.weight, base[f"{name}.weight"])
        assert torch.equal(layer.base_layer.bias, base[f"{name}.bias"])
    # trainable = r·(in + out) per module, fc3 (256→10) included
    assert m["trainable_params"] == 4 * (64 + 128) + 4 * (128 + 256) + 4 * (256 + 10)
    run = runstore.load_run(result.run_id)
    assert run.status == "completed" and run.config["lr"] == 1e-2 and run.config["alpha"] == 16
    assert (run.dir / "adapter" / "adapter_config.json").is_file()


def test_full_finetuning_changes_the_weights_and_keeps_w0(digits, lora_home):
    base = digits.build_model().state_dict()
    result = train(TrainConfig(model="mlp-digits", method="full", steps=60), task=digits)
    assert result.status == "completed"
    assert result.metrics["trainable_params"] == result.metrics["total_params"] == 64 * 128 + 128 + 128 * 256 + 256 + 256 * 10 + 10
    changed = [n for n, p in result.model.state_dict().items() if not torch.equal(p, base[n])]
    assert sorted(changed) == sorted(base)
    updates = runstore.load_updates(result.run_id)
    assert sorted(updates) == ["fc1", "fc2", "fc3"]
    u = updates["fc2"]
    assert u.kind == "full" and u.shape == (256, 128)
    assert torch.equal(u.w0, base["fc2.weight"])
    assert torch.equal(u.w_ft, result.model.fc2.weight.detach())
    # LoRA's memory is smaller: far fewer gradients and optimizer states
    lora = train(TrainConfig(model="mlp-digits", rank=2, steps=5), task=digits, save=False)
    assert lora.metrics["optimizer_bytes"] * 10 < result.metrics["optimizer_bytes"]
    assert result.metrics["optimizer_bytes"] == 2 * 4 * result.metrics["trainable_params"]   # exp_avg + exp_avg_sq


def test_lora_run_hands_factors_and_w0_to_the_analyses(digits, lora_home):
    result = train(TrainConfig(model="mlp-digits", rank=32, alpha=16, steps=10), task=digits)
    updates = runstore.load_updates(result.run_id)
    layers = lora_layers(result.model)
    assert sorted(updates) == sorted(layers)
    # fc3 has only 10 outputs: its rank is capped at 10, the others keep 32
    assert updates["fc3"].rank == 10 and updates["fc1"].rank == 32
    for name, u in updates.items():
        assert u.kind == "lora"
        assert torch.equal(u.w0, layers[name].base_layer.weight)
        torch.testing.assert_close(u.dense_delta(), layers[name].delta_weight(), rtol=0, atol=0)
    # ...at the sweep's scaling α/r = 16/32 (its alpha becomes 5), saved so that PEFT and we read it back
    assert updates["fc3"].scaling == pytest.approx(16 / 32)


def test_same_seed_gives_identical_losses_and_other_seed_differs(digits, lora_home):
    cfg = TrainConfig(model="mlp-digits", rank=4, dropout=0.1, steps=25, eval_every=25)
    a = train(cfg, task=digits, save=False)
    b = train(cfg, task=digits, save=False)
    c = train(TrainConfig(**{**cfg.to_dict(), "seed": 1}), task=digits, save=False)
    assert a.history["train_loss"].tolist()[1:] == b.history["train_loss"].tolist()[1:]
    assert a.metrics["val_loss"] == b.metrics["val_loss"]
    assert a.history["train_loss"].tolist()[1:] != c.history["train_loss"].tolist()[1:]


def test_tiny_gpt_lora_and_full_ft_lower_the_loss(lora_home):
    task = task_for(TrainConfig(**GPT))
    assert task.kind == "causal-lm" and task.data.seq_len == 32
    for method, lr, targets in (("lora", 1e-2, "all-linear"), ("full", None, None)):
        result = train(TrainConfig(**GPT, method=method, lr=lr, targets=targets, rank=4, steps=30, eval_every=10),
                       task=task)
        assert result.status == "completed", result.error
        m = result.metrics
        assert m["val_loss"] < m["base_val_loss"]
        assert m["val_perplexity"] == pytest.approx(torch.tensor(m["val_loss"]).exp().item(), rel=1e-6)
        assert m["tokens_per_s"] > 0
    names = sorted(lora_layers(train(TrainConfig(**GPT, steps=1), task=task, save=False).model))
    assert names == [f"blocks.{i}.attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]


def test_progress_and_cancel_hooks(digits, lora_home):
    seen, stop = [], threading.Event()

    def progress(step, total, loss, run_id, metrics):
        seen.append((step, total, loss, run_id))
        if step == 7:
            stop.set()

    result = train(TrainConfig(model="mlp-digits", steps=50), task=digits, progress=progress, cancel=stop)
    assert result.status == "cancelled" and "before step 8" in result.error
    assert [s[0] for s in seen] == list(range(1, 8)) and all(s[1] == 50 for s in seen)
    assert seen[0][3] == result.run_id
    assert runstore.load_run(result.run_id).status == "cancelled"
    # a plain callable works too
    calls = iter([False, False, True])
    assert train(TrainConfig(model="mlp-digits", steps=50), task=digits, save=False,
                 cancel=lambda: next(calls)).metrics["steps_done"] == 2


def test_nan_loss_fails_the_run_with_a_clear_message(digits, lora_home):
    result = train(TrainConfig(model="mlp-digits", method="full", lr=1e12, steps=100, grad_clip=None), task=digits)
    assert result.status == "failed"
    assert result.error.startswith("diverged at step ") and "lower the learning rate (lr=1e+12)" in result.error
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == result.error
    assert not (result.run_dir / "full_weights.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    ({"lr": 0.0}, "lr=0.0 is not allowed"), ({"lr": -1e-3}, "lr=-0.001 is not allowed"),
    ({"lr": float("nan")}, "lr=nan"), ({"steps": 0}, "steps=0 is not allowed"),
    ({"steps": -3}, "steps=-3"), ({"batch_size": 0}, "batch_size=0"), ({"method": "qlora"}, "method='qlora'"),
    ({"rank": 0}, "rank=0"), ({"alpha": -2.0}, "alpha=-2.0"), ({"dropout": 1.0}, "dropout=1.0"),
    ({"init": "xavier"}, "init='xavier'"), ({"device": "tpu"}, "device='tpu'"), ({"seed": -1}, "seed=-1"),
])
def test_bad_settings_raise_before_anything_is_written(lora_home, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        train(TrainConfig(model="mlp-digits", **change))
    assert not (lora_home / "runs").exists() or not list((lora_home / "runs").iterdir())


def test_unknown_model_lists_the_known_ones(lora_home):
    with pytest.raises(ValueError, match=r"mlp-digits, tiny-gpt.*Did you mean 'tiny-gpt'"):
        train(TrainConfig(model="tiny_gpt"))
    with pytest.raises(ValueError, match="built-in models are mlp-digits, tiny-gpt"):
        train(TrainConfig(model="not a model!"))


def test_unknown_target_and_bf16_on_cpu(digits, lora_home):
    with pytest.raises(ValueError, match="matched no Linear/Conv1D module. Modules that exist: fc1, fc2, fc3"):
        train(TrainConfig(model="mlp-digits", targets=["q_proj"]), task=digits)
    with pytest.raises(ValueError, match="bf16=True needs a CUDA device"):
        train(TrainConfig(model="mlp-digits", bf16=True, device="cpu"), task=digits)


def test_adaptable_modules_leave_out_the_lm_head(lora_home):
    task = task_for(TrainConfig(model="tiny-gpt", pretrain_steps=2, seq_len=16))
    names = adaptable_modules(task.build_model())
    assert "lm_head" not in names and len(names) == 3 * 6


def test_capped_module_keeps_the_sweeps_scaling(lora_home):
    """fc3 (10 outputs) cannot take rank 32: it trains at rank 10 with the same α/r as the rest."""
    from lora_analysis.lora import lora_layers

    for rslora in (False, True):
        result = train(TrainConfig(model="mlp-digits", rank=32, alpha=16, rslora=rslora, steps=1, pretrain_steps=30))
        layers = lora_layers(result.model)
        assert layers["fc3"].rank == 10 and layers["fc1"].rank == 32
        assert layers["fc3"].scaling == pytest.approx(layers["fc1"].scaling)
        # the run records the rank and alpha each module actually got
        task = runstore.load_run(result.run_id).task
        assert task["ranks"] == {"fc1": 32, "fc2": 32, "fc3": 10}
        assert task["alphas"]["fc1"] == 16 and task["alphas"]["fc3"] == pytest.approx(16 * (10 / 32 if not rslora
                                                                                           else (10 / 32) ** 0.5))


def test_three_threads_reproduce_the_sequential_losses(digits, lora_home):
    """Defect 6: each run draws LoRA's init and dropout from its own generator, so runs in threads of one
    process give exactly the losses of the same run alone. The threads take each step in lockstep, so
    their draws interleave (with one global RNG they would draw each other's numbers)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = TrainConfig(model="mlp-digits", rank=4, dropout=0.3, steps=12, eval_every=12)
        sequential = train(cfg, task=digits, save=False).history["train_loss"].tolist()[1:]
        barrier = threading.Barrier(3)
        losses: dict[int, list[float]] = {}

        def run(i: int) -> None:
            result = train(cfg, task=digits, save=False, progress=lambda **_: barrier.wait(timeout=120))
            losses[i] = result.history["train_loss"].tolist()[1:]

        workers = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        torch.set_num_threads(threads_before)
    assert len(sequential) == 12
    assert losses == {0: sequential, 1: sequential, 2: sequential}


@pytest.mark.parametrize("lr, steps", [(1e6, 1), (1e6, 4), (1e30, 1)])
def test_one_divergence_rule_fails_the_run(digits, lora_home, lr, steps):
    """A loss far above the frozen base's (lr 1e6: 1e17, finite) or NaN (lr 1e30) fails the run, whether it
    shows in a training step or in the validation after the last step, and no weights are saved."""
    result = train(TrainConfig(model="mlp-digits", lr=lr, steps=steps, eval_every=steps), task=digits)
    assert result.status == "failed", result.metrics
    assert result.error.startswith("diverged at step ")
    assert result.error.endswith(f"lower the learning rate (lr={lr:g})")
    assert "\n" not in result.error
    run = runstore.load_run(result.run_id)
    assert run.status == "failed" and run.error == result.error
    assert not (run.dir / "adapter").exists()


def test_a_learning_rate_that_overflows_the_first_step_is_refused(lora_home):
    with pytest.raises(ValueError, match=r"lr=1e\+38 is not allowed: lr must be at most 3e\+37"):
        train(TrainConfig(model="mlp-digits", lr=1e38, steps=1))
    assert not (lora_home / "runs").exists() or not list((lora_home / "runs").iterdir())


def test_runs_are_bit_identical_and_record_what_they_depend_on(digits, lora_home):
    """Issue 15: a built-in trains on one thread with deterministic algorithms (for the run only), and the
    run records versions, threads, torch's build and the device."""
    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cfg = TrainConfig(model="mlp-digits", rank=4, dropout=0.1, steps=12, eval_every=6)
    a, b = train(cfg, task=digits), train(cfg, task=digits)
    assert a.metrics["val_loss"] == b.metrics["val_loss"] and a.metrics["val_accuracy"] == b.metrics["val_accuracy"]
    cols = [c for c in a.history if c != "elapsed_s"]
    assert a.history[cols].equals(b.history[cols])
    assert torch.get_num_threads() == threads_before and torch.are_deterministic_algorithms_enabled() == det_before
    env = runstore.load_run(a.run_id).environment
    assert env["threads"] == 1 and env["deterministic"] is True and env["device"] == "cpu"
    assert env["torch"] == torch.__version__ and env["numpy"] and env["python"]
    assert env["torch_build"]["blas"] and "cpu_capability" in env["torch_build"] and env["cpu"]
    # the threads setting overrides the rule, and is recorded
    c = train(TrainConfig(**{**cfg.to_dict(), "steps": 1, "threads": 2}), task=digits)
    assert runstore.load_run(c.run_id).environment["threads"] == 2
    assert torch.get_num_threads() == threads_before


def test_evaluate_merges_the_source_task_metrics_into_every_evaluation(digits, lora_home):
    """Contract 1: ``task.source_metrics(model, device)`` is measured at every evaluation (step 0 too), and
    the run store keeps the extra columns and final values."""
    import dataclasses

    calls = []

    def measure(model, device):
        calls.append(model.training)
        return {"source_loss": 1.5 + len(calls), "accuracy": 0.25}      # a key without the prefix gets it

    task = dataclasses.replace(digits, source_metrics=measure)
    result = train(TrainConfig(model="mlp-digits", rank=2, steps=4, eval_every=2), task=task)
    assert calls == [False, False, False]           # steps 0, 2, 4, in eval mode
    frame = runstore.load_run(result.run_id).metrics_frame()
    assert frame.set_index("step")["source_loss"].dropna().to_dict() == {0: 2.5, 2: 3.5, 4: 4.5}
    assert (frame.set_index("step")["source_accuracy"].dropna() == 0.25).all()
    m = runstore.load_run(result.run_id).metrics
    assert m["base_source_loss"] == 2.5 and m["source_loss"] == 4.5 and m["source_accuracy"] == 0.25


def test_the_run_folder_is_claimed_before_the_base_is_prepared(lora_home, monkeypatch):
    """A process killed while the base loads leaves an "interrupted" run, not an empty folder: run.json
    exists (status running) before the task is prepared. A refused setting found then leaves nothing."""
    from lora_analysis.training import trainer

    seen = {}

    def slow_task(config, progress=None):
        [run_dir] = list((lora_home / "runs").iterdir())
        seen["record"] = json.loads((run_dir / "run.json").read_text())
        raise ValueError("no such data")

    monkeypatch.setattr(trainer, "task_for", slow_task)
    with pytest.raises(ValueError, match="no such data"):
        train(TrainConfig(model="mlp-digits", steps=3))
    assert seen["record"]["status"] == "running" and seen["record"]["pid"] is not None
    runs = lora_home / "runs"
    assert not runs.exists() or not [d for d in runs.iterdir() if not d.name.startswith(".")]


def test_the_thread_rule_and_its_scope():
    from lora_analysis.training.runtime import SMALL_MODEL_PARAMS, threads_for, threads_scope

    assert threads_for("mlp-digits") == threads_for("tiny-gpt") == 1
    assert threads_for("minilm") is None and threads_for("some/model", n_params=SMALL_MODEL_PARAMS) is None
    assert threads_for("some/model", n_params=SMALL_MODEL_PARAMS - 1) == 1
    assert threads_for("mlp-digits", requested=3) == 3 and threads_for("mlp-digits", requested=0) == 1
    before = torch.get_num_threads()
    with threads_scope("some/model", requested=2) as outer:
        assert outer == torch.get_num_threads() == 2
        with threads_scope("tiny-gpt") as inner:
            assert inner == 1
        with threads_scope("minilm") as untouched:      # the rule leaves a large model's count alone
            assert untouched == torch.get_num_threads()
    assert torch.get_num_threads() == before


def test_task_for_passes_every_data_setting_on(monkeypatch):
    """The ``task`` setting (classification / causal-lm) reaches prepare_task (it was validated, then dropped)."""
    from lora_analysis.training import trainer

    seen = {}
    monkeypatch.setattr(trainer, "prepare_task", lambda model, data, **kw: seen.update(kw, model=model, data=data))
    trainer.task_for(TrainConfig(model="mlp-digits", task="classification", seq_len=8, pretrain_steps=3))
    assert seen["task"] == "classification" and seen["seq_len"] == 8 and seen["pretrain_steps"] == 3
