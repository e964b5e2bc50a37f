"""The Merge page (AppTest): it says which setup each number is (what this library and PEFT actually run),
and its verdict follows PEFT's element-wise rule, allclose(atol=rtol=1e-4), never the text alone.

A small store of its own: two mlp-digits LoRA runs, r=2 and r=4 (the base cache is the session's).
"""

from __future__ import annotations

import pytest
import streamlit as st

import lora_analysis.analysis.merge_check as mc
from tests.test_dashboard_pages import chart, clean, frame_with, open_page, texts, values


@pytest.fixture(scope="module")
def store(tmp_path_factory, _shared_cache):
    from lora_analysis.training import run_sweep, sweep_settings

    home = tmp_path_factory.mktemp("merge-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ANALYSIS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        result = run_sweep(sweep_settings(model="mlp-digits", ranks=[2, 4], alphas=[16], full_ft=False, steps=10,
                                          pretrain_steps=60))
    assert all(r.status == "completed" for r in result.results)
    return home


@pytest.fixture
def home(store, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(store))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st.cache_data.clear()           # merge results are cached per run: each test computes its own
    yield store
    st.cache_data.clear()


def test_page_names_each_setup_and_gives_the_peft_verdict(home):
    at = clean(open_page("merge"))
    verdict = texts(at.info)                # the answer, under the page's question
    assert verdict.startswith("Yes in float32") and "within PEFT's tolerance" in verdict
    assert "outside" not in verdict.split("bfloat16")[0]           # the float32 sentence
    assert not at.warning
    setups = frame_with(at, "who").set_index("setup")
    for label in ("float32 · float32 LoRA", "bfloat16 · float32 LoRA", "bfloat16 · bfloat16 LoRA"):
        assert label in setups.index, list(setups.index)
    assert "this library trains" in setups.loc["float32 · float32 LoRA", "who"]
    assert "PEFT's default" in setups.loc["bfloat16 · float32 LoRA", "who"]
    assert "autocast_adapter_dtype=False" in setups.loc["bfloat16 · bfloat16 LoRA", "who"]
    errors = frame_with(at, "allclose")
    fp32 = errors[(errors["dtype"] == "float32") & (errors["variant"] == "merged")]
    assert len(fp32) == 1 and bool(fp32["allclose"].iloc[0]) and float(fp32["tol_ratio"].iloc[0]) <= 1
    spec = chart(at, "Merge error")
    xs = {x for trace in spec["data"] for x in values(trace["x"])}
    assert {"float32 · float32 LoRA", "bfloat16 · float32 LoRA", "bfloat16 · bfloat16 LoRA"} <= xs


def test_verdict_warns_when_the_merge_is_outside_peft_tolerance(home, monkeypatch):
    real = mc.merge_check

    def failing(model, inputs, *args, **kwargs):
        # the float32 merge off by 1.5 tolerances at one element whose output is near 0: max |Δ| is still
        # below 1e-4 + 1e-4·max|y|, the rule the page used to apply
        check = real(model, inputs, *args, **kwargs)
        errors = check.errors.copy()
        bad = (errors["dtype"] == "float32") & (errors["variant"] == "merged")
        errors.loc[bad, ["max_abs", "allclose", "tol_ratio"]] = [1.5e-4, False, 1.5]
        errors.loc[bad, "max_rel"] = 1.5e-4 / 2.0
        check.errors = errors
        return check

    monkeypatch.setattr(mc, "merge_check", failing)
    at = clean(open_page("merge"))
    warning = texts(at.warning)             # the answer, as a warning: the merged model is not the same
    assert warning.startswith("No in float32") and "1.5×" in warning
    assert not at.info and not at.success
