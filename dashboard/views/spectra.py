"""Spectra: singular values of ΔW per module, energy, effective/stable rank by layer, LoRA ranks versus full
fine-tuning, and rank advice exported as a PEFT LoraConfig (registered analyses spectra_sweep, spectra and
rank_advice: the report shows the same)."""

import json
import os
from pathlib import Path

import streamlit as st

from dashboard.analyses import inputs_for, result, show_tables, widget
from dashboard.common import (MAX_UPLOAD_BYTES, answers_box, chart, guarded, next_question, page_question, question,
                              reading, result_answer, scratch_dir, table, uploader)
from dashboard.runs import all_runs, completed, empty_store_message, follow_default, latest_sweep, run_label
from dashboard.plain_text import plain
from dashboard.typed_paths import allowed_roots_text, inside_allowed, resolve_typed_folder
from lora_analysis.analysis import registry
from lora_analysis.analysis.sources import updates_from_adapter
from lora_analysis.lora import read_adapter

SWEEP, SPECTRA, ADVICE = (registry.get(n) for n in ("spectra_sweep", "spectra", "rank_advice"))


def adapter_from_upload(files) -> dict:
    """Write the two uploaded files to a private temp folder and read them as a PEFT adapter."""
    by_name = {f.name: f for f in files}
    config = next((f for n, f in by_name.items() if n.endswith(".json")), None)
    weights = next((f for n, f in by_name.items() if n.endswith(".safetensors")), None)
    if config is None or weights is None:
        raise ValueError("upload both adapter_config.json and adapter_model.safetensors (got "
                         f"{', '.join(by_name) or 'nothing'})")
    total = sum(len(f.getvalue()) for f in files)
    if total > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload is {total / 2**20:.0f} MiB: use the CLI for adapters over "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    with scratch_dir() as tmp:
        (Path(tmp) / "adapter_config.json").write_bytes(config.getvalue())
        (Path(tmp) / "adapter_model.safetensors").write_bytes(weights.getvalue())
        try:
            return updates_from_adapter(read_adapter(tmp))
        except ValueError as exc:   # name the uploaded files, not our private temp folder
            raise ValueError(str(exc).replace(f"{tmp}{os.sep}", "").replace(tmp, "the upload")) from exc


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


def upload_view(head) -> None:
    files = uploader("A PEFT adapter: adapter_config.json and adapter_model.safetensors (safetensors and JSON only; "
                     "pickled .bin files are never loaded)", MAX_UPLOAD_BYTES, type=["json", "safetensors"],
                     what="for the two files together", key="spectra_upload", accept_multiple_files=True,
                     more="Larger adapters: python -m lora_analysis spectra ADAPTER_FOLDER.")
    if not files:
        st.info("Upload the two files of any PEFT LoRA adapter (ours or one PEFT saved).")
        return
    digest = "|".join(f"{f.name}:{f.size}:{f.file_id}" for f in files)    # identifies the upload for the caches
    with guarded("reading the adapter") as g:
        inputs = registry.Inputs.from_updates({"upload": uploaded_updates(digest, files)})
        spectra = inputs.spectra("upload")
    if g.failed:
        return
    st.success(f"{len(spectra)} adapted modules, ranks {sorted(set(int(r) for r in spectra['rank']))}.")
    show_module_spectra(inputs, "upload", "upload", ("upload", digest), head=head)
    advice_section(inputs, "upload", "upload_advice", ("upload", digest))


@st.cache_resource(max_entries=8, show_spinner="Reading the adapter…")
def uploaded_updates(digest: str, _files) -> dict:
    return adapter_from_upload(_files)


@st.cache_resource(max_entries=8, show_spinner="Reading the adapter…")
def folder_updates(folder: str, version: tuple) -> dict:
    return updates_from_adapter(read_adapter(folder))


def folder_view(head) -> None:
    typed = st.text_input("Adapter folder on this machine (adapter_config.json and adapter_model.safetensors)",
                          key="spectra_folder", placeholder="./my-adapter",
                          help="A PEFT adapter folder inside " + allowed_roots_text() + ". Safetensors and JSON "
                               "only; pickled .bin files are never loaded.")
    if not typed.strip():
        st.info("Type the folder of any PEFT LoRA adapter (ours or one PEFT saved).")
        return
    with guarded("reading the adapter") as g:
        folder = resolve_typed_folder(typed, "adapter folder")
        files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
        if not all(inside_allowed(f) for f in files):     # a link inside the folder may point out of it
            raise ValueError(f"the adapter folder '{typed.strip()}' was refused: its files must lie inside "
                             f"{allowed_roots_text()}")
        if not all(f.is_file() for f in files):
            raise ValueError(f"the adapter folder '{typed.strip()}' holds no adapter_config.json and "
                             "adapter_model.safetensors")
        version = tuple(f.stat().st_mtime_ns for f in files)       # a rewritten adapter is read again
        inputs = registry.Inputs.from_updates({"folder": folder_updates(str(folder), version)})
        spectra = inputs.spectra("folder")
    if g.failed:
        return
    key = ("folder", str(folder), version)
    st.success(f"{len(spectra)} adapted modules, ranks {sorted(set(int(r) for r in spectra['rank']))}.")
    show_module_spectra(inputs, "folder", "folder", key, head=head)
    advice_section(inputs, "folder", "folder_advice", key)


def page() -> None:
    question("Spectra", page_question("spectra", "What did LoRA learn compared with full fine-tuning?"))
    head = answers_box()       # the answer, once the chosen runs are analysed
    st.caption("Singular values of the learned update ΔW per module. LoRA updates are never formed densely: "
               "QR of B and Aᵀ and an r×r SVD give the same values and directions. Full fine-tuning's "
               "ΔW = W_ft − W0 is dense.")
    source = st.radio("Source", ["Runs in the store", "Upload a PEFT adapter", "An adapter folder on this machine"],
                      horizontal=True, key="spectra_src")
    if source == "Runs in the store":
        runs_view(head)
    elif source == "Upload a PEFT adapter":
        upload_view(head)
    else:
        folder_view(head)
    next_question("subspaces", "Next: are LoRA's directions the ones full fine-tuning found? (Subspaces)")
    next_question("rank_alpha", "Which rank should I use? (Rank & alpha effects)", icon=":material/tune:")


page()
