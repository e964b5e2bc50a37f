"""Rank & alpha effects: final metric versus rank and alpha, α/r versus α/√r, the size of ΔW versus
alpha, and the efficiency frontier (trainable parameters versus metric)."""

import numpy as np
import pandas as pd
import streamlit as st

from dashboard.common import chart, guarded
from dashboard.jobs_ui import job_panel
from dashboard.runs import all_runs, completed, empty_store_message, spectra_for
from lora_analysis import jobs, runstore
from lora_analysis.plots.training import (plot_cost_comparison, plot_efficiency_frontier, plot_metric_vs_alpha,
                                          plot_metric_vs_rank, plot_update_norm)

# Studies a user can add in one click (on mlp-digits, seconds each on a CPU).
STUDIES = {
    "alpha at r=8 (α = r, 2r, 16, 64)": {"model": "mlp-digits", "ranks": [8], "alphas": ["r", "2r", 16.0, 64.0],
                                         "full_ft": False},
    "α/r versus α/√r (rsLoRA) at r = 2…64": {"model": "mlp-digits", "ranks": [2, 8, 32, 64], "alphas": [16.0],
                                             "rslora": [False, True], "full_ft": False},
}
METRICS = ["val_accuracy", "val_perplexity", "val_loss"]


def delta_norms(runs: list[runstore.Run]) -> pd.DataFrame:
    """‖ΔW‖_F over the modules LoRA adapted (full fine-tuning's norm over the same modules, so the
    dashed line compares like with like)."""
    lora_modules = set().union(*(set(spectra_for(r)["name"]) for r in runs if r.method == "lora"))
    rows = []
    for run in runs:
        spectra = spectra_for(run)
        if run.method == "full" and lora_modules:
            spectra = spectra[spectra["name"].isin(lora_modules)]
        rows.append({"id": run.id, "name": run.name, "method": run.method, "status": run.status,
                     "rank": run.config.get("rank") if run.method == "lora" else None,
                     "alpha": run.config.get("alpha") if run.method == "lora" else None,
                     "rslora": run.config.get("rslora"),
                     "delta_norm": float(np.sqrt(np.sum(np.square(spectra["fro_norm"]))))})
    return pd.DataFrame(rows)


def page() -> None:
    st.title("Rank & alpha effects")
    st.caption("Scaling is α/r (or α/√r with rsLoRA): with Adam, raising α acts like raising the learning rate "
               "of the update. At high rank α/r shrinks the update and learning stalls; rsLoRA keeps it alive.")
    with st.expander("Add a study to the run store"):
        study = st.selectbox("Study", list(STUDIES), key="ra_study")
        if st.button("Run this study", key="ra_run", icon=":material/play_arrow:"):
            with guarded("starting the study"):
                st.session_state["ra_job"] = jobs.start_job("sweep", STUDIES[study]).id
        if st.session_state.get("ra_job"):
            job_panel(st.session_state["ra_job"])

    runs = completed(all_runs())
    if not runs:
        empty_store_message()
        return
    frame = runstore.runs_frame(runs=runs)
    models = list(dict.fromkeys(frame["model"]))
    c = st.columns(2)
    model = c[0].selectbox("Model", models, key="ra_model")
    chosen_runs = [r for r in runs if r.model == model]
    # runs of different data, steps or seed do not belong on one line: offer one set at a time
    # (learning rates differ by method on purpose: LoRA takes a larger one)
    settings = {}
    for r in chosen_runs:
        key = (r.config.get("data"), r.config.get("steps"), r.config.get("seed"))
        settings.setdefault(key, []).append(r)
    if len(settings) > 1:
        labels = {f"data={k[0] or 'default'}, steps={k[1]}, seed={k[2]} ({len(v)} runs)": v
                  for k, v in settings.items()}
        chosen_runs = labels[st.selectbox("Runs with the same data and optimisation settings", list(labels),
                                          key="ra_settings")]
    frame = frame[frame["id"].isin({r.id for r in chosen_runs})]
    metrics = [m for m in METRICS if m in frame.columns and frame[m].notna().any()]
    metric = c[1].selectbox("Metric", metrics, key="ra_metric")

    with guarded("drawing rank and alpha effects"):
        left, right = st.columns(2)
        with left:
            chart(plot_metric_vs_rank(frame, metric), key="ra_rank")
        with right:
            chart(plot_metric_vs_alpha(frame, metric), key="ra_alpha")
        norms = delta_norms(chosen_runs)
        left, right = st.columns(2)
        with left:
            chart(plot_update_norm(norms, "alpha"), key="ra_norm_alpha")
        with right:
            chart(plot_update_norm(norms, "rank", title="Size of the learned update versus rank"), key="ra_norm_rank")
        left, right = st.columns(2)
        with left:
            chart(plot_efficiency_frontier(frame, metric), key="ra_frontier")
        with right:
            chart(plot_cost_comparison(frame), key="ra_cost")
        if frame["rslora"].nunique() < 2:
            st.caption("α/r versus α/√r: the rank chart draws one line per scaling once the store holds both; "
                       "run the rsLoRA study above.")


page()
