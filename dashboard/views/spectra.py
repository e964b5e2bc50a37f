"""Spectra: singular values of ΔW per module, energy, effective/stable rank by layer, LoRA ranks versus full
fine-tuning, and rank advice exported as a PEFT LoraConfig (registered analyses spectra_sweep, spectra and
rank_advice: the report shows the same)."""

import json
import os
import tempfile
from pathlib import Path

import streamlit as st

from dashboard.analyses import inputs_for, result, show_tables, widget
from dashboard.common import MAX_UPLOAD_BYTES, chart, guarded
from dashboard.runs import all_runs, completed, empty_store_message, latest_sweep, run_label
from dashboard.plain_text import plain
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
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_bytes(config.getvalue())
        (Path(tmp) / "adapter_model.safetensors").write_bytes(weights.getvalue())
        try:
            return updates_from_adapter(read_adapter(tmp))
        except ValueError as exc:   # name the uploaded files, not our private temp folder
            raise ValueError(str(exc).replace(f"{tmp}{os.sep}", "").replace(tmp, "the upload")) from exc


def show_module_spectra(inputs, run: str, key: str, cache_key: tuple | None = None) -> None:
    """The spectra analysis of one run (or upload): spectrum and energy side by side, the heatmap below."""
    chosen = {"run": run}
    left, right = st.columns(2)
    widget(SPECTRA, "normalized", inputs, chosen, f"{key}_norm")
    widget(SPECTRA, "heatmap", inputs, chosen, f"{key}_metric", kind="segmented")
    res = result(SPECTRA, inputs, chosen, cache_key)
    with left:
        chart(res.figures[0], key=f"{key}_sv")
    with right:
        chart(res.figures[1], key=f"{key}_energy")
    chart(res.figures[2], key=f"{key}_heat")
    show_tables(res)


def advice_section(inputs, run: str, key: str, cache_key: tuple | None = None) -> None:
    st.subheader(ADVICE.title)
    st.caption(ADVICE.question)
    c = st.columns([2, 1, 1])
    chosen = {"run": run}
    widget(ADVICE, "energy", inputs, chosen, f"{key}_energy_share", container=c[0])
    widget(ADVICE, "max_rank", inputs, chosen, f"{key}_max_rank", container=c[2], kind="number")
    widget(ADVICE, "alpha_mode", inputs, chosen, f"{key}_alpha_mode", container=c[1], kind="radio")
    with guarded("computing rank advice"):
        res = result(ADVICE, inputs, chosen, cache_key)
        (caption, advice), = res.tables
        left, right = st.columns([3, 2])
        left.dataframe(advice, hide_index=True, width="stretch")
        with right:
            st.code(res.code, language="python")
            st.download_button("Download LoraConfig (JSON)", json.dumps(res.value.config, indent=2),
                               "lora_config.json", "application/json", key=f"{key}_dl")


def runs_view() -> None:
    runs = completed(all_runs())
    if not runs:
        empty_store_message()
        return
    labels = {run_label(r): r for r in runs}
    default = [run_label(r) for r in latest_sweep(runs)]
    chosen = st.multiselect("Runs", list(labels), default=default, key="spectra_runs")
    if not chosen:
        st.warning("Choose at least one run.")
        return
    inputs = inputs_for([labels[k] for k in chosen])

    st.subheader(SWEEP.title)
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
            chart(res.figures[0], key="sweep_chart")
            if res.text:
                st.info(res.text, icon=":material/insights:")

    st.subheader("Per module")
    label = widget(SPECTRA, "run", inputs, {}, "spectra_run_detail")
    with guarded("computing the spectra"):
        show_module_spectra(inputs, label, "run")
    advice_section(inputs, label, "run_advice")


def upload_view() -> None:
    files = st.file_uploader("A PEFT adapter: adapter_config.json and adapter_model.safetensors (safetensors and "
                             "JSON only; pickled .bin files are never loaded)", type=["json", "safetensors"],
                             accept_multiple_files=True, key="spectra_upload")
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
    show_module_spectra(inputs, "upload", "upload", ("upload", digest))
    advice_section(inputs, "upload", "upload_advice", ("upload", digest))


@st.cache_resource(max_entries=8, show_spinner="Reading the adapter…")
def uploaded_updates(digest: str, _files) -> dict:
    return adapter_from_upload(_files)


def page() -> None:
    st.title("Spectra")
    st.caption("Singular values of the learned update ΔW per module. LoRA updates are never formed densely: "
               "QR of B and Aᵀ and an r×r SVD give the same values and directions. Full fine-tuning's "
               "ΔW = W_ft − W0 is dense.")
    source = st.radio("Source", ["Runs in the store", "Upload a PEFT adapter"], horizontal=True, key="spectra_src")
    if source == "Runs in the store":
        runs_view()
    else:
        upload_view()


page()
