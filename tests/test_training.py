"""The trainer: LoRA and full fine-tuning on the built-in models, determinism, hooks, failures, validation."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from lora_analysis import runstore
from lora_analysis.lora import lora_layers
from lora_analysis.training import TrainConfig, prepare_task, train
from lora_analysis.training.trainer import adaptable_modules

GPT = dict(model="tiny-gpt", pretrain_steps=20, seq_len=32, batch_size=16, max_eval_tokens=1024)


@pytest.fixture
def digits(lora_home):
    return prepare_task("mlp-digits")


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
    task = prepare_task("tiny-gpt", pretrain_steps=20, seq_len=32)
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
    assert result.error.startswith("loss became NaN at step ") or result.error.startswith("loss became inf at step ")
    assert "lower the learning rate" in result.error
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
    task = prepare_task("tiny-gpt", pretrain_steps=2, seq_len=16)
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
