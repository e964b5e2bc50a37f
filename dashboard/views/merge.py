"""Merge equivalence: is the merged model the same model? Errors per dtype, latency, task metric."""

import copy

import pandas as pd
import streamlit as st

from dashboard.common import chart, guarded
from dashboard.runs import all_runs, completed, empty_store_message, run_label, stamp
from lora_analysis import runstore
from lora_analysis.analysis.merge_check import latency_check, merge_check, merge_verdict
from lora_analysis.lora import merge_and_unload
from lora_analysis.plots.analysis import plot_latency, plot_merge_errors
from lora_analysis.plots.training import plot_task_metrics
from lora_analysis.training.restore import restore_run


@st.cache_resource(max_entries=8, show_spinner="Rebuilding the run's model…")
def restored(run_dir: str, version: float):
    # shared read-only: every analysis below works on deep copies
    return restore_run(runstore.read_run(run_dir))


@st.cache_data(max_entries=16, show_spinner="Comparing merged and unmerged outputs in float32, bfloat16, float16…")
def merge_report(run_dir: str, version: float):
    r = restored(run_dir, version)
    check = merge_check(r.model, r.held_out_inputs())
    return check.errors, check.roundtrip, check.params, check.skipped, check.setups


@st.cache_data(max_entries=16, show_spinner="Timing base, unmerged and merged forwards…")
def latency_report(run_dir: str, version: float, repeats: int) -> pd.DataFrame:
    r = restored(run_dir, version)
    return latency_check(r.model, r.held_out_inputs(), repeats=repeats)


@st.cache_data(max_entries=16, show_spinner="Evaluating base, LoRA and full fine-tuning…")
def task_report(run_dir: str, version: float, full_dir: str | None, full_version: float) -> pd.DataFrame:
    r = restored(run_dir, version)
    rows = [{"variant": "frozen base", **r.metric(r.base_model())},
            {"variant": "LoRA (unmerged)", **r.metric(r.model)},
            {"variant": "LoRA (merged)", **r.metric(merge_and_unload(copy.deepcopy(r.model)))}]
    if full_dir:
        full = restored(full_dir, full_version)
        rows.append({"variant": "full fine-tuning", **full.metric(full.model)})
    return pd.DataFrame(rows)


def verdict(errors: pd.DataFrame, latency: pd.DataFrame) -> tuple[bool, str]:
    """The library's verdict (computed from the numbers: PEFT's element-wise allclose) and the CPU speed."""
    result = merge_verdict(errors)
    cpu = latency[latency["device"] == "cpu"].set_index("variant")["relative"]
    return result.same, (f"{result.text} The merged model runs at {cpu.get('merged', float('nan')):.2f}× the base "
                         f"model's CPU time; unmerged LoRA at {cpu.get('unmerged', float('nan')):.2f}×.")


def page() -> None:
    st.title("Merge equivalence")
    st.caption("x·(W + ΔW) = x·W + x·ΔW: merging B·A into W should change nothing but the speed. In float32 it "
               "holds to rounding; in bfloat16/float16 the fp32 delta is rounded into the weight's dtype, and a "
               "naive in-dtype merge rounds twice. Each low-precision dtype is checked as users run it: float32 "
               "LoRA factors on the low-precision base (PEFT's default, and this library), and factors in the "
               "base's dtype (PEFT's autocast_adapter_dtype=False). Here is how much, on this run's held-out "
               "inputs; \"agree\" means PEFT's element-wise allclose(atol=rtol=1e-4).")
    runs = completed(all_runs())
    lora_runs = [r for r in runs if r.method == "lora"]
    if not lora_runs:
        empty_store_message()
        return
    labels = {run_label(r): r for r in lora_runs}
    run = labels[st.selectbox("LoRA run", list(labels), key="merge_run")]
    fulls = [r for r in runs if r.method == "full" and r.model == run.model and r.config.get("data") == run.config.get("data")]
    full = next((r for r in fulls if r.sweep_id == run.sweep_id), fulls[0] if fulls else None)

    with guarded("checking the merge") as g:
        errors, roundtrip, params, skipped, setups = merge_report(str(run.dir), stamp(run))
        latency = latency_report(str(run.dir), stamp(run), 30)
    if g.failed:
        return
    same, text = verdict(errors, latency)
    (st.success if same else st.warning)(text, icon=":material/check_circle:" if same else ":material/warning:")
    for dtype, reason in skipped.items():
        st.warning(f"{dtype} was skipped on this machine: {reason}")
    st.markdown("**Setups checked**: base weights · LoRA factors, and who runs each")
    st.dataframe(setups, hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        reference = st.radio("Compare with", ["same dtype", "fp32"], horizontal=True, key="merge_ref",
                             help="same dtype: what merging itself changes; fp32: total drift from the exact model")
        chart(plot_merge_errors(errors, reference), key="merge_errors")
    with right:
        chart(plot_latency(latency), key="merge_latency")
    st.markdown("**Unmerge round trip**: max |W − unmerge(merge(W))| per dtype, float32 factors")
    st.dataframe(roundtrip, hide_index=True, width="stretch")
    st.markdown("**Parameters before and after merge_and_unload**")
    st.dataframe(params, hide_index=True)

    st.subheader("Task metric: base, LoRA and full fine-tuning")
    with guarded("evaluating the models"):
        table = task_report(str(run.dir), stamp(run), str(full.dir) if full else None, stamp(full))
        metric = "val_accuracy" if "val_accuracy" in table.columns else "val_perplexity"
        left, right = st.columns([3, 2])
        with left:
            chart(plot_task_metrics(table, metric), key="merge_task")
        right.dataframe(table, hide_index=True)
        if not full:
            right.caption("No full fine-tuning run of this model in the store: run one on Fine-tune.")
    with st.expander("All merge errors"):
        st.dataframe(errors, hide_index=True, width="stretch")


page()
