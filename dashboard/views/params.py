"""Parameter savings: what LoRA trains, per rank, for a preset, an uploaded config or one matrix."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.common import (MAX_JSON_BYTES, answer, answers_box, chart, fmt_bytes, guarded, next_question,
                              question, read_json_upload, table, uploader)
from lora_analysis import params as P
from lora_analysis import runstore
from lora_analysis.training.restore import task_for_run
from lora_analysis.plots.params import plot_lora_diagram, plot_memory, plot_percent_vs_rank, plot_trainable_vs_rank

RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
SEED_EXAMPLES = [(5, 5, 1), (10, 10, 1), (1000, 1000, 2), (512, 64, 8)]
RUN_PREFIX = "run:"


@st.cache_data(show_spinner="Counting parameters…", max_entries=64)
def cached_rank_table(source: str, config_json: str, targets: tuple[str, ...], ranks: tuple[int, ...],
                      dtype: str) -> pd.DataFrame:
    return P.rank_table(build(source, config_json), list(targets), list(ranks), dtype)


@st.cache_data(max_entries=64)
def cached_modules(source: str, config_json: str) -> list[str]:
    return P.adaptable_module_names(build(source, config_json))


@st.cache_data(max_entries=64)
def cached_module_table(source: str, config_json: str, targets: tuple[str, ...], rank: int) -> pd.DataFrame:
    return P.lora_parameter_count(build(source, config_json), list(targets), rank).modules


def build(source: str, config_json: str):
    # a fresh model each call: apply_lora mutates it, so it is never shared
    if source.startswith(RUN_PREFIX):
        return task_for_run(runstore.read_run(source[len(RUN_PREFIX):])).build_model()
    return P.build_preset(source) if source else P.build_from_config_dict(json.loads(config_json))


def page() -> None:
    question("Parameter savings", "How many parameters and how much memory does LoRA save?")
    head = answers_box()        # the answer, once counted
    st.caption("LoRA trains r·(d+k) values per adapted d×k weight instead of d·k. Counts are exact: presets are "
               "built from their shapes on PyTorch's meta device (nothing is downloaded or allocated) and "
               "totals include the LoRA parameters, as PEFT's print_trainable_parameters does.")
    mode = st.radio("Count for", ["Preset architecture", "Hugging Face config.json", "A run's model", "One matrix"],
                    horizontal=True, key="params_mode")
    if mode == "One matrix":
        return matrix_mode(head)

    source, config_json, run_rank, run_name = "", "", None, ""
    if mode == "Preset architecture":
        source = st.selectbox("Architecture", sorted(P.PRESETS), index=sorted(P.PRESETS).index("llama-2-7b"),
                              key="params_preset")
        default_targets = P.DEFAULT_TARGETS[source]
    elif mode == "A run's model":
        runs = {f"{r.model} · {r.name} · {r.id[-6:]}": r for r in runstore.list_runs()}
        if not runs:
            st.info("No runs yet: run the quick demo on Home or launch one on Fine-tune.")
            return
        run = runs[st.selectbox("Run", list(runs), key="params_run")]
        source = RUN_PREFIX + str(run.dir)
        run_name = f"{run.model} (run {run.name})"
        targets = run.config.get("targets")
        run_rank = int(run.config["rank"]) if run.method == "lora" and run.config.get("rank") else None
        default_targets = None if targets in (None, "all-linear") or isinstance(targets, str) else list(targets)
    else:
        upload = uploader("config.json of any Hugging Face model", MAX_JSON_BYTES, type=["json"],
                          key="params_config", what="(JSON only)")
        if upload is None:
            st.info("Upload a config.json (JSON only) to count its parameters.")
            return
        with guarded("reading the config") as g:
            config_json = json.dumps(read_json_upload(upload, "config.json"))
        if g.failed:
            return
        default_targets = None

    with guarded("building the model's shapes") as g:
        names = cached_modules(source, config_json)
    if g.failed:
        return
    defaults = [t for t in (default_targets or ["q_proj", "v_proj", "query", "value", "c_attn"]) if t in names]
    if not defaults and source.startswith(RUN_PREFIX):
        defaults = names          # mlp-digits adapts every Linear
    col1, col2, col3 = st.columns([3, 3, 1])
    # one widget per model (per run, per uploaded config): module names differ, so a choice must not carry over
    widget = (f"run:{Path(source[len(RUN_PREFIX):]).name}" if source.startswith(RUN_PREFIX) else source) or \
        f"config:{hashlib.sha1(config_json.encode()).hexdigest()[:12]}"
    targets = col1.multiselect("Target modules", names, default=defaults or names[:1],
                               key=f"params_targets:{widget}")
    # a run's model opens on the run's own rank: the count then is the one the run trained
    extra = {run_rank} if run_rank else set()
    own = f":{widget}" if run_rank else ""
    ranks = col2.multiselect("Ranks", sorted(set(RANKS) | extra), default=sorted({1, 2, 4, 8, 16, 32, 64} | extra),
                             key=f"params_ranks{own}")
    dtype = col3.selectbox("Training dtype", ["bfloat16", "float16", "float32"], key="params_dtype")
    if not targets or not ranks:
        st.warning("Choose at least one target module and one rank.")
        return
    with guarded("counting parameters"):
        ranks_table = cached_rank_table(source, config_json, tuple(targets), tuple(sorted(ranks)), dtype)
        focus = next((r for r in (run_rank, 8) if r in list(ranks_table["rank"])), int(ranks_table["rank"].iloc[0]))
        chosen = st.select_slider("Rank for the details below", options=list(ranks_table["rank"]), value=focus,
                                  key=f"params_rank{own}")
        row = ranks_table.set_index("rank").loc[chosen]
        c = st.columns([1, 1.3, 0.9, 0.9])
        c[0].metric("Trainable (LoRA)", f"{int(row.trainable_params):,}")
        c[1].metric("All parameters", f"{int(row.total_params):,}")
        c[2].metric("Trainable share", f"{row.trainable_percent:.4f} %")
        c[3].metric("Adapter file (fp32)", fmt_bytes(row.adapter_bytes))
        left, right = st.columns(2)
        with left:
            chart(plot_trainable_vs_rank(ranks_table))
        with right:
            chart(plot_percent_vs_rank(ranks_table))
        mem = P.estimate_training_memory(int(row.base_params), int(row.trainable_params), dtype)
        left, right = st.columns([2, 3])
        with left:
            chart(plot_memory(mem.table))
            st.caption(f"Full fine-tuning needs {mem.ratio:.1f}× the memory of LoRA at r={chosen} "
                       f"(weights, gradients, AdamW states; activations excluded: they depend on batch and "
                       f"sequence length and are similar for both).")
        with right:
            modules = cached_module_table(source, config_json, tuple(targets), int(chosen))
            st.markdown(f"**Per-module table at r={chosen}** ({len(modules)} modules)")
            table(modules, f"lora-modules-r{chosen}", key="params_modules", height=360,
                  column_config={"ratio": st.column_config.NumberColumn(format="%.1f×")})
        st.download_button("Download the rank table (CSV)", ranks_table.to_csv(index=False), "lora_rank_table.csv",
                           "text/csv", key="params_csv", icon=":material/download:", on_click="ignore")
        what = source[len(RUN_PREFIX):] if source.startswith(RUN_PREFIX) else source or "the uploaded config"
        what = run_name if source.startswith(RUN_PREFIX) else what
        answer(f"At r={chosen}, LoRA on {', '.join(targets)} of {what} trains {int(row.trainable_params):,} of "
               f"{int(row.total_params):,} parameters ({row.trainable_percent:.4g} %); full fine-tuning needs "
               f"{mem.ratio:.1f}× LoRA's training memory ({dtype} weights, gradients and AdamW states).",
               "Counted exactly from the module shapes: r·(d+k) trainable values per adapted d×k weight; memory "
               "is weights + gradients + AdamW's two states in the chosen dtype, activations excluded.",
               container=head)
    next_question("finetune", "Next: train LoRA and full fine-tuning and compare them (Fine-tune)")


def matrix_mode(head) -> None:
    c = st.columns(3)
    out_f = c[0].number_input("d (out features)", 1, 1_000_000, 1000, key="params_d")
    in_f = c[1].number_input("k (in features)", 1, 1_000_000, 1000, key="params_k")
    rank = c[2].number_input("rank r", 1, 100_000, 2, key="params_r")
    with guarded("counting"):
        res = P.matrix_savings(int(out_f), int(in_f), int(rank))
        m = st.columns(3)
        m[0].metric("Full fine-tuning (d·k)", f"{res['full_params']:,}")
        m[1].metric("LoRA (r·(d+k))", f"{res['lora_params']:,}")
        m[2].metric("Fewer values", f"{res['ratio']:.4g}×", f"-{res['percent_fewer']:.1f} %", delta_color="inverse")
        chart(plot_lora_diagram(int(out_f), int(in_f), int(rank)))
        answer(f"A {int(out_f)}×{int(in_f)} weight at r={int(rank)} trains {res['lora_params']:,} values instead of "
               f"{res['full_params']:,}: {res['ratio']:.4g}× fewer.", "r·(d+k) values for B (d×r) and A (r×k), "
               "against d·k for the whole weight.", container=head)
    st.markdown("**The seeds' examples, recomputed**")
    table(pd.DataFrame([P.matrix_savings(d, k, r) for d, k, r in SEED_EXAMPLES]).assign(
        shape=lambda t: t["shape"].map(lambda s: f"{s[0]}×{s[1]}")), "lora-matrix-examples", key="params_examples",
        width="content")


page()
