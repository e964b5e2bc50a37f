"""Subspaces: φ heatmaps (rank vs rank, seed vs seed, LoRA vs full FT, ΔW vs W0), the amplification
table, and intruder dimensions versus ε for LoRA and full fine-tuning."""

import pandas as pd
import streamlit as st

from dashboard.common import chart, guarded
from dashboard.jobs_ui import job_panel
from dashboard.runs import all_runs, completed, empty_store_message, latest_sweep, run_label, stamp, updates_for
from lora_analysis import jobs
from lora_analysis.analysis.amplification import amplification_frame
from lora_analysis.analysis.intruders import intruder_sweep
from lora_analysis.analysis.similarity import adapter_similarity, base_overlap, similarity_summary_frame
from lora_analysis.plots.analysis import (plot_amplification, plot_amplification_table, plot_base_overlap,
                                          plot_intruders_vs_epsilon, plot_similarity_heatmap)

SIDES = {"A matrices (paper, §7.2)": "A", "ΔW input directions (V)": "input", "ΔW output directions (U)": "output"}
EPSILONS = [round(0.05 * i, 2) for i in range(1, 20)]


@st.cache_data(max_entries=32, show_spinner="Computing subspace similarity…")
def similarity(_runs, key: tuple, side: str):
    u1, u2 = (updates_for(r) for r in _runs)
    results = adapter_similarity(u1, u2, side)
    return {n: (r.phi, r.d) for n, r in results.items()}, similarity_summary_frame(results)


@st.cache_data(max_entries=32, show_spinner="Counting intruder dimensions…")
def intruders(_runs, key: tuple, k: int) -> pd.DataFrame:
    return pd.concat([intruder_sweep(updates_for(r), EPSILONS, (k,), label=run_label(r)) for r in _runs],
                     ignore_index=True)


def similarity_section(runs) -> None:
    st.subheader("Subspace similarity φ")
    st.caption("φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j): 1 when the top-i directions of one update lie in "
               "the top-j of the other, about max(i, j)/d for random subspaces (Hu et al. 2021, Eq. 4).")
    labels = {run_label(r): r for r in runs}
    names = list(labels)
    lora = [n for n in names if labels[n].method == "lora"]
    by_rank = sorted(lora, key=lambda n: labels[n].config.get("rank") or 0)
    c = st.columns(3)
    first = c[0].selectbox("First run", names, index=names.index(by_rank[-1]) if by_rank else 0, key="sub_a")
    # the paper compares r=8 with r=64: default to the two highest ranks of the first run's model
    # (runs of different models share no module, so such a default pair would open on an error)
    same_model = [n for n in names if n != first and labels[n].model == labels[first].model]
    second_default = next((n for n in reversed(by_rank) if n in same_model), None) or \
        (same_model or [n for n in names if n != first] or [first])[0]
    second = c[1].selectbox("Second run", names, index=names.index(second_default), key="sub_b")
    both_lora = labels[first].method == "lora" and labels[second].method == "lora"
    sides = list(SIDES) if both_lora else list(SIDES)[1:]
    side = SIDES[c[2].selectbox("Directions", sides, key="sub_side")]
    with guarded("comparing the two runs") as g:
        pair = [labels[first], labels[second]]
        phis, summary = similarity(pair, tuple((r.id, stamp(r)) for r in pair), side)
    if g.failed:
        return
    module = st.selectbox("Module", list(phis), key="sub_module")
    phi, d = phis[module]
    left, right = st.columns([3, 2])
    with left:
        chart(plot_similarity_heatmap(phi, d, x_label=f"j ({second})", y_label=f"i ({first})"), key="sub_phi")
    with right:
        st.dataframe(summary, hide_index=True)
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
    st.subheader("ΔW versus W0")
    labels = {run_label(r): r for r in runs}
    c = st.columns(2)
    run = labels[c[0].selectbox("Run", list(labels), key="base_run")]
    with guarded("comparing ΔW with W0") as g:
        updates = updates_for(run)
        module = c[1].selectbox("Module", list(updates), key="base_module")
        overlap = base_overlap(updates[module])
        amp = amplification_frame(updates)
    if g.failed:
        return
    left, right = st.columns(2)
    with left:
        chart(plot_base_overlap(overlap), key="base_overlap")
    with right:
        chart(plot_amplification(amp), key="amp_bars")
    chart(plot_amplification_table(amp), key="amp_table")
    st.caption("Amplification factor ‖ΔW‖_F / ‖Uᵀ W0 V‖_F (U, V: ΔW's top-r directions; Hu et al. 2021, §7.3): "
               "large when ΔW amplifies directions W0 barely uses. The paper reports about 21.5 at r=4 for "
               "GPT-3's layer-48 Wq.")


def intruder_section(runs) -> None:
    st.subheader("Intruder dimensions")
    st.caption("Top-k singular vectors of W0 + ΔW whose largest |cosine| with every singular vector of W0 is "
               "below ε (Shuttleworth et al. 2024). Low-rank LoRA tends to create them; full fine-tuning rarely.")
    k = st.slider("k (top singular vectors checked)", 1, 50, 10, key="intr_k")
    with guarded("counting intruders"):
        sweep = intruders(runs, tuple((r.id, stamp(r)) for r in runs), k)
        chart(plot_intruders_vs_epsilon(sweep, k), key="intr_chart")
        at = sweep[sweep["epsilon"] == 0.5].groupby("label", as_index=False, sort=False)["intruders"].sum()
        st.dataframe(at.rename(columns={"intruders": f"intruders at ε=0.5, k={k}"}), hide_index=True)


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
