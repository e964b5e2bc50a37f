"""Spectra: singular values of ΔW per module, energy, effective/stable rank by layer, LoRA ranks versus full
fine-tuning, and rank advice exported as a PEFT LoraConfig."""

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboard.common import MAX_UPLOAD_BYTES, chart, guarded
from dashboard.runs import (all_runs, completed, empty_store_message, latest_sweep, run_label, spectra_for, stamp,
                            updates_for)
from lora_analysis.analysis.rank_advice import peft_config_from_advice, peft_config_snippet, rank_advice
from lora_analysis.analysis.sources import updates_from_adapter
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.lora import read_adapter
from lora_analysis.plots.analysis import (plot_cumulative_energy, plot_rank_heatmap, plot_rank_sweep_spectra,
                                          plot_singular_values)

TABLE_COLUMNS = ["name", "kind", "shape", "rank", "scaling", "fro_norm", "spectral_norm", "stable_rank",
                 "effective_rank", "rank_90", "rank_99"]


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


@st.cache_data(max_entries=16, show_spinner="Reading the adapter…")
def uploaded_spectra(files_key: str, _files) -> pd.DataFrame:
    return spectra_frame(adapter_from_upload(_files))


def show_module_spectra(spectra: pd.DataFrame, key: str) -> None:
    left, right = st.columns(2)
    normalized = st.toggle("Normalise each spectrum by σ₁", key=f"{key}_norm")
    with left:
        chart(plot_singular_values(spectra, normalized=normalized), key=f"{key}_sv")
    with right:
        chart(plot_cumulative_energy(spectra), key=f"{key}_energy")
    metric = st.segmented_control("Heatmap metric", ["effective_rank", "stable_rank", "rank_90", "fro_norm"],
                                  default="effective_rank", key=f"{key}_metric") or "effective_rank"
    chart(plot_rank_heatmap(spectra, metric), key=f"{key}_heat")
    st.dataframe(spectra[[c for c in TABLE_COLUMNS if c in spectra.columns]], hide_index=True, width="stretch")


@st.cache_data(max_entries=32, show_spinner="Computing rank advice…")
def cached_advice(_updates: dict, source: str, energy: float, max_rank: int):
    return rank_advice(_updates, energy=energy, max_rank=max_rank)


def advice_section(updates: dict, key: str, source: str) -> None:
    """``source`` identifies ``updates`` (run dir and version, or the upload) for the cache."""
    st.subheader("Rank advice")
    c = st.columns([2, 1, 1])
    energy = c[0].slider("Keep this share of ΔW's energy (Σσ²)", 0.5, 0.999, 0.9, 0.01, key=f"{key}_energy_share")
    alpha_mode = c[1].radio("Alpha", ["ratio", "fixed"], horizontal=True, key=f"{key}_alpha_mode",
                            help="ratio: α = 2·r for every module (same scaling); fixed: one α for all")
    max_rank = c[2].number_input("Largest rank", 1, 4096, 64, key=f"{key}_max_rank")
    with guarded("computing rank advice"):
        advice = cached_advice(updates, source, float(energy), int(max_rank))
        config = peft_config_from_advice(advice, alpha_mode=alpha_mode, ratio=2.0)
        left, right = st.columns([3, 2])
        left.dataframe(advice, hide_index=True, width="stretch")
        with right:
            st.code(peft_config_snippet(config), language="python")
            st.download_button("Download LoraConfig (JSON)", json.dumps(config, indent=2), "lora_config.json",
                               "application/json", key=f"{key}_dl")


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
    selected = [labels[k] for k in chosen]
    with guarded("computing the spectra") as g:
        frames = {run_label(r): spectra_for(r) for r in selected}
    if g.failed:
        return

    st.subheader("LoRA ranks versus full fine-tuning")
    modules = sorted(set.intersection(*(set(f["name"]) for f in frames.values())))
    if modules:
        module = st.selectbox("Module", modules, key="spectra_module")
        rows = []
        for label, f in frames.items():
            row = f[f["name"] == module].iloc[0]
            run = labels[label]
            rows.append({"label": label,
                         "kind": row["kind"], "singular_values": row["singular_values"], "rank_90": row["rank_90"],
                         "rank": row["rank"] if row["kind"] == "lora" else 10**9, "run": run.id})
        sweep = pd.DataFrame(rows).sort_values("rank")
        chart(plot_rank_sweep_spectra(sweep, normalized=st.toggle("Normalise by σ₁", True, key="sweep_norm")),
              key="sweep_chart")
        full = sweep[sweep["kind"] == "full"]
        if len(full):
            r90 = int(full["rank_90"].iloc[0])
            lora_ranks = sorted(int(r) for r in sweep.loc[sweep["kind"] == "lora", "rank"])
            st.info(f"Full fine-tuning needs **{r90}** directions for 90% of its ΔW energy in `{module}`; the "
                    f"LoRA ranks compared are {lora_ranks or 'none'} (Biderman et al. 2024: full fine-tuning's "
                    f"update is far from low rank).", icon=":material/insights:")
    else:
        st.caption("The chosen runs share no module (different models).")

    st.subheader("Per module")
    label = st.selectbox("Run", chosen, key="spectra_run_detail")
    show_module_spectra(frames[label], "run")
    run = labels[label]
    advice_section(updates_for(run), "run_advice", f"{run.dir}@{stamp(run)}")


def upload_view() -> None:
    files = st.file_uploader("A PEFT adapter: adapter_config.json and adapter_model.safetensors (safetensors and "
                             "JSON only; pickled .bin files are never loaded)", type=["json", "safetensors"],
                             accept_multiple_files=True, key="spectra_upload")
    if not files:
        st.info("Upload the two files of any PEFT LoRA adapter (ours or one PEFT saved).")
        return
    key = "|".join(f"{f.name}:{f.size}:{f.file_id}" for f in files)
    with guarded("reading the adapter") as g:
        spectra = uploaded_spectra(key, files)
    if g.failed:
        return
    st.success(f"{len(spectra)} adapted modules, ranks {sorted(set(int(r) for r in spectra['rank']))}.")
    show_module_spectra(spectra, "upload")
    with guarded("reading the adapter"):
        advice_section(adapter_from_upload(files), "upload_advice", key)


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
