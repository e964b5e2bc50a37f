"""Merge equivalence: is the merged model the same model? Errors per dtype, latency, task metric (the
registered analysis ``merge``: the report shows the same)."""

import pandas as pd
import streamlit as st

from dashboard.analyses import inputs_for, result, widget
from dashboard.common import chart, guarded
from dashboard.runs import all_runs, completed, empty_store_message
from lora_analysis.analysis import registry
from lora_analysis.analysis.merge_check import merge_verdict

MERGE = registry.get("merge")
# parameters that only change how the result is drawn: the computation is cached without them
DRAWING = ("reference",)


def verdict(errors: pd.DataFrame, latency: pd.DataFrame) -> tuple[bool, str]:
    """The library's verdict (computed from the numbers: PEFT's element-wise allclose) and the CPU speed."""
    found = merge_verdict(errors)
    cpu = latency[latency["device"] == "cpu"].set_index("variant")["relative"]
    return found.same, (f"{found.text} The merged model runs at {cpu.get('merged', float('nan')):.2f}× the base "
                        f"model's CPU time; unmerged LoRA at {cpu.get('unmerged', float('nan')):.2f}×.")


def page() -> None:
    st.title("Merge equivalence")
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
    head = st.container()        # the verdict goes above the charts, once the check has run
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
    with head:
        (st.success if same else st.warning)(text, icon=":material/check_circle:" if same else ":material/warning:")
        for dtype, reason in check.skipped.items():
            st.warning(f"{dtype} was skipped on this machine: {reason}")
        st.markdown("**Setups checked**: base weights · LoRA factors, and who runs each")
        st.dataframe(check.setups, hide_index=True, width="stretch")
    errors_fig, latency_fig, task_fig = figures
    with left:
        chart(errors_fig, key="merge_errors")
    with right:
        chart(latency_fig, key="merge_latency")
    st.markdown("**Unmerge round trip**: max |W − unmerge(merge(W))| per dtype, float32 factors")
    st.dataframe(check.roundtrip, hide_index=True, width="stretch")
    st.markdown("**Parameters before and after merge_and_unload**")
    st.dataframe(check.params, hide_index=True)

    st.subheader("Task metric: base, LoRA and full fine-tuning")
    left, right = st.columns([3, 2])
    with left:
        chart(task_fig, key="merge_task")
    right.dataframe(merge.task, hide_index=True)
    if not merge.full:
        right.caption("No full fine-tuning run of this model in the store: run one on Fine-tune.")
    with st.expander("All merge errors"):
        st.dataframe(check.errors, hide_index=True, width="stretch")


page()
