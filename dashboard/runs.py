"""Run-store access for the pages, with caching close to the loaders.

Listing runs is cheap (a few JSON files) and always fresh. What is slow (reading tensors, SVDs, rebuilding a
model) is cached per run folder and the run's last-modified time, so a re-run of a page costs nothing and a
new or changed run is picked up at once.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from lora_analysis import runstore
from lora_analysis.analysis.registry import run_label
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.weights import ModuleUpdate

__all__ = ["all_runs", "clear_caches", "completed", "empty_store_message", "follow_default", "latest_sweep",
           "restored_for", "run_label", "spectra_frame_for", "spread", "stamp", "updates_for"]


def all_runs() -> list[runstore.Run]:
    """Every run in the store, newest first (never cached: a finished job shows at once)."""
    return runstore.list_runs()


def clear_caches() -> None:
    _updates.clear()
    _spectra.clear()
    _restored.clear()
    st.cache_data.clear()      # analysis results keyed by runs that may be gone


def completed(runs: list[runstore.Run]) -> list[runstore.Run]:
    return [r for r in runs if r.status == "completed"]


def stamp(run: runstore.Run | None) -> float:
    """The run's last change (run.json's mtime): part of every cache key, so a changed run is re-read."""
    if run is None:
        return 0.0
    try:
        return (run.dir / "run.json").stat().st_mtime
    except OSError:
        return 0.0


@st.cache_resource(max_entries=64, show_spinner="Reading the run's weights…")
def _updates(run_dir: str, stamp: float) -> dict[str, ModuleUpdate]:
    # read-only tensors shared by sessions; nothing mutates them
    return runstore.load_updates(runstore.read_run(run_dir))


def updates_for(run: runstore.Run) -> dict[str, ModuleUpdate]:
    """The run's updates (W0 may be None for a LoRA run stored without its base weights)."""
    return _updates(str(run.dir), stamp(run))


@st.cache_data(max_entries=128, show_spinner="Computing singular spectra…")
def _spectra(run_dir: str, stamp: float) -> pd.DataFrame:
    return spectra_frame(_updates(run_dir, stamp))


def spectra_frame_for(run: runstore.Run) -> pd.DataFrame:
    """:func:`lora_analysis.analysis.spectra_frame` of the run."""
    return _spectra(str(run.dir), stamp(run))


@st.cache_resource(max_entries=8, show_spinner="Rebuilding the run's model…")
def _restored(run_dir: str, stamp: float):
    from lora_analysis.training.restore import restore_run

    # shared read-only: analyses that change a model work on deep copies
    return restore_run(runstore.read_run(run_dir))


def restored_for(run: runstore.Run):
    """The run's model rebuilt (:func:`lora_analysis.training.restore.restore_run`)."""
    return _restored(str(run.dir), stamp(run))


latest_sweep = runstore.latest_sweep


def empty_store_message() -> None:
    st.info("The run store has no completed runs yet. Run the quick demo on **Home** (about half a minute on "
            "a CPU) or launch runs on **Fine-tune**; they show here.", icon=":material/info:")
    st.page_link("views/home.py", label="Go to Home and run the quick demo", icon=":material/play_arrow:")


def follow_default(key: str, options: list[str], default: list[str]) -> None:
    """Call before ``st.multiselect(..., key=key)`` (drawn without ``default``): when the default (e.g. the
    newest sweep's runs) has changed since the page last drew it, the selection becomes the new default, so a
    finished sweep replaces a stale choice; otherwise the user's choice stays, less what is no longer offered."""
    marker = f"_default:{key}"
    if st.session_state.get(marker) != default:
        st.session_state[marker] = list(default)
        st.session_state[key] = list(default)
    elif key in st.session_state:
        st.session_state[key] = [v for v in st.session_state[key] if v in options]


def spread(runs: list[runstore.Run], n: int) -> list[runstore.Run]:
    """At most ``n`` of ``runs`` spread over the ranks: every full fine-tuning run's model kept once (the
    baseline), then LoRA runs at ranks evenly spaced from the smallest to the largest. Order kept."""
    if len(runs) <= n:
        return list(runs)
    full = [r for r in runs if r.method != "lora"][: max(1, n // 4)]
    lora = sorted((r for r in runs if r.method == "lora"), key=lambda r: (int(r.config.get("rank") or 0), r.id))
    room = n - len(full)
    if room <= 0 or not lora:
        picked = full[:n]
    elif room == 1:
        picked = full + [lora[-1]]
    else:
        step = (len(lora) - 1) / (room - 1)
        picked = full + [lora[i] for i in sorted({round(i * step) for i in range(room)})]
    keep = {r.id for r in picked}
    return [r for r in runs if r.id in keep]
