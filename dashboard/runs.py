"""Run-store access for the pages, with caching close to the loaders.

Listing runs is cheap (a few JSON files) and always fresh. What is slow (reading tensors, SVDs, rebuilding a
model) is cached per run folder and the run's last-modified time, so a re-run of a page costs nothing and a
new or changed run is picked up at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st

from lora_analysis import runstore
from lora_analysis.analysis.registry import run_label
from lora_analysis.analysis.sources import updates_from_adapter
from lora_analysis.analysis.spectra import spectra_frame
from lora_analysis.weights import ModuleUpdate

__all__ = ["KEPT", "Kept", "digest_of", "keep", "kept_adapters", "module_names_for", "all_runs", "clear_caches", "completed", "empty_store_message", "follow_default", "latest_sweep",
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


# ---- adapters read in this session (uploaded or typed), beside the runs ------------------------------------
#
# An adapter read on the Spectra page is kept in the session (KEPT, by its content hash) with its base weights,
# so it is still there after a visit to another page and can be set beside the runs.

KEPT = "adapters"                      # session state: {content hash: Kept}
MAX_KEPT = 4                           # the oldest is forgotten beyond this (each holds its tensors)


@dataclass
class Kept:
    """One adapter of this session: what it is called, its content hash, its factors and, once given, its
    base weights (the updates then carry W0)."""

    name: str
    digest: str
    source: str                         # "upload" or "folder"
    adapter: Any                        # lora_analysis.lora.adapter_io.Adapter
    base: str = ""                      # what the base is ("" for none), as the user gave it
    base_key: str = ""                  # identifies the base's content for the caches
    updates: dict = field(default_factory=dict)
    typed: str = ""                     # the folder as typed (source "folder")

    @property
    def label(self) -> str:
        return f"adapter: {self.name} · {self.digest[:6]}"

    @property
    def key(self) -> tuple:
        return ("adapter", self.digest, self.base_key)


def kept_adapters() -> dict[str, Kept]:
    """The adapters read in this session, by content hash (newest last)."""
    return st.session_state.setdefault(KEPT, {})


def keep(kept: Kept) -> Kept:
    """Remember ``kept`` (the same content replaces the older entry, keeping its base)."""
    adapters = kept_adapters()
    old = adapters.pop(kept.digest, None)
    if old is not None and old.base and not kept.base:
        kept.base, kept.base_key, kept.updates = old.base, old.base_key, old.updates
    if not kept.updates:
        kept.updates = updates_from_adapter(kept.adapter)
    adapters[kept.digest] = kept
    while len(adapters) > MAX_KEPT:
        adapters.pop(next(iter(adapters)))
    return kept


@st.cache_data(max_entries=256, show_spinner=False)
def _module_names(run_dir: str, stamp: float, method: str) -> frozenset[str]:
    from safetensors import safe_open

    from lora_analysis.lora.adapter_io import LORA_KEY
    from lora_analysis.store.runs import ADAPTER_DIR, FULL_WEIGHTS

    lora = method == "lora"
    path = Path(run_dir) / (f"{ADAPTER_DIR}/adapter_model.safetensors" if lora else FULL_WEIGHTS)
    try:
        with safe_open(str(path), "pt") as f:       # the header only: no tensor is read
            keys = list(f.keys())
    except Exception:       # a run without readable weights shares nothing: it is simply not offered
        return frozenset()
    if not lora:
        return frozenset(keys)
    return frozenset(m["module"] for k in keys if (m := LORA_KEY.match(k)))


def module_names_for(run: runstore.Run) -> frozenset[str]:
    """The modules a run adapted (LoRA) or holds (full fine-tuning), from its weights' header alone."""
    return _module_names(str(run.dir), stamp(run), run.method)


def digest_of(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()
