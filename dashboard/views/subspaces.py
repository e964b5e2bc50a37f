"""Subspaces: φ heatmaps (rank vs rank, seed vs seed, LoRA vs full FT), ΔW versus W0, the amplification table,
and intruder dimensions versus ε for LoRA and full fine-tuning (registered analyses similarity, base_overlap,
amplification and intruders: the report shows the same)."""

import streamlit as st

from dashboard.analyses import inputs_with, result, show, widget
from dashboard.common import (answers_box, chart, download_csv, guarded, next_question, page_question, question,
                              reading, result_answer, table)
from dashboard.jobs_ui import job_panel
from dashboard.runs import (all_runs, completed, empty_store_message, follow_default, kept_adapters, latest_sweep,
                            run_label, spread)
from dashboard.plain_text import plain
from lora_analysis import jobs
from lora_analysis.analysis import registry

SIMILARITY, BASE, AMPLIFICATION, INTRUDERS = (registry.get(n) for n in
                                               ("similarity", "base_overlap", "amplification", "intruders"))
# Each run costs an SVD per module (about 1.7 s for a tiny-gpt run): the page opens on at most this many,
# spread over the ranks, and the user may add more up to MAX_RUNS.
DEFAULT_RUNS = 8
MAX_RUNS = 24


def choose_runs(runs, default, key: str, label: str, help: str) -> list:
    """A multiselect of ``runs`` opening on ``default`` (a new sweep replaces a stale choice), at most MAX_RUNS."""
    labels = {run_label(r): r for r in runs}
    follow_default(key, list(labels), [run_label(r) for r in default])
    chosen = st.multiselect(label, list(labels), key=key, max_selections=MAX_RUNS, help=help)
    return [labels[k] for k in chosen]


def sweep_text(runs, shown) -> str:
    """Which sweep the runs come from, and how many of its runs are shown."""
    sweep = next((r.sweep_id for r in runs if r.sweep_id), None)
    where = f"the newest sweep ({sweep}, {runs[0].model})" if sweep else "the runs not in any sweep"
    if len(shown) == len(runs):
        return f"Opens on all {len(runs)} runs of {where}."
    return (f"Opens on {len(shown)} of the {len(runs)} runs of {where}, spread over its ranks (each run takes "
            f"one SVD per module); add others above, up to {MAX_RUNS}.")


def adapters_beside() -> dict:
    """Adapters read on the Spectra page in this session, to set beside the runs: {label: (updates, key)}.
    The user may leave any of them out."""
    kept = {k.label: k for k in kept_adapters().values()}
    if not kept:
        return {}
    chosen = st.multiselect("Adapters from the Spectra page (uploaded or typed there, with their base if given)",
                            list(kept), default=list(kept), key="sub_adapters",
                            help="Each appears as one more subject beside the runs: φ with any run, ΔW versus "
                                 "W0 and intruders when its base was given")
    return {label: (kept[label].updates, kept[label].key) for label in chosen}


def similarity_section(runs, head, extra=None) -> None:
    st.subheader(SIMILARITY.title)
    st.caption(plain(SIMILARITY.question))
    if len(runs) + len(extra or {}) < 2:
        st.info("φ compares two runs: add a second run.")
        return
    inputs = inputs_with(runs, extra)
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
        result_answer(res, container=head)
        left, right = st.columns([3, 2])
        with left:
            chart(res.figures[0], key="sub_phi", how_to_read=reading(res, 0))
        with right:
            table(res.tables[0][1], "subspace-similarity", key="sub_phi_table")
    if g.failed:
        return
    seeds = {labels[n].config.get("seed") for n in lora}
    if len(seeds) < 2:
        with st.expander("Seed versus seed"):
            st.write("Two runs of the same rank from different seeds show how much of a LoRA subspace is "
                     "reproducible. Add a second-seed run of the chosen first run:")
            is_lora = first in labels and labels[first].method == "lora"     # an adapter has no run to repeat
            if st.button("Run it with seed 1", key="sub_seed", disabled=not is_lora,
                         help=None if is_lora else "choose a LoRA run of the store as the first run"):
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


def base_section(runs, head, extra=None) -> None:
    st.subheader(BASE.title)
    st.caption(plain(f"{BASE.question} {AMPLIFICATION.question}"))
    inputs = inputs_with(runs, extra)
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
    result_answer(amp, container=head)
    left, right = st.columns(2)
    with left:
        chart(overlap.figures[0], key="base_overlap", how_to_read=reading(overlap, 0))
    with right:
        chart(amp.figures[0], key="amp_bars", how_to_read=reading(amp, 0))
    for i, fig in enumerate(amp.figures[1:], start=1):
        chart(fig, key="amp_table" if i == 1 else f"amp_fig{i}", how_to_read=reading(amp, i))
    if hasattr(amp.value, "to_csv"):        # the table's numbers, unrounded
        download_csv(amp.value, "amplification", key="amp_frame")


def intruder_section(runs, head, extra=None) -> None:
    st.subheader(INTRUDERS.title)
    st.caption(plain(INTRUDERS.question))
    newest = latest_sweep(runs)
    default = spread(newest, DEFAULT_RUNS)
    chosen = choose_runs(runs, default, "intr_runs", "Runs compared", "Each run costs one SVD per module")
    st.caption(plain(sweep_text(newest, default)))
    if not chosen and not extra:
        st.info("Choose at least one run.", icon=":material/info:")
        return
    inputs = inputs_with(chosen, extra)
    with guarded("counting intruders"):
        reason = INTRUDERS.skip_reason(inputs)
        if reason:
            st.info(plain(f"{reason[0].upper()}{reason[1:]}."), icon=":material/info:")
            return
        params = {}
        widget(INTRUDERS, "k", inputs, params, "intr_k", max_value=50)
        res = result(INTRUDERS, inputs, params)
        result_answer(res, container=head)
        show(res, "intr", tables=False)
        table(res.tables[0][1], "intruders-per-run", key="intr_table")
        if len(res.tables) > 1:
            with st.expander("Intruders per module"):
                table(res.tables[1][1], "intruders-per-module", key="intr_modules")


def page() -> None:
    question("Subspaces", page_question("subspaces", "What did LoRA learn compared with full fine-tuning?"))
    head = answers_box()       # the answers of the sections below, once computed
    runs = completed(all_runs())
    if not runs:
        empty_store_message()
        return
    # φ and W0 compare one run or one pair: any run may be chosen, but a large store opens on a few
    default = runs if len(runs) <= DEFAULT_RUNS else spread(latest_sweep(runs), DEFAULT_RUNS)
    with st.expander(f"Runs compared on this page ({len(runs)} completed runs in the store)"):
        chosen = choose_runs(runs, default, "sub_runs", "Runs compared (subspace similarity, ΔW versus W0)",
                             "The choices of the two sections below")
        if len(runs) > DEFAULT_RUNS:
            st.caption(plain(sweep_text(latest_sweep(runs), default)))
        extra = adapters_beside()
    similarity_section(chosen, head, extra)
    base_section(chosen, head, extra)
    intruder_section(runs, head, extra)
    next_question("merge", "Next: is my merged model the same model? (Merge equivalence)")


page()
