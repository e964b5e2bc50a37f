"""Merge audit: merged equals unmerged in float32, drift shows in low precision, nothing crashes on a dtype
the CPU lacks. No timing asserts: latency is only checked for shape and sanity."""

import copy

import pytest
import torch
from torch import nn

from lora_analysis import apply_lora
import lora_analysis.analysis.merge_check as mc
from lora_analysis.analysis.merge_check import latency_check, merge_check, naive_merge


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    apply_lora(model, ["0", "2"], rank=4, alpha=8.0)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.weight.normal_(std=0.5)
    return model


def _inputs():
    return torch.randn(10, 16, generator=torch.Generator().manual_seed(1))


def test_merged_equals_unmerged_in_float32():
    model = _model()
    before = copy.deepcopy(model.state_dict())
    check = merge_check(model, _inputs(), dtypes=["float32"])
    fp32 = check.errors[check.errors["dtype"] == "float32"].set_index("variant")
    assert set(fp32.index) == {"unmerged", "merged", "merged_unmerged", "merge_and_unload", "naive_merge"}
    assert fp32.loc["unmerged", "max_abs"] == 0.0
    for variant in ("merged", "merged_unmerged", "merge_and_unload", "naive_merge"):
        assert fp32.loc[variant, "max_abs"] < 1e-5, variant
        assert fp32.loc[variant, "max_rel"] < 1e-5, variant
    assert check.roundtrip.loc[0, "max_abs"] < 1e-6
    for key, value in model.state_dict().items():       # the caller's model is untouched
        assert torch.equal(value, before[key]), key
    assert check.skipped == {}


def test_low_precision_drift_is_measured_and_larger_than_fp32():
    check = merge_check(_model(), _inputs(), dtypes=["float32", "bfloat16", "float16"])
    errs = check.errors.set_index(["dtype", "variant"])
    assert errs.loc[("bfloat16", "merged"), "max_abs"] > 1e-4           # rounding ΔW into bf16 weights shows
    assert errs.loc[("bfloat16", "merged"), "max_abs"] > 10 * errs.loc[("float32", "merged"), "max_abs"]
    assert errs.loc[("bfloat16", "unmerged"), "max_abs_vs_fp32"] > 0     # bf16 itself differs from fp32
    trip = check.roundtrip.set_index("dtype")
    assert trip.loc["bfloat16", "max_abs"] > trip.loc["float32", "max_abs"]
    assert trip.loc["bfloat16", "changed_entries"] > 0
    # float16 either ran or was skipped with a reason; never both, never an exception
    assert ("float16" in set(check.errors["dtype"])) != ("float16" in check.skipped)


def test_unsupported_dtype_is_skipped_with_a_reason(monkeypatch):
    real = mc._forward

    def fake(model, inputs):
        if next(model.parameters()).dtype == torch.float16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for \'Half\'')
        return real(model, inputs)

    monkeypatch.setattr(mc, "_forward", fake)
    check = merge_check(_model(), _inputs(), dtypes=["float32", "float16"])
    assert "not implemented for 'Half'" in check.skipped["float16"]
    assert set(check.errors["dtype"]) == {"float32"}


def test_parameter_counts_before_and_after_merge():
    check = merge_check(_model(), _inputs(), dtypes=["float32"])
    params = check.params.set_index("state")
    base = 16 * 32 + 32 + 32 * 8 + 8
    lora = 4 * (16 + 32) + 4 * (32 + 8)
    assert params.loc["with LoRA (unmerged)", "total_params"] == base + lora
    assert params.loc["with LoRA (unmerged)", "lora_params"] == lora
    assert params.loc["merge_and_unload", "total_params"] == base


def test_naive_merge_rounds_in_the_dtype():
    model = _model().to(torch.bfloat16)
    careful = copy.deepcopy(model)
    naive_merge(model)
    from lora_analysis import merge
    merge(careful)
    assert model[0].merged and careful[0].merged
    # both are bf16 weights close to W + ΔW; they need not be identical
    diff = (model[0].base_layer.weight.float() - careful[0].base_layer.weight.float()).abs().max()
    assert diff < 0.1


def test_bad_inputs():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_check(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="dtype='int8'"):
        merge_check(_model(), _inputs(), dtypes=["int8"])


def test_latency_table_shape():
    table = latency_check(_model(), _inputs(), repeats=3, warmup=1, devices=["cpu"])
    assert table["variant"].tolist() == ["base", "unmerged", "merged"]
    assert (table["median_ms"] > 0).all() and (table["repeats"] == 3).all()
    assert table.loc[0, "relative"] == pytest.approx(1.0)
