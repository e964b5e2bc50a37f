"""Pages show registered analyses (``lora_analysis.analysis.registry``): widgets from an entry's parameters,
one cached computation, its figures and tables. What a page shows is what the report shows.

    entry = registry.get("intruders")
    inputs = inputs_for(runs)
    params = widgets(entry, inputs, keys={"k": "intr_k"})      # or widget(...) one parameter at a time
    show(result(entry, inputs, params))

    updates, read = stream_base(adapter, base_path)    # W0 read module by module under a progress bar
"""

from __future__ import annotations

from typing import Any, Mapping

import streamlit as st

from dashboard.common import chart, fmt_bytes, reading, result_answer, table
from dashboard.runs import restored_for, spectra_frame_for, stamp, updates_for
from dashboard.plain_text import plain
from lora_analysis.analysis.registry import Analysis, Inputs, Param, Result
from lora_analysis.analysis.sources import StreamedUpdates


def inputs_for(runs) -> Inputs:
    """The chosen runs, read through the page caches."""
    return Inputs.from_runs(runs, load=updates_for, spectra=spectra_frame_for, restore=restored_for)


def inputs_with(runs, extra: Mapping[str, tuple[Mapping, tuple]] | None = None) -> Inputs:
    """Runs and subjects that are not runs side by side (e.g. an uploaded adapter beside the store's runs):
    ``extra`` is ``{label: (updates, key)}``, ``key`` identifying the updates' content for the caches (the
    adapter's content hash and its base's). Runs are read through the page caches, as by :func:`inputs_for`."""
    subjects: dict = {label: updates for label, (updates, _) in (extra or {}).items()}
    base = inputs_for(list(runs))
    subjects.update({label: base.run(label) for label in base.labels})
    inputs = Inputs(subjects, load=updates_for, spectra=spectra_frame_for, restore=restored_for)
    inputs.duplicates = base.duplicates
    inputs.subject_keys = {label: key for label, (_, key) in (extra or {}).items()}
    return inputs


def inputs_key(inputs: Inputs) -> tuple:
    """What identifies the inputs for the cache: each run's id and last change, a non-run subject's own key
    (``inputs.subject_keys``, see :func:`inputs_with`), or the label alone."""
    keys = getattr(inputs, "subject_keys", None) or {}
    return tuple((label, r.id, stamp(r)) if (r := inputs.run(label)) is not None else (label, *keys.get(label, ()))
                 for label in inputs.labels)


@st.cache_data(max_entries=128, show_spinner="Computing…")
def _result(name: str, key: tuple, params: tuple, _entry: Analysis, _inputs: Inputs) -> Result:
    return _entry.run(_inputs, **dict(params))


def result(entry: Analysis, inputs: Inputs, params: Mapping, key: tuple | None = None, record: bool = True
           ) -> Result:
    """``entry.run(inputs, **params)``, cached by the runs' versions (``key`` for inputs that are not runs)
    and the parameters; the parameters shown are kept in ``st.session_state["params:<name>"]`` (what the
    report of the page's runs shows), unless ``record`` is False (a section on subjects the report does not
    have, e.g. two adapters read on the page)."""
    out = _result(entry.name, inputs_key(inputs) if key is None else key,
                  tuple(sorted(params.items(), key=lambda kv: kv[0])), entry, inputs)
    if record:
        st.session_state[f"params:{entry.name}"] = dict(out.params)
    return out


def widget(entry: Analysis, name: str, inputs: Inputs, chosen: dict, key: str, container=st,
           kind: str | None = None, **kwargs) -> Any:
    """One widget for parameter ``name``, at its registered default and with its help; the value is added
    to ``chosen`` (later parameters' choices and defaults may depend on it) and returned.

    Choices become a select box (``kind="radio"`` / ``"segmented"`` for short lists), booleans a toggle,
    bounded numbers a slider (``kind="number"`` for a number box); ``kwargs`` go to the widget (e.g. a
    slider's ``max_value`` when the parameter itself has no upper bound).
    """
    p: Param = entry.param(name)
    options = entry.options(name, inputs, chosen)
    default = entry.default(name, inputs, chosen)
    label, fmt = p.label or name, (lambda v: p.names.get(v, str(v)))
    if options:
        if kind == "radio":
            value = container.radio(label, options, index=options.index(default), key=key, help=p.help,
                                    horizontal=True, format_func=fmt, **kwargs)
        elif kind == "segmented":
            value = container.segmented_control(label, options, default=default, key=key, help=p.help,
                                                format_func=fmt, **kwargs) or default
        else:
            value = container.selectbox(label, options, index=options.index(default), key=key, help=p.help,
                                        format_func=fmt, **kwargs)
    elif isinstance(p.default, bool):
        value = container.toggle(label, default, key=key, help=p.help, **kwargs)
    else:
        cast = int if isinstance(p.default, int) else float
        bounds = {"min_value": cast(p.low) if p.low is not None else None,
                  "max_value": cast(p.high) if p.high is not None else None, **kwargs}
        if kind == "number" or bounds["min_value"] is None or bounds["max_value"] is None:
            value = container.number_input(label, value=cast(default), key=key, help=p.help, **bounds)
        else:
            step = 1 if cast is int else 0.01
            value = container.slider(label, value=cast(default), step=step, key=key, help=p.help, **bounds)
    chosen[name] = value
    return value


def widgets(entry: Analysis, inputs: Inputs, keys: Mapping[str, str] | None = None, prefix: str | None = None,
            fixed: Mapping | None = None) -> dict:
    """A widget for every parameter of ``entry`` not in ``fixed``, in order; keys ``<prefix>_<name>``."""
    chosen = dict(fixed or {})
    for p in entry.params:
        if p.name not in chosen:
            widget(entry, p.name, inputs, chosen, (keys or {}).get(p.name, f"{prefix or entry.name}_{p.name}"))
    return chosen


def show(res: Result, key: str, tables: bool = True, answer: bool = False) -> None:
    """A result as the report has it: its answer (``answer=True``; pages that gather answers at the top
    leave it off), prose, figures (one per row, each with how to read it), then tables and code."""
    if answer:
        result_answer(res)
    if res.text:
        st.caption(plain(res.text))
    for i, fig in enumerate(res.figures):
        chart(fig, key=f"{key}_fig{i}", how_to_read=reading(res, i))
    if tables:
        show_tables(res, key)


def show_tables(res: Result, key: str | None = None) -> None:
    """The result's tables, each downloadable as CSV, then its code."""
    for i, (caption, frame) in enumerate(res.tables):
        st.markdown(f"**{plain(caption)}**")
        table(frame, f"{res.name}-{caption}", key=f"{key or res.name}_table{i}")
    if res.code:
        st.code(res.code, language="python")


def stream_base(adapter, base, container=None) -> tuple[Mapping, str]:
    """The adapter's updates against the base weights at ``base``, W0 read module by module under an
    ``st.progress`` bar counting the modules read, and one line saying what was read (modules, bytes of W0,
    files). ``base``: a path already checked by :func:`dashboard.typed_paths.resolve_base_path`.

    The updates are a :class:`lora_analysis.analysis.sources.StreamedUpdates`: every key is matched and every
    shape checked before the first tensor is read (ValueError when the base does not fit the adapter), and no
    W0 is kept: each analysis reads a module's W0 when it needs it, one at a time (the pass here warms the
    operating system's file cache). The page holds the adapter's factors only, whatever the base's size."""
    updates = StreamedUpdates(adapter, str(base))
    source, total = updates.source, len(updates)
    bar = (container or st).progress(0.0, text=plain(f"Streaming W0 of {total} modules from {source.describe()}"))
    nbytes = 0
    for i, name in enumerate(updates, start=1):
        w0 = updates[name].w0
        nbytes += w0.numel() * w0.element_size()
        del w0
        bar.progress(i / total, text=plain(f"W0 streamed: {i} of {total} modules ({name})"))
    read = (f"Read W0 of {total} module{'s' if total != 1 else ''} ({fmt_bytes(nbytes)}) from "
            f"{source.describe()}.")
    return updates, read
