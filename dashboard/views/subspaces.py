"""Subspaces: φ heatmaps (rank vs rank, seed vs seed, LoRA vs full FT), ΔW versus W0, the amplification table,
and intruder dimensions versus ε for LoRA and full fine-tuning (registered analyses similarity, base_overlap,
amplification and intruders: the report shows the same)."""

import streamlit as st

from dashboard.analyses import inputs_for, result, show, widget
from dashboard.common import chart, guarded
from dashboard.jobs_ui import job_panel
from dashboard.runs import all_runs, completed, empty_store_message, latest_sweep, run_label
from dashboard.plain_text import plain
from lora_analysis import jobs
from lora_analysis.analysis import registry

SIMILARITY, BASE, AMPLIFICATION, INTRUDERS = (registry.get(n) for n in
                                               ("similarity", "base_overlap", "amplification", "intruders"))


def similarity_section(runs) -> None:
    st.subheader(SIMILARITY.title)
    st.caption(SIMILARITY.question)
    if len(runs) < 2:
        st.info("φ compares two runs: add a second run.")
        return
    inputs = inputs_for(runs)
    labels = {run_label(r): r for r in runs}
    lora = [n for n in labels if labels[n].method == "lora"]
    with guarded("comparing the two runs") as g:
        params = {}
        c = st.columns(3)
        first = widget(SIMILARITY, "first", inputs, params, "sub_a", container=c[0])
        widget(SIMILARITY, "second", inputs, params, "sub_b", container=c[1])
        widget(SIMILARITY, "side", inputs, params, "sub_side", container=c[2])
        widget(SIMILARITY, "module", inputs, params, "sub_module")
        res = result(SIMILARITY, inputs, params)
        left, right = st.columns([3, 2])
        with left:
            chart(res.figures[0], key="sub_phi")
        with right:
            st.dataframe(res.tables[0][1], hide_index=True)
    if g.failed:
        return
    seeds = {labels[n].config.get("seed") for n in lora}
    if len(seeds) < 2:
        with st.expander("Seed versus seed"):
            st.write("Two runs of the same rank from different seeds show how much of a LoRA subspace is "
                     "reproducible. Add a second-seed run of the chosen first run:")
            is_lora = labels[first].method == "lora"
            if st.button("Run it with seed 1", key="sub_seed", disabled=not is_lora,
                         help=None if is_lora else "choose a LoRA run as the first run"):
                cfg = labels[first].config
                # everything as in the first run but the seed, so the two are comparable
                common = {k: v for k, v in cfg.items()
                          if k not in ("model", "method", "rank", "alpha", "rslora", "targets", "seed")}
                with guarded("starting the seed run"):
                    st.session_state["sub_job"] = jobs.start_job("sweep", {
                        "model": cfg["model"], "ranks": [cfg["rank"]], "alphas": [cfg["alpha"]],
                        "rslora": [bool(cfg.get("rslora"))], "targets": [cfg.get("targets")], "full_ft": False,
                        "seed": 1, **common}).id
            if st.session_state.get("sub_job"):
                job_panel(st.session_state["sub_job"])


def base_section(runs) -> None:
    st.subheader(BASE.title)
    st.caption(f"{BASE.question} {AMPLIFICATION.question}")
    inputs = inputs_for(runs)
    with guarded("comparing ΔW with W0") as g:
        reason = BASE.skip_reason(inputs)
        if reason:
            st.info(plain(f"{reason[0].upper()}{reason[1:]}."), icon=":material/info:")
            return
        params = {}
        c = st.columns(2)
        widget(BASE, "run", inputs, params, "base_run", container=c[0])
        widget(BASE, "module", inputs, params, "base_module", container=c[1])
        overlap = result(BASE, inputs, params)
        amp = result(AMPLIFICATION, inputs, {"run": params["run"]})
    if g.failed:
        return
    left, right = st.columns(2)
    with left:
        chart(overlap.figures[0], key="base_overlap")
    with right:
        chart(amp.figures[0], key="amp_bars")
    chart(amp.figures[1], key="amp_table")


def intruder_section(runs) -> None:
    st.subheader(INTRUDERS.title)
    st.caption(INTRUDERS.question)
    inputs = inputs_for(runs)
    with guarded("counting intruders"):
        reason = INTRUDERS.skip_reason(inputs)
        if reason:
            st.info(plain(f"{reason[0].upper()}{reason[1:]}."), icon=":material/info:")
            return
        params = {}
        widget(INTRUDERS, "k", inputs, params, "intr_k", max_value=50)
        res = result(INTRUDERS, inputs, params)
        show(res, "intr", tables=False)
        st.dataframe(res.tables[0][1], hide_index=True)


def page() -> None:
    st.title("Subspaces")
    runs = completed(all_runs())
    if not runs:
        empty_store_message()
        return
    similarity_section(runs)
    base_section(runs)
    intruder_section(latest_sweep(runs))


page()
