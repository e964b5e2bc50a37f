"""Spectra: singular values of ΔW per module, energy, effective/stable rank by layer, LoRA ranks versus full
fine-tuning, and rank advice exported as a PEFT LoraConfig (registered analyses spectra_sweep, spectra and
rank_advice: the report shows the same)."""

import json
from pathlib import Path

import streamlit as st

from dashboard.analyses import inputs_for, inputs_key, inputs_with, result, show, show_tables, stream_base, widget
from dashboard.common import (MAX_UPLOAD_BYTES, answer, answers_box, chart, guarded, next_question, page_question,
                              question, reading, result_answer, scratch_dir, table, uploader)
from dashboard.runs import (Kept, all_runs, completed, describe_adapter, digest_of, empty_store_message,
                            follow_default, keep, kept_adapters, latest_sweep, module_names_for, read_typed_adapter,
                            read_uploaded_adapter, run_label)
from dashboard.plain_text import plain
from dashboard.typed_paths import (adapter_files, allowed_roots_text, base_files, resolve_adapter_path,
                                   resolve_base_path, version_of)
from lora_analysis.analysis import registry
from lora_analysis.analysis.history import history_answer, largest_modules
from lora_analysis.analysis.spectra import relative_norm_total
from lora_analysis.analysis.sources import adapter_shapes, load_base_weights, updates_from_adapter
from lora_analysis.lora.adapter_io import Adapter
from lora_analysis.plots.training import plot_spectra_history
from lora_analysis.store.runs import HISTORY_FILE

SWEEP, SPECTRA, ADVICE = (registry.get(n) for n in ("spectra_sweep", "spectra", "rank_advice"))
SIMILARITY, BASE, AMPLIFICATION, INTRUDERS = (registry.get(n) for n in
                                               ("similarity", "base_overlap", "amplification", "intruders"))


def show_module_spectra(inputs, run: str, key: str, cache_key: tuple | None = None, head=None) -> None:
    """The spectra analysis of one run (or upload): its answer (in ``head`` when given), spectrum and energy
    side by side, the heatmap (or bars) below, then the table."""
    chosen = {"run": run}
    widget(SPECTRA, "normalized", inputs, chosen, f"{key}_norm")
    widget(SPECTRA, "heatmap", inputs, chosen, f"{key}_metric", kind="segmented")
    res = result(SPECTRA, inputs, chosen, cache_key)
    result_answer(res, container=head)
    left, right = st.columns(2)
    for i, fig in enumerate(res.figures):
        with (left if i == 0 else right if i == 1 else st.container()):
            chart(fig, key=f"{key}_{['sv', 'energy', 'heat'][i] if i < 3 else i}", how_to_read=reading(res, i))
    show_tables(res, key)


def advice_section(inputs, run: str, key: str, cache_key: tuple | None = None) -> None:
    st.subheader(ADVICE.title)
    st.caption(plain(ADVICE.question))
    c = st.columns([2, 1, 1])
    chosen = {"run": run}
    widget(ADVICE, "energy", inputs, chosen, f"{key}_energy_share", container=c[0])
    widget(ADVICE, "max_rank", inputs, chosen, f"{key}_max_rank", container=c[2], kind="number")
    widget(ADVICE, "alpha_mode", inputs, chosen, f"{key}_alpha_mode", container=c[1], kind="radio")
    with guarded("computing rank advice"):
        res = result(ADVICE, inputs, chosen, cache_key)
        result_answer(res)
        (caption, advice), = res.tables
        left, right = st.columns([3, 2])
        table(advice, "rank-advice", key=f"{key}_table", container=left)
        with right:
            st.code(res.code, language="python")
            st.download_button("Download LoraConfig (JSON)", json.dumps(res.value.config, indent=2),
                               "lora_config.json", "application/json", key=f"{key}_dl")


def runs_view(head) -> None:
    runs = completed(all_runs())
    if not runs:
        empty_store_message()
        return
    labels = {run_label(r): r for r in runs}
    default = [run_label(r) for r in latest_sweep(runs)]
    follow_default("spectra_runs", list(labels), default)     # a new sweep replaces a stale selection
    chosen = st.multiselect("Runs", list(labels), key="spectra_runs",
                            help="Opens on the newest sweep's runs")
    if not chosen:
        st.warning("Choose at least one run.")
        return
    inputs = inputs_for([labels[k] for k in chosen])

    st.subheader(SWEEP.title)
    answered = False        # the sweep's answer heads the page; else the chosen run's
    with guarded("computing the spectra") as g:
        reason = SWEEP.skip_reason(inputs)
    if g.failed:
        return
    if reason:
        st.caption(plain(f"{reason[0].upper()}{reason[1:]}."))
    else:
        params = {}
        widget(SWEEP, "module", inputs, params, "spectra_module")
        widget(SWEEP, "normalized", inputs, params, "sweep_norm")
        with guarded("comparing the spectra"):
            res = result(SWEEP, inputs, params)
            answered = result_answer(res, container=head)
            chart(res.figures[0], key="sweep_chart", how_to_read=reading(res, 0))
            if res.text:
                st.info(plain(res.text), icon=":material/insights:")

    st.subheader("Per module")
    label = widget(SPECTRA, "run", inputs, {}, "spectra_run_detail")
    with guarded("computing the spectra"):
        show_module_spectra(inputs, label, "run", head=None if answered else head)
    advice_section(inputs, label, "run_advice")
    with guarded("reading the spectra recorded during training"):
        history_section(inputs.run(label))


@st.cache_data(max_entries=16, show_spinner="Reading the spectra recorded during training…")
def spectra_history_of(run_id: str, version: int, _run):
    return _run.spectra_history()


def history_section(run) -> None:
    """How the chosen run's ΔW grew step by step (its spectra_history.csv: runs our trainer made, and runs
    recorded by lora_analysis.training.callback in a Trainer or a loop of one's own); a one-line note when
    the run recorded none."""
    path = run.dir / HISTORY_FILE if run is not None else None
    if path is None or not path.is_file():
        if run is not None:
            st.caption("This run recorded no spectra during training (full fine-tuning, or a run made before "
                       "spectra over training were recorded).")
        return
    history = spectra_history_of(run.id, path.stat().st_mtime_ns, run)
    if history is None or not len(history):
        st.caption("This run's spectra history holds no readable rows.")
        return
    st.subheader("How the spectrum grew during training")
    st.caption(plain("How did each module's update ΔW grow step by step: in effective rank (how many directions "
                     "share its energy) and in size ‖ΔW‖_F? Recorded every few steps from the factored SVD, "
                     "never a dense ΔW."))
    modules = sorted(history["module"].unique())
    chosen = st.multiselect("Modules", modules, default=largest_modules(history, 6), max_selections=12,
                            key=f"spectra_history_modules_{run.id}",
                            help="Opens on the modules whose ΔW is largest at the last recorded step")
    text, rule = history_answer(history)
    answer(text, rule)
    if not chosen:
        st.warning("Choose at least one module.")
        return
    chart(plot_spectra_history(history, chosen), key="spectra_history_chart",
          how_to_read="each line is one module. Top: the effective rank of its ΔW (0 while ΔW = 0, at most r); "
                      "a line that climbs means the update spreads over more directions. Bottom: ‖ΔW‖_F, how far "
                      "the weights moved from W0.")


# ---- an adapter (uploaded or typed), its optional base, and runs beside it ---------------------------------
#
# An adapter read here is kept in the session (KEPT, by its content hash) with its base weights, so it is still
# there after a visit to another page, and the Subspaces page can set it beside the runs too.

BASE_CHOICES = ("No base", "Upload W0 (.safetensors)", "A base on this machine (folder or .safetensors)")


def one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def with_base(kept: Kept, weights: dict, described: str, key: str) -> None:
    """The adapter's updates with W0 from ``weights`` ({module: tensor}); ValueError when they do not fit."""
    kept.updates = updates_from_adapter(kept.adapter, weights)
    kept.base, kept.base_key = described, key


def _fan_in_fan_out(adapter: Adapter) -> bool:
    return bool(adapter.raw_config.get("fan_in_fan_out", False))


@st.cache_resource(max_entries=8, show_spinner="Reading the base weights…")
def uploaded_base(digest: str, key: str, _adapter: Adapter, _data: bytes) -> dict:
    with scratch_dir() as tmp:
        path = Path(tmp) / "base.safetensors"
        path.write_bytes(_data)
        try:
            return load_base_weights(path, adapter_shapes(_adapter), _fan_in_fan_out(_adapter))
        except ValueError as exc:
            raise ValueError(str(exc).replace(str(path), "the uploaded base").replace(tmp, "the upload")) from exc


def base_input(kept: Kept) -> None:
    """The optional base weights W0 of ``kept``: none, an uploaded .safetensors, or a typed path. With a base,
    the analyses that compare ΔW with W0 run on the adapter too. A base that does not fit is one error line."""
    choices = list(BASE_CHOICES)
    was = choices.index(kept.base.split(":", 1)[0]) if kept.base.split(":", 1)[0] in choices else 0
    choice = st.radio("Base weights W0 (optional: amplification, intruders, ΔW versus W0, ‖ΔW‖/‖W0‖)", choices,
                      index=was, horizontal=True, key=f"spectra_base_src_{kept.source}",
                      help="The weights the adapter was trained on: a .safetensors file of W0 (keys <module>.weight) "
                           "or a Hugging Face model folder. Only the adapted modules' weights are read.")
    if choice == BASE_CHOICES[0]:
        if kept.base:
            kept.updates, kept.base, kept.base_key = updates_from_adapter(kept.adapter), "", ""
        return
    with guarded("reading the base weights") as g:
        if choice == BASE_CHOICES[1]:
            upload = uploader("W0 of the adapted modules as one .safetensors file", MAX_UPLOAD_BYTES,
                              type=["safetensors"], key=f"spectra_base_upload_{kept.source}",
                              more="Larger bases: type their folder instead, or use the CLI (--base).")
            if upload is None:
                if kept.base.startswith(choice):
                    st.caption(plain(f"Using the base uploaded earlier ({kept.base.split(': ', 1)[-1]})."))
                else:
                    st.info("Upload the base weights W0 (.safetensors) to compare ΔW with them.")
                return
            data = upload.getvalue()
            key = digest_of(data)
            if kept.base_key != key:
                try:
                    weights = uploaded_base(kept.digest, key, kept.adapter, data)
                    with_base(kept, weights, f"{choice}: {upload.name}", key)
                except ValueError as exc:
                    raise ValueError(one_line(exc)) from exc
        else:
            earlier = kept.base.split(": ", 1)[-1] if kept.base.startswith(choice) else ""
            typed = st.text_input("Base weights on this machine: a .safetensors file or a model folder",
                                  value=earlier, key=f"spectra_base_path_{kept.source}", placeholder="./base-model",
                                  help="Inside " + allowed_roots_text() + ". Safetensors only; pickled .bin files "
                                       "are never loaded.")
            if not typed.strip():
                st.info("Type the base model's folder or a .safetensors file of W0.")
                return
            path = resolve_base_path(typed)
            key = f"{path}:{version_of(base_files(path))}"
            if kept.base_key != key:
                try:        # W0 read module by module under a progress bar; none of it is kept
                    kept.updates, kept.base_read = stream_base(kept.adapter, path)
                    kept.base, kept.base_key = f"{choice}: {typed.strip()}", key
                except ValueError as exc:
                    raise ValueError(one_line(exc)) from exc
            if kept.base_read:
                st.caption(plain(kept.base_read))
    if g.failed:        # the adapter is still shown, without W0
        kept.updates, kept.base, kept.base_key, kept.base_read = updates_from_adapter(kept.adapter), "", "", ""


def adapter_inputs(kept: Kept, runs=()) -> registry.Inputs:
    """The adapter (and ``runs`` beside it), keyed for the caches by content."""
    return inputs_with(list(runs), {kept.label: (kept.updates, kept.key)})


def w0_sections(kept: Kept, head) -> None:
    """What needs W0, on the adapter: ‖ΔW‖/‖W0‖, ΔW versus W0, amplification and intruders."""
    st.subheader("Against the base weights W0")
    inputs = adapter_inputs(kept)
    spectra = inputs.spectra(kept.label)
    rel = spectra.set_index("name")["relative_norm"] if "relative_norm" in spectra.columns else None
    if rel is not None and rel.notna().any():
        total = relative_norm_total(spectra)
        st.markdown(plain(f"‖ΔW‖_F / ‖W0‖_F over the {len(spectra)} adapted modules: {total:.3g} "
                          f"(per module {rel.min():.3g} to {rel.max():.3g}; column relative_norm above)."))
    label = kept.label
    with guarded("comparing ΔW with W0"):
        st.markdown(f"**{BASE.title}**")
        st.caption(plain(BASE.question))
        params = {"run": label}
        widget(BASE, "module", inputs, params, "adapter_base_module")
        overlap = result(BASE, inputs, params, kept.key)
        chart(overlap.figures[0], key="adapter_base_overlap", how_to_read=reading(overlap, 0))
    with guarded("computing the amplification"):
        st.markdown(f"**{AMPLIFICATION.title}**")
        st.caption(plain(AMPLIFICATION.question))
        amp = result(AMPLIFICATION, inputs, {"run": label}, kept.key)
        result_answer(amp, container=head)
        chart(amp.figures[0], key="adapter_amp_bars", how_to_read=reading(amp, 0))
        table(amp.value, "amplification", key="adapter_amp_table")
    with guarded("counting intruders"):
        st.markdown(f"**{INTRUDERS.title}**")
        st.caption(plain(INTRUDERS.question))
        params = {}
        widget(INTRUDERS, "k", inputs, params, "adapter_intr_k", max_value=50)
        intr = result(INTRUDERS, inputs, params, kept.key)
        result_answer(intr, container=head)
        show(intr, "adapter_intr", tables=False)
        table(intr.tables[1][1], "intruders-per-module", key="adapter_intr_modules")


def shares_modules(kept: Kept, run) -> bool:
    return not module_names_for(run).isdisjoint(kept.updates)


def compare_section(kept: Kept) -> None:
    """The adapter beside runs of the store: φ between it and a chosen run, and the spectra across ranks."""
    st.subheader("Compare with runs")
    runs = [r for r in completed(all_runs()) if shares_modules(kept, r)]
    if not runs:
        st.caption(plain(f"No completed run of the store adapts a module named as the adapter's "
                         f"({', '.join(list(kept.updates)[:4])}{' …' if len(kept.updates) > 4 else ''}): nothing "
                         "to compare it with."))
        return
    labels = {run_label(r): r for r in runs}
    chosen = st.multiselect("Runs beside the adapter", list(labels), default=list(labels)[:1],
                            key="adapter_cmp_runs", max_selections=24,
                            help="Runs of the store that adapt modules of the same names")
    if not chosen:
        st.info("Choose a run to compare the adapter with.", icon=":material/info:")
        return
    inputs = adapter_inputs(kept, [labels[c] for c in chosen])
    key = inputs_key(inputs)
    with guarded("comparing the adapter with the run"):
        st.markdown(f"**{SIMILARITY.title}**")
        st.caption(plain(SIMILARITY.question))
        reason = SIMILARITY.skip_reason(inputs)
        if reason:
            st.caption(plain(f"{reason[0].upper()}{reason[1:]}."))
        else:
            params = {"first": kept.label}
            c = st.columns(3)
            c[0].markdown(plain(f"First: {kept.label}"))
            widget(SIMILARITY, "second", inputs, params, "adapter_sub_b", container=c[1])
            widget(SIMILARITY, "side", inputs, params, "adapter_sub_side", container=c[2])
            widget(SIMILARITY, "module", inputs, params, "adapter_sub_module")
            res = result(SIMILARITY, inputs, params, key)
            result_answer(res)
            left, right = st.columns([3, 2])
            with left:
                chart(res.figures[0], key="adapter_phi", how_to_read=reading(res, 0))
            with right:
                table(res.tables[0][1], "subspace-similarity", key="adapter_phi_table")
    with guarded("comparing the spectra"):
        st.markdown(f"**{SWEEP.title}**")
        reason = SWEEP.skip_reason(inputs)
        if reason:
            st.caption(plain(f"{reason[0].upper()}{reason[1:]}."))
        else:
            params = {}
            widget(SWEEP, "module", inputs, params, "adapter_sweep_module")
            res = result(SWEEP, inputs, params, key)
            chart(res.figures[0], key="adapter_sweep_chart", how_to_read=reading(res, 0))
            if res.text:
                st.caption(plain(res.text))
    if kept.base and INTRUDERS.skip_reason(inputs) is None:
        with guarded("counting intruders"):
            st.markdown(f"**{INTRUDERS.title}: the adapter beside the runs**")
            res = result(INTRUDERS, inputs, {}, key)
            show(res, "adapter_cmp_intr", tables=False)
            table(res.tables[0][1], "intruders-per-run", key="adapter_cmp_intr_table")


def adapter_view(kept: Kept, head) -> None:
    """Everything the page shows for one adapter: spectra, rank advice, with a base what needs W0, and the
    comparison with runs."""
    modules = kept.adapter.modules
    st.success(f"{len(modules)} adapted modules, ranks {sorted({int(m.rank) for m in modules.values()})}.")
    if kept.read:
        st.caption(plain(kept.read))
    base_input(kept)
    inputs = adapter_inputs(kept)
    with guarded("computing the spectra"):
        show_module_spectra(inputs, kept.label, kept.source, kept.key, head=head)
    advice_section(inputs, kept.label, f"{kept.source}_advice", kept.key)
    if kept.base:
        w0_sections(kept, head)
    else:
        st.caption("Give the base weights W0 above to see ‖ΔW‖/‖W0‖, ΔW versus W0, amplification and intruder "
                   "dimensions for this adapter.")
    compare_section(kept)


def latest_kept(source: str) -> Kept | None:
    found = [k for k in kept_adapters().values() if k.source == source]
    return found[-1] if found else None


def upload_view(head) -> None:
    files = uploader("A PEFT adapter (adapter_config.json and adapter_model.safetensors), or one kohya, diffusers or "
                     "loralib .safetensors file (safetensors and JSON only; pickled .bin files are never loaded)",
                     MAX_UPLOAD_BYTES, type=["json", "safetensors"],
                     what="for the two files together", key="spectra_upload", accept_multiple_files=True,
                     more="Larger adapters: python -m lora_analysis spectra ADAPTER_FOLDER.")
    if not files:
        kept = latest_kept("upload")       # the upload of an earlier visit to this page, kept in the session
        if kept is None:
            st.info("Upload the two files of any PEFT LoRA adapter (ours or one PEFT saved).")
            return
        st.caption(plain(f"Showing the adapter uploaded earlier in this session ({kept.label}); upload another to "
                         "replace it."))
    else:
        with guarded("reading the adapter") as g:
            digest = digest_of(*(f.getvalue() for f in sorted(files, key=lambda f: f.name)))
            adapter = read_uploaded_adapter(digest, files)
            kept = keep(Kept("upload", digest, "upload", adapter,
                             read=describe_adapter(adapter, [(f.name, len(f.getvalue())) for f in files])))
        if g.failed:
            return
    adapter_view(kept, head)


def folder_view(head) -> None:
    earlier = latest_kept("folder")
    typed = st.text_input("Adapter on this machine: a PEFT adapter folder (adapter_config.json and "
                          "adapter_model.safetensors) or one .safetensors adapter file",
                          value=earlier.typed if earlier is not None else "",
                          key="spectra_folder", placeholder="./my-adapter",
                          help="A PEFT adapter folder, or a kohya / diffusers / loralib .safetensors file, inside "
                               + allowed_roots_text() + ". Safetensors and JSON only; pickled .bin files are never "
                               "loaded.")
    if not typed.strip():
        st.info("Type the folder of any PEFT LoRA adapter (ours or one PEFT saved), or a .safetensors adapter file.")
        return
    with guarded("reading the adapter") as g:
        path = resolve_adapter_path(typed)         # a folder or a .safetensors file, its files inside the roots
        files = adapter_files(path)
        adapter = read_typed_adapter(str(path), version_of(files))     # a rewritten adapter is read again
        digest = digest_of(*(f.read_bytes() for f in files))
        read = describe_adapter(adapter, [(f.name, f.stat().st_size) for f in files],
                                str(path if path.is_dir() else path.parent))
        kept = keep(Kept(path.name or "folder", digest, "folder", adapter, typed=typed.strip(), read=read))
    if g.failed:
        return
    adapter_view(kept, head)


def page() -> None:
    question("Spectra", page_question("spectra", "What did LoRA learn compared with full fine-tuning?"))
    head = answers_box()       # the answer, once the chosen runs are analysed
    st.caption("Singular values of the learned update ΔW per module. LoRA updates are never formed densely: "
               "QR of B and Aᵀ and an r×r SVD give the same values and directions. Full fine-tuning's "
               "ΔW = W_ft − W0 is dense.")
    sources = ["Runs in the store", "Upload a PEFT adapter", "An adapter folder on this machine"]
    # back from another page, the page opens on the source last shown (an adapter of this session stays there)
    last = st.session_state.get("_spectra_src_last", sources[0])
    source = st.radio("Source", sources, index=sources.index(last) if last in sources else 0, horizontal=True,
                      key="spectra_src")
    st.session_state["_spectra_src_last"] = source
    if source == "Runs in the store":
        runs_view(head)
    elif source == "Upload a PEFT adapter":
        upload_view(head)
    else:
        folder_view(head)
    next_question("subspaces", "Next: are LoRA's directions the ones full fine-tuning found? (Subspaces)")
    next_question("rank_alpha", "Which rank should I use? (Rank & alpha effects)", icon=":material/tune:")


page()
