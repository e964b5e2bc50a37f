"""Merge audit: merged equals unmerged in float32, drift shows in low precision, nothing crashes on a dtype
the CPU lacks. No timing asserts: latency is only checked for shape and sanity."""

import copy

import pytest
import torch
from torch import nn

import pandas as pd

from lora_analysis import apply_lora, merge
import lora_analysis.analysis.merge_check as mc
from lora_analysis.analysis.merge_check import latency_check, merge_check, merge_verdict, naive_merge, setup_model


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
    errs = check.errors.set_index(["dtype", "adapter_dtype", "variant"])
    for adapter in ("float32", "bfloat16"):
        merged = errs.loc[("bfloat16", adapter, "merged"), "max_abs"]
        assert merged > 1e-4                                            # rounding W + ΔW into bf16 shows
        assert merged > 10 * errs.loc[("float32", "float32", "merged"), "max_abs"]
        assert errs.loc[("bfloat16", adapter, "unmerged"), "max_abs_vs_fp32"] > 0   # bf16 itself differs
    trip = check.roundtrip.set_index("dtype")
    assert list(trip.index) == ["float32", "bfloat16", "float16"] and set(trip["adapter_dtype"]) == {"float32"}
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
    model = _model().to(torch.bfloat16)                  # factors in bf16 too: the naive merge's setting
    w = model[0].base_layer.weight.detach().clone()
    a, b, s = model[0].lora_A.weight.detach(), model[0].lora_B.weight.detach(), model[0].scaling
    careful = copy.deepcopy(model)
    naive_merge(model)
    from lora_analysis import merge
    merge(careful)
    assert model[0].merged and careful[0].merged
    # naive: the product, the scaling and the sum are each rounded to bf16
    assert torch.equal(model[0].base_layer.weight, w + s * (b @ a))
    # careful: ΔW and the sum in float32, one rounding at the end
    exact = (w.float() + s * (b.float() @ a.float())).to(torch.bfloat16)
    assert torch.equal(careful[0].base_layer.weight, exact)
    # the extra roundings show: some entries differ (a naive merge without rounding would equal the careful one)
    assert (model[0].base_layer.weight != exact).sum() > 0
    diff = (model[0].base_layer.weight.float() - exact.float()).abs().max()
    assert 0 < diff < 0.1


def test_bad_inputs():
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_check(nn.Linear(3, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="dtype='int8'"):
        merge_check(_model(), _inputs(), dtypes=["int8"])
    with pytest.raises(ValueError, match="dtype='fp8'"):
        merge_check(_model(), _inputs(), adapter_dtypes=["float32", "fp8"])


def test_latency_table_shape():
    table = latency_check(_model(), _inputs(), repeats=3, warmup=1, devices=["cpu"])
    assert table["variant"].tolist() == ["base", "unmerged", "merged"]
    assert (table["median_ms"] > 0).all() and (table["repeats"] == 3).all()
    assert table.loc[0, "relative"] == pytest.approx(1.0)
    # a low-precision latency run: bf16 weights, float32 factors (what users run), no error
    bf16 = latency_check(_model(), _inputs(), repeats=1, warmup=0, devices=["cpu"], dtype="bfloat16")
    assert bf16["variant"].tolist() == ["base", "unmerged", "merged"] and (bf16["median_ms"] > 0).all()


def test_latency_has_a_spread_and_verdicts_only_compare_with_it():
    from lora_analysis.analysis.merge_check import latency_verdicts

    table = latency_check(_model(), _inputs(), repeats=5, warmup=0, devices=["cpu"], number=2)
    assert (table["number"] == 2).all()
    assert ((table["q1_ms"] <= table["median_ms"]) & (table["median_ms"] <= table["q3_ms"])).all()
    assert (table["iqr_ms"] == table["q3_ms"] - table["q1_ms"]).all()
    verdicts = latency_verdicts(table)
    assert verdicts["variant"].tolist() == ["unmerged", "merged"] and set(verdicts["versus"]) == {"base"}
    for row in verdicts.itertuples():        # measurable exactly when the interquartile ranges do not overlap
        a, b = table.set_index("variant").loc[row.variant], table.set_index("variant").loc["base"]
        assert row.measurable == (a["q1_ms"] > b["q3_ms"] or a["q3_ms"] < b["q1_ms"])
        assert ("no measurable difference" in row.text) != row.measurable
    with pytest.raises(ValueError, match="number=0 is not allowed"):
        latency_check(_model(), _inputs(), repeats=1, devices=["cpu"], number=0)


# ---- what users run: the setups, PEFT's element-wise rule, the verdict (defect 9) ------------------------

def _peft_twin(model, dtype, autocast_adapter_dtype):
    """The same base weights and factors as a PEFT model in ``dtype`` (PEFT's own casting rules)."""
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    for i in (0, 2):
        base[i].load_state_dict(model[i].base_layer.state_dict())
    twin = peft.get_peft_model(base.to(dtype), peft.LoraConfig(target_modules=["0", "2"], r=4, lora_alpha=8),
                               autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        for i in (0, 2):
            layer = twin.base_model.model[i]
            layer.lora_A["default"].weight.copy_(model[i].lora_A.weight)
            layer.lora_B["default"].weight.copy_(model[i].lora_B.weight)
    return twin.eval()


@pytest.mark.parametrize("adapter, autocast", [("float32", True), ("base", False)])
def test_setups_are_the_ones_peft_runs(adapter, autocast):
    """bf16 base + float32 factors is PEFT's default (autocast_adapter_dtype=True); bf16 factors is
    autocast_adapter_dtype=False. Same factor dtypes, same outputs and same merged weights as PEFT."""
    model = _model()
    ours = setup_model(model, torch.bfloat16, adapter)
    twin = _peft_twin(model, torch.bfloat16, autocast)
    want = torch.float32 if adapter == "float32" else torch.bfloat16
    assert ours[0].lora_A.weight.dtype == twin.base_model.model[0].lora_A["default"].weight.dtype == want
    assert ours[0].base_layer.weight.dtype == torch.bfloat16
    assert model[0].lora_A.weight.dtype == torch.float32 and model[0].base_layer.weight.dtype == torch.float32
    x = _inputs().to(torch.bfloat16)
    with torch.no_grad():
        # each layer's unmerged output agrees to one bf16 rounding (see test_unmerged_bf16_output_rounds_once_as_peft)
        h = x
        for i in (0, 2):
            want = twin.base_model.model[i](h)
            torch.testing.assert_close(ours[i](h), want, atol=2**-7 * float(want.abs().max()), rtol=0)
            h = torch.nn.functional.gelu(ours[i](h))
        if adapter == "float32":        # with bf16 factors PEFT rounds ΔW to bf16 before adding: naive_merge
            merge(ours)
            twin.merge_adapter()
            for i in (0, 2):
                assert torch.equal(ours[i].base_layer.weight, twin.base_model.model[i].base_layer.weight)
            assert torch.equal(ours(x), twin(x))


def test_unmerged_bf16_output_rounds_once_as_peft():
    model = _model()
    ours, twin = setup_model(model, torch.bfloat16, "float32"), _peft_twin(model, torch.bfloat16, True)
    x = _inputs().to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours(x), twin(x))


def test_errors_say_which_setup_each_row_is():
    check = merge_check(_model(), _inputs(), dtypes=["float32", "bfloat16"])
    rows = check.errors.drop_duplicates(["dtype", "adapter_dtype"])
    assert list(zip(rows["dtype"], rows["adapter_dtype"])) == [("float32", "float32"), ("bfloat16", "float32"),
                                                             ("bfloat16", "bfloat16")]
    setups = check.setups.set_index(["dtype", "adapter_dtype"])
    assert "this library trains" in setups.loc[("float32", "float32"), "who"]
    assert "PEFT's default" in setups.loc[("bfloat16", "float32"), "who"]
    assert "autocast_adapter_dtype=False" in setups.loc[("bfloat16", "bfloat16"), "who"]
    assert set(check.errors["setup"]) == set(check.setups["setup"])
    # the two bf16 setups are different models (bf16 factors lose bits of A and B)
    errs = check.errors.set_index(["dtype", "adapter_dtype", "variant"])
    assert errs.loc[("bfloat16", "float32", "unmerged"), "max_abs_vs_fp32"] != \
        errs.loc[("bfloat16", "bfloat16", "unmerged"), "max_abs_vs_fp32"]


def test_allclose_is_peft_elementwise_rule():
    model, x = _model(), _inputs()
    check = merge_check(model, x, dtypes=["float32", "bfloat16"])
    errs = check.errors.set_index(["dtype", "adapter_dtype", "variant"])
    for dtype, adapter in (("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "base")):
        m = setup_model(model, getattr(torch, dtype), adapter)
        xd = x.to(getattr(torch, dtype))
        with torch.no_grad():
            unmerged = m(xd).float()
            merged = merge(m)(xd).float()
        key = (dtype, dtype if adapter == "base" else adapter, "merged")
        assert bool(errs.loc[key, "allclose"]) == torch.allclose(merged, unmerged, atol=1e-4, rtol=1e-4), key
        ratio = float(((merged - unmerged).abs() / (1e-4 + 1e-4 * unmerged.abs())).max())
        assert errs.loc[key, "tol_ratio"] == pytest.approx(ratio, rel=1e-6), key
        assert errs.loc[key, "max_abs"] == pytest.approx(float((merged - unmerged).abs().max()), rel=1e-6), key
    assert bool(errs.loc[("float32", "float32", "merged"), "allclose"])
    assert not bool(errs.loc[("bfloat16", "float32", "merged"), "allclose"])       # bf16 rounding of W + ΔW


def _errors_frame(max_abs, max_rel, allclose, tol_ratio, dtype="float32"):
    rows = []
    for variant in ("unmerged", "merged", "merge_and_unload"):
        same = variant == "unmerged"
        rows.append({"dtype": dtype, "adapter_dtype": "float32", "setup": f"{dtype} · float32 LoRA",
                     "variant": variant, "max_abs": 0.0 if same else max_abs, "max_rel": 0.0 if same else max_rel,
                     "max_abs_vs_fp32": 0.0, "max_rel_vs_fp32": 0.0, "allclose": True if same else allclose,
                     "tol_ratio": 0.0 if same else tol_ratio, "allclose_vs_fp32": True})
    return pd.DataFrame(rows)


def test_verdict_is_computed_from_the_numbers():
    ok = merge_verdict(_errors_frame(2e-7, 1e-7, True, 0.002))
    assert ok.same and "agree" in ok.text and "within PEFT's" in ok.text and "outside" not in ok.text
    # max |Δ| = 1.5e-4 ≤ 1e-4 + 1e-4·max|y| for max|y| = 1, yet the worst element's |y| is near 0: allclose fails
    bad = merge_verdict(_errors_frame(1.5e-4, 1.5e-4, False, 1.5))
    assert not bad.same and "differ" in bad.text and "within" not in bad.text and "outside PEFT's" in bad.text
    assert "1.5×" in bad.text
    none = merge_verdict(_errors_frame(0.0, 0.0, True, 0.0, dtype="bfloat16"))
    assert not none.same and "not checked" in none.text and "within" not in none.text
    real = merge_verdict(merge_check(_model(), _inputs(), dtypes=["float32"]).errors)
    assert real.same and real.max_abs < 1e-5
