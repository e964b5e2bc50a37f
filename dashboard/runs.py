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

__all__ = ["all_runs", "clear_caches", "completed", "empty_store_message", "latest_sweep", "restored_for",
           "run_label", "spectra_frame_for", "stamp", "updates_for"]


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
