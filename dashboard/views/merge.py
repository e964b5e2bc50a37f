"""Merge equivalence: is the merged model the same model? Errors per dtype, latency, task metric (the
registered analysis ``merge``: the report shows the same)."""

import pandas as pd
import streamlit as st

from dashboard.analyses import inputs_for, result, widget
from dashboard.common import (answer, chart, guarded, next_question, page_question, question, reading,
                              table)
from dashboard.plain_text import plain
from dashboard.runs import all_runs, completed, empty_store_message
from lora_analysis.analysis import registry
from lora_analysis.analysis.merge_check import merge_verdict

MERGE = registry.get("merge")
# parameters that only change how the result is drawn: the computation is cached without them
DRAWING = ("reference",)


def verdict(errors: pd.DataFrame, latency: pd.DataFrame) -> tuple[bool, str]:
    """The library's verdict (computed from the numbers: PEFT's element-wise allclose). No speed claim: one
    wall-clock reading is noise; the registered answer states a speed difference only beyond its spread."""
    found = merge_verdict(errors)
    return found.same, found.text.replace("**", "")


def page() -> None:
    question("Merge equivalence", page_question("merge", "Is my merged model the same model?"))
    head = st.container()        # the answer goes above the charts, once the check has run
    st.caption("x·(W + ΔW) = x·W + x·ΔW: merging B·A into W should change nothing but the speed. In float32 it "
               "holds to rounding; in bfloat16/float16 the fp32 delta is rounded into the weight's dtype, and a "
               "naive in-dtype merge rounds twice. Each low-precision dtype is checked as users run it: float32 "
               "LoRA factors on the low-precision base (PEFT's default, and this library), and factors in the "
               "base's dtype (PEFT's autocast_adapter_dtype=False). Here is how much, on this run's held-out "
               "inputs; \"agree\" means PEFT's element-wise allclose(atol=rtol=1e-4).")
    inputs = inputs_for(completed(all_runs()))
    if MERGE.skip_reason(inputs):
        empty_store_message()
        return
    chosen: dict = {}
    widget(MERGE, "run", inputs, chosen, "merge_run")
    left, right = st.columns(2)
    widget(MERGE, "reference", inputs, chosen, "merge_ref", container=left, kind="radio")

    with guarded("checking the merge") as g:
        res = result(MERGE, inputs, {k: v for k, v in chosen.items() if k not in DRAWING})
        params = {**res.params, **chosen}
        figures = MERGE.figures(res.value, params)     # the registered figures, at the reference chosen
        st.session_state[f"params:{MERGE.name}"] = params
    if g.failed:
        return
    check, merge = res.value.check, res.value
    same, text = verdict(check.errors, merge.latency)
    computed = getattr(res, "answer", "") or ""      # the library's answer: verdict and timing beyond the spread
    with head:
        answer(computed or text, getattr(res, "rule", "") or "", warn=not same)
        for dtype, reason in check.skipped.items():
            st.warning(f"{plain(dtype)} was skipped on this machine: {plain(reason)}")
        st.markdown("**Setups checked**: base weights · LoRA factors, and who runs each")
        table(check.setups, "merge-setups", key="merge_setups")
    errors_fig, latency_fig, task_fig = figures[:3]
    with left:
        chart(errors_fig, key="merge_errors", how_to_read=reading(res, 0))
    with right:
        chart(latency_fig, key="merge_latency", how_to_read=reading(res, 1))
    st.markdown("**Unmerge round trip**: max |W − unmerge(merge(W))| per dtype, float32 factors")
    table(check.roundtrip, "unmerge-round-trip", key="merge_roundtrip")
    st.markdown("**Parameters before and after merge_and_unload**")
    table(check.params, "merge-parameters", key="merge_params", width="content")

    st.subheader("Task metric: base, LoRA and full fine-tuning")
    left, right = st.columns([3, 2])
    with left:
        chart(task_fig, key="merge_task", how_to_read=reading(res, 2))
    table(merge.task, "merge-task-metric", key="merge_task_table", container=right)
    if not merge.full:
        right.caption("No full fine-tuning run of this model in the store: run one on Fine-tune.")
    with st.expander("All merge errors"):
        table(check.errors, "merge-errors", key="merge_all_errors")
    next_question("reports", "Next: keep and share these answers (Reports)")


page()
