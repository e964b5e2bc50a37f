"""Subspaces: φ heatmaps (rank vs rank, seed vs seed, LoRA vs full FT), two adapters side by side (each a run,
an upload or a path on this machine, optionally with their base model streamed module by module), ΔW versus
W0, the amplification table, and intruder dimensions versus ε for LoRA and full fine-tuning (registered
analyses similarity, base_overlap, amplification and intruders: the report shows the same)."""

from dataclasses import dataclass, field

import plotly.graph_objects as go
import streamlit as st

from dashboard.analyses import inputs_with, result, show, stream_base, widget
from dashboard.common import (MAX_UPLOAD_BYTES, answers_box, chart, download_csv, guarded, next_question,
                              page_question, question, reading, result_answer, table, uploader)
from dashboard.jobs_ui import job_panel
from dashboard.runs import (all_runs, base_model_of, completed, describe_adapter, digest_of, empty_store_message,
                            follow_default, kept_adapters, latest_sweep, read_typed_adapter, read_uploaded_adapter,
                            run_label, spread)
from dashboard.plain_text import plain
from dashboard.typed_paths import (adapter_files, allowed_roots_text, base_files, resolve_adapter_path,
                                   resolve_base_path, version_of)
from lora_analysis import jobs
from lora_analysis.analysis import registry
from lora_analysis.analysis.sources import updates_from_adapter
from lora_analysis.plots.analysis import plot_similarity_heatmap
from lora_analysis.plots.style import COLORS, apply_style, bounded_axis, safe_label

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


# ---- two adapters side by side ---------------------------------------------------------------------------

PAIR_SOURCES = ("A run in the store", "An upload", "A path on this machine")
PAIR_BASES = "pair_bases"        # session state: {(adapter key, base path, version): (streamed updates, what was read)}
MAX_PAIR_BASES = 4
PAIR_QUESTION = ("Do two adapters on the same base (two seeds, two ranks, two tasks, two recipes) learn the same "
                 "directions? φ per module they share, the numbers python -m lora_analysis similarity FIRST SECOND "
                 "prints.")
PAIR_READING = ("Per module, φ(1, 1) (do the top directions agree?) and the mean φ over all (i, j), against the mean "
                "for random subspaces (max(i, j)/d): bars well above the baseline mark shared directions.")


@dataclass
class Picked:
    """One of the two adapters: a run of the store (``run``), or an adapter read here (``adapter``, its
    ``updates`` and ``key`` for the caches); ``read``: what was read, ``base``: the base model it records."""

    label: str
    run: object = None
    adapter: object = None
    updates: dict = field(default_factory=dict)
    key: tuple = ()
    read: str = ""
    base: str | None = None
    with_base: bool = False          # the updates carry W0 (streamed from a typed base)


def pick_adapter(slot: int, runs) -> Picked | None:
    """Adapter ``slot`` (1 or 2): a run of the store, an upload or a typed path; None until one is given."""
    sources = PAIR_SOURCES if runs else PAIR_SOURCES[1:]
    # adapter 1 opens on a run of the store (when there is one), adapter 2 on a path: nothing is read before asked
    source = st.radio(f"Adapter {slot}", sources, index=0 if slot == 1 else len(sources) - 1, horizontal=True,
                      key=f"pair_src_{slot}")
    if source == PAIR_SOURCES[0]:
        labels = {run_label(r): r for r in runs}
        label = st.selectbox(f"Run {slot}", list(labels), index=min(slot - 1, len(labels) - 1),
                             key=f"pair_run_{slot}")
        return Picked(label, run=labels[label], base=base_model_of(run=labels[label]))
    if source == PAIR_SOURCES[1]:
        files = uploader(f"Adapter {slot}: adapter_config.json and adapter_model.safetensors, or one .safetensors "
                         "adapter file (safetensors and JSON only)", MAX_UPLOAD_BYTES, type=["json", "safetensors"],
                         what="for the files together", key=f"pair_upload_{slot}", accept_multiple_files=True,
                         more="Larger adapters: type their path instead, or use the CLI (similarity).")
        if not files:
            st.info("Upload the adapter's files.")
            return None
        digest = digest_of(*(f.getvalue() for f in sorted(files, key=lambda f: f.name)))
        adapter = read_uploaded_adapter(digest, files)
        read = describe_adapter(adapter, [(f.name, len(f.getvalue())) for f in files])
        return Picked(f"adapter {slot}: upload · {digest[:6]}", adapter=adapter, updates=updates_from_adapter(adapter),
                      key=("adapter", digest), read=read, base=base_model_of(adapter))
    typed = st.text_input(f"Adapter {slot} on this machine: a PEFT adapter folder or a .safetensors file",
                          key=f"pair_path_{slot}", placeholder="./my-adapter",
                          help="Inside " + allowed_roots_text() + ". Safetensors and JSON only; pickled .bin files "
                               "are never loaded.")
    if not typed.strip():
        st.info("Type the adapter's folder (adapter_config.json and adapter_model.safetensors) or its "
                ".safetensors file.")
        return None
    path = resolve_adapter_path(typed)
    files = adapter_files(path)
    version = version_of(files)
    adapter = read_typed_adapter(str(path), version)
    read = describe_adapter(adapter, [(f.name, f.stat().st_size) for f in files],
                            str(path if path.is_dir() else path.parent))
    return Picked(f"adapter {slot}: {path.name} · {digest_of(str(path).encode())[:6]}", adapter=adapter,
                  updates=updates_from_adapter(adapter), key=("path", str(path), version), read=read,
                  base=base_model_of(adapter))


def pair_base(picked: list[Picked]) -> None:
    """The optional base model of the adapters read here: W0 streamed module by module (a progress bar), what
    was read said; the adapters' updates then carry W0 (ΔW versus W0 and intruders below include them)."""
    typed = st.text_input("Base model (optional): a Hugging Face model folder or a .safetensors file of W0",
                          key="pair_base_path", placeholder="./base-model",
                          help="Only the adapted modules' weights are read, one module at a time (safetensors "
                               "only). Inside " + allowed_roots_text() + ".")
    ours = [p for p in picked if p.adapter is not None]
    if not typed.strip() or not ours:
        return
    path = resolve_base_path(typed)
    version = version_of(base_files(path))
    kept = st.session_state.setdefault(PAIR_BASES, {})
    for p in ours:
        key = (p.key, str(path), version)
        if key not in kept:
            with guarded(f"reading the base weights for {p.label}"):
                kept[key] = stream_base(p.adapter, path)
                while len(kept) > MAX_PAIR_BASES:
                    kept.pop(next(iter(kept)))
        if key in kept:
            p.updates, read = kept[key]
            p.key, p.with_base = (*p.key, "base", str(path), version), True
            st.caption(plain(f"{p.label}: {read}"))
    if any(p.run is not None for p in picked):
        st.caption("A run of the store is compared with the base weights kept beside it, not this one.")


def check_pair(first: Picked, second: Picked, inputs) -> None:
    """ValueError when the two cannot be compared (no module in common, shapes that differ); a warning when they
    record different base models."""
    u1, u2 = inputs.updates(first.label), inputs.updates(second.label)
    common = [n for n in u1 if n in u2]

    def names(u) -> str:
        shown = ", ".join(f"'{n}'" for n in list(u)[:3])
        return f"{shown}{f' and {len(u) - 3} more' if len(u) > 3 else ''}"

    if not common:
        raise ValueError(f"{first.label} and {second.label} share no adapted module, so no direction can be "
                         f"compared: the first adapts {names(u1)}, the second {names(u2)}")
    bad = [(n, tuple(u1[n].shape), tuple(u2[n].shape)) for n in common if tuple(u1[n].shape) != tuple(u2[n].shape)]
    if bad:
        n, s1, s2 = bad[0]
        raise ValueError(f"{len(bad)} of the {len(common)} modules both adapt differ in shape (out, in), e.g. '{n}' "
                         f"is {s1} in {first.label} and {s2} in {second.label}: the adapters were trained on "
                         "different base models, and φ compares directions of one and the same space")
    if first.base and second.base and first.base != second.base:
        st.warning(plain(f"{first.label} records the base model {first.base} and {second.label} {second.base}: "
                         "φ compares directions of the same module, which mean the same thing only on the same "
                         "base. The numbers below take them as one."), icon=":material/warning:")
    elif not (first.base and second.base):
        which = "Neither adapter records" if not (first.base or second.base) else \
            f"{(second if first.base else first).label} records no"
        st.caption(plain(f"{which} base model: φ takes the two as trained on the same one."))


def phi_by_module(summary, first: str, second: str, side: str) -> go.Figure:
    """Bars per module of φ(1, 1) and mean φ (``similarity_summary_frame`` rows), the random baseline as marks."""
    names = [safe_label(n if len(n) <= 40 else "…" + n[-39:]) for n in summary["name"]]
    fig = go.Figure([
        go.Bar(x=names, y=summary["phi_top1"], name="φ(1, 1)", marker_color=COLORS["lora"],
               hovertemplate="%{x}<br>φ(1, 1)=%{y:.3f}<extra></extra>"),
        go.Bar(x=names, y=summary["phi_mean"], name="mean φ", marker_color=COLORS["merged"],
               hovertemplate="%{x}<br>mean φ=%{y:.3f}<extra></extra>"),
        go.Scatter(x=names, y=summary["baseline_mean"], name="random subspaces (mean)", mode="markers",
                   marker={"color": COLORS["base"], "symbol": "line-ew-open", "size": 18, "line": {"width": 3}},
                   hovertemplate="%{x}<br>random: %{y:.3g}<extra></extra>")])
    fig.update_layout(barmode="group")
    fig.update_xaxes(title="module")
    fig.update_yaxes(title="φ")
    bounded_axis(fig, "y", 0.0, 1.0)
    return apply_style(fig, f"φ per module: {first} versus {second}", f"directions: {registry.SIDES[side]}")


def pair_section(runs, head) -> dict:
    """Two adapters side by side: φ per module they share, with the CLI's numbers. Returns the adapters read
    here that carry W0 (a base was given), {label: (updates, key)}, for the sections on W0."""
    st.subheader("Two adapters side by side")
    st.caption(plain(PAIR_QUESTION))
    picked: list[Picked | None] = []
    for slot, column in zip((1, 2), st.columns(2)):
        with column:
            pick = None
            with guarded(f"reading adapter {slot}"):
                pick = pick_adapter(slot, runs)
            picked.append(pick)
            if pick is not None and pick.read:
                st.caption(plain(pick.read))
    ready = [p for p in picked if p is not None]
    with guarded("reading the base weights"):
        pair_base(ready)
    with_w0 = {p.label: (p.updates, p.key) for p in ready if p.adapter is not None and p.with_base}
    if len(ready) < 2:
        return with_w0
    first, second = ready
    if first.label == second.label:
        st.info("Both are the same run: choose two different adapters.", icon=":material/info:")
        return with_w0
    inputs = inputs_with([p.run for p in ready if p.run is not None],
                         {p.label: (p.updates, p.key) for p in ready if p.run is None})
    if inputs.duplicates:
        st.info(plain(f"{inputs.duplicates[0]} is a copy of the other run (imported again): the same adapter."),
                icon=":material/info:")
        return with_w0
    with guarded("comparing the two adapters"):
        check_pair(first, second, inputs)
        params = {"first": first.label, "second": second.label}
        c = st.columns(2)
        widget(SIMILARITY, "side", inputs, params, "pair_side", container=c[0])
        widget(SIMILARITY, "module", inputs, params, "pair_module", container=c[1])
        res = result(SIMILARITY, inputs, params, record=False)       # the report has the runs' choice
        result_answer(res)
        summary = res.tables[0][1]
        chart(phi_by_module(summary, first.label, second.label, params["side"]), key="pair_modules",
              how_to_read=PAIR_READING)
        left, right = st.columns([3, 2])
        with left:
            one = res.value.results[params["module"]]
            chart(plot_similarity_heatmap(one.phi, one.d, title=f"Two adapters, φ(i, j): {params['module']}, "
                                          f"{registry.SIDES[params['side']]}", x_label=f"j ({second.label})",
                                          y_label=f"i ({first.label})"), key="pair_phi", how_to_read=reading(res, 0))
        with right:
            table(summary, "adapter-similarity", key="pair_table")
    return with_w0


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
        pair_section([], head)          # two adapters need no run store
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
    extra = {**extra, **pair_section(runs, head)}     # adapters read there, with W0, join the sections on W0
    base_section(chosen, head, extra)
    intruder_section(runs, head, extra)
    next_question("merge", "Next: is my merged model the same model? (Merge equivalence)")


page()
