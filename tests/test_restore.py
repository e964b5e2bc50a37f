"""Restoring a run's trained model reproduces the metrics the trainer recorded (LoRA and full FT)."""

import pytest

from lora_analysis import runstore
from lora_analysis.lora import lora_layers
from lora_analysis.training import TrainConfig, train
from lora_analysis.training.restore import restore_run


@pytest.mark.parametrize("method", ["lora", "full"])
def test_restored_model_gives_the_recorded_metric(lora_home, method):
    result = train(TrainConfig(model="mlp-digits", method=method, rank=4, alpha=8, steps=40, pretrain_steps=60))
    run = runstore.load_run(result.run_id)
    restored = restore_run(run)
    assert bool(lora_layers(restored.model)) == (method == "lora")
    metric = restored.metric(restored.model)
    assert metric["val_accuracy"] == pytest.approx(run.metrics["val_accuracy"], abs=1e-6)
    assert metric["val_loss"] == pytest.approx(run.metrics["val_loss"], rel=1e-5)
    base = restored.metric(restored.base_model())
    assert base["val_accuracy"] == pytest.approx(run.metrics["base_val_accuracy"], abs=1e-6)
    assert restored.held_out_inputs(16).shape == (16, 64)


def test_full_run_without_whole_model_cannot_be_restored(lora_home):
    result = train(TrainConfig(model="mlp-digits", method="full", steps=5, pretrain_steps=60))
    (result.run_dir / runstore.FULL_MODEL).unlink()
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        restore_run(runstore.load_run(result.run_id))


@pytest.mark.parametrize("model", ["mlp-digits", "tiny-gpt"])
def test_merged_equals_unmerged_on_every_built_in_model(lora_home, model):
    """float32: merged, merge-then-unmerge and merge_and_unload give the unmerged outputs to within 1e-5
    relative to the outputs' size (the logits reach tens, where float32 itself resolves ~1e-6)."""
    from lora_analysis.analysis.merge_check import merge_check

    from lora_analysis.training.runtime import threads_scope

    result = train(TrainConfig(model=model, rank=4, alpha=16, steps=15, pretrain_steps=30))
    with threads_scope(model):          # the thread rule for small models, as train() applies it
        restored = restore_run(runstore.load_run(result.run_id))
        check = merge_check(restored.model, restored.held_out_inputs(32), dtypes=["float32"])
    errors = check.errors.set_index("variant")
    for variant in ("merged", "merged_unmerged", "merge_and_unload"):
        assert errors.loc[variant, "max_rel"] < 1e-5, (variant, errors.loc[variant].to_dict())
        assert errors.loc[variant, "max_abs"] < 1e-4, variant
    assert check.params.loc[1, "total_params"] == check.params.loc[0, "total_params"] - check.params.loc[0, "lora_params"]
