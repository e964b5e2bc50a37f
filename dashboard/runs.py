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

__all__ = ["KEPT", "Kept", "adapter_from_upload", "base_model_of", "describe_adapter", "digest_of", "keep",
           "kept_adapters", "module_names_for", "all_runs", "clear_caches", "completed", "empty_store_message",
           "follow_default", "latest_sweep", "read_typed_adapter", "read_uploaded_adapter", "restored_for",
           "run_label", "spectra_frame_for", "spread", "stamp", "updates_for"]


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
    read: str = ""                      # what was read for the adapter (files, bytes, modules)
    base_read: str = ""                 # what was read for the base (modules, bytes of W0, files)

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
        kept.base, kept.base_key, kept.updates, kept.base_read = old.base, old.base_key, old.updates, old.base_read
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


# ---- reading an adapter the user gives (upload or typed path) ----------------------------------------------

def adapter_from_upload(files) -> Any:
    """Uploaded files (Streamlit ``UploadedFile``s) read as an adapter: ``adapter_config.json`` with
    ``adapter_model.safetensors`` (a PEFT adapter), or one ``.safetensors`` file alone (the single-file formats
    :func:`lora_analysis.lora.read_adapter` reads). Written to a private temp folder in the user data folder
    first; messages name the uploaded files, not that folder. Raises ValueError."""
    import os

    from dashboard.common import MAX_UPLOAD_BYTES, scratch_dir
    from lora_analysis.lora import read_adapter

    by_name = {f.name: f for f in files}
    config = next((f for n, f in by_name.items() if n.endswith(".json")), None)
    weights = [f for n, f in by_name.items() if n.endswith(".safetensors")]
    if len(weights) != 1 or len(by_name) > 2 or (len(by_name) == 2 and config is None):
        raise ValueError("upload adapter_config.json and adapter_model.safetensors (a PEFT adapter), or one "
                         f".safetensors adapter file alone (got {', '.join(by_name) or 'nothing'})")
    total = sum(len(f.getvalue()) for f in files)
    if total > MAX_UPLOAD_BYTES:
        raise ValueError(f"the upload is {total / 2**20:.0f} MiB: use the CLI for adapters over "
                         f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    with scratch_dir() as tmp:
        if config is not None:
            (Path(tmp) / "adapter_config.json").write_bytes(config.getvalue())
            (Path(tmp) / "adapter_model.safetensors").write_bytes(weights[0].getvalue())
            where = tmp
        else:
            where = Path(tmp) / "adapter.safetensors"
            where.write_bytes(weights[0].getvalue())
        try:
            return read_adapter(where)
        except ValueError as exc:   # name the uploaded files, not our private temp folder
            text = str(exc).replace(str(where), weights[0].name if config is None else "the upload")
            raise ValueError(text.replace(f"{tmp}{os.sep}", "").replace(tmp, "the upload")) from exc


@st.cache_resource(max_entries=8, show_spinner="Reading the adapter…")
def read_uploaded_adapter(digest: str, _files) -> Any:
    """:func:`adapter_from_upload`, cached by the files' content (``digest``)."""
    return adapter_from_upload(_files)


@st.cache_resource(max_entries=8, show_spinner="Reading the adapter…")
def read_typed_adapter(path: str, version: tuple) -> Any:
    """The adapter at ``path`` (checked by :func:`dashboard.typed_paths.resolve_adapter_path`), read again when
    its files change (``version``: :func:`dashboard.typed_paths.version_of`)."""
    from lora_analysis.lora import read_adapter

    return read_adapter(path)


def base_model_of(adapter=None, run: runstore.Run | None = None) -> str | None:
    """The base model an adapter says it was trained on (``base_model_name_or_path`` of its config), or a run's
    (its adapter's config, else its model); None when not recorded."""
    if run is not None:
        try:
            import json

            config = json.loads((run.dir / runstore.ADAPTER_DIR / "adapter_config.json").read_text())
            name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
        except (OSError, ValueError):
            name = None
        return str(name or run.model or "") or None
    raw = getattr(adapter, "raw_config", None) or {}
    name = raw.get("base_model_name_or_path")
    return str(name) if name else None


def describe_adapter(adapter, files: list[tuple[str, int]], where: str = "") -> str:
    """What was read, in one line: the files (name, bytes), where from, the format and stored dtype, the adapted
    modules and their ranks, the base model its config records, and what was assumed in reading it."""
    from dashboard.common import fmt_bytes

    modules = adapter.modules
    ranks = sorted({int(m.rank) for m in modules.values()})
    names = " and ".join(name for name, _ in files)
    base = base_model_of(adapter)
    fmt, dtype = getattr(adapter, "format", "peft"), getattr(adapter, "dtype", "float32")
    kind = f" ({fmt} format{f', stored {dtype}' if dtype != 'float32' else ''})" if fmt != "peft" or \
        dtype != "float32" else ""
    notes = list(getattr(adapter, "notes", None) or [])
    return (f"Read {names} ({fmt_bytes(sum(n for _, n in files))}){f' from {where}' if where else ''}{kind}: "
            f"{len(modules)} adapted module{'s' if len(modules) != 1 else ''}, rank{'s' if len(ranks) != 1 else ''} "
            f"{', '.join(map(str, ranks))}; base model {base if base else 'not recorded'}."
            + "".join(f" {note[0].upper()}{note[1:]}{'' if note.endswith('.') else '.'}" for note in notes if note))
