"""Rank & alpha effects: final metric versus rank and alpha, α/r versus α/√r, the size of ΔW versus
alpha, and the efficiency frontier (trainable parameters versus metric): the registered analysis rank_alpha,
which the report shows the same way."""

import streamlit as st

from dashboard.analyses import inputs_for, result, widget
from dashboard.common import (answers_box, chart, guarded, next_question, page_question, question, reading,
                              result_answer)
from dashboard.jobs_ui import job_panel
from dashboard.plain_text import plain
from dashboard.runs import all_runs, completed, empty_store_message
from lora_analysis import jobs
from lora_analysis.analysis import registry

RANK_ALPHA = registry.get("rank_alpha")

# Studies a user can add in one click (on mlp-digits, seconds each on a CPU).
STUDIES = {
    "alpha at r=8 (α = r, 2r, 16, 64)": {"model": "mlp-digits", "ranks": [8], "alphas": ["r", "2r", 16.0, 64.0],
                                         "full_ft": False},
    "α/r versus α/√r (rsLoRA) at r = 2…64": {"model": "mlp-digits", "ranks": [2, 8, 32, 64], "alphas": [16.0],
                                             "rslora": [False, True], "full_ft": False},
}


def page() -> None:
    question("Rank & alpha effects", page_question("rank_alpha", "Which rank should I use?"))
    head = answers_box()       # the answer, once the chosen runs are compared
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
    inputs = inputs_for(runs)
    skip = RANK_ALPHA.skip_reason(inputs)
    if skip:                # e.g. only runs recorded from a training loop that never evaluated
        st.info(plain(f"Rank and alpha effects compare the runs' final metrics: {skip}."))
        return
    with guarded("drawing rank and alpha effects"):
        params = {}
        c = st.columns(2)
        widget(RANK_ALPHA, "model", inputs, params, "ra_model", container=c[0])
        # runs of different data, steps or seed do not belong on one line: one set at a time
        # (learning rates differ by method on purpose: LoRA takes a larger one)
        settings = RANK_ALPHA.options("setting", inputs, params)
        if len(settings) > 1:
            widget(RANK_ALPHA, "setting", inputs, params, "ra_settings")
        else:
            params["setting"] = settings[0]
        widget(RANK_ALPHA, "metric", inputs, params, "ra_metric", container=c[1])
        res = result(RANK_ALPHA, inputs, params)
        result_answer(res, container=head)
        keys = ["ra_rank", "ra_alpha", "ra_norm_alpha", "ra_norm_rank", "ra_frontier", "ra_cost"]
        for i in range(0, len(res.figures), 2):
            for j, (column, fig) in enumerate(zip(st.columns(2), res.figures[i:i + 2])):
                with column:
                    chart(fig, key=keys[i + j] if i + j < len(keys) else f"ra_fig{i + j}",
                          how_to_read=reading(res, i + j))
        if res.text:
            st.caption(plain(res.text))
    next_question("spectra", "Next: what did LoRA learn compared with full fine-tuning? (Spectra)")
    next_question("params", "How many parameters does each rank train? (Parameter savings)",
                  icon=":material/calculate:")


page()
