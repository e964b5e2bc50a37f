"""What every page shares: its question and answer, error display, charts with their image export, tables
with their CSV download, uploaders that state their limit. No analysis lives here."""

from __future__ import annotations

import json
import re
import tempfile
from contextlib import contextmanager

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from dashboard.plain_text import plain

MAX_UPLOAD_BYTES = 200 * 2**20        # adapters, data files and bundles bigger than this belong on the CLI
MAX_JSON_BYTES = 2 * 2**20            # a Hugging Face config.json


class Outcome:
    failed = False


@contextmanager
def guarded(action: str = "this"):
    """Show a user error (``ValueError``: a bad value, a bad file) as an ``st.error`` with its message; show
    anything else as what it is, a bug, with its traceback (``st.exception``). The page goes on either way.

    ``with guarded("loading") as g: ...`` then ``if g.failed: return``.
    """
    outcome = Outcome()
    try:
        yield outcome
    except ValueError as exc:
        outcome.failed = True
        st.error(f"Could not do {action}: {plain(exc)}", icon=":material/error:")
    except Exception as exc:  # a bug of ours: shown with its traceback, never dressed up as a user error
        outcome.failed = True
        st.exception(exc)


# ---- the page's question and answer ----------------------------------------------------------------------

def page_question(page: str, fallback: str) -> str:
    """The question a page answers, as the registry words it (``PAGE_QUESTIONS``), else ``fallback``."""
    from lora_analysis.analysis import registry

    return (getattr(registry, "PAGE_QUESTIONS", None) or {}).get(page) or fallback


def question(title: str, text: str) -> None:
    """The page's title and, under it, the one question the page answers."""
    st.title(title)
    st.markdown(f"##### {plain(text)}")


class Answers:
    """The page's answers, at the top under its question, filled in as sections compute them: one box (a
    warning when one of them asks the user to act) and one expander with the rules that produced them."""

    def __init__(self):
        self.slot = st.empty()
        self.items: list[tuple[str, str, bool]] = []

    def add(self, text: str, rule: str = "", warn: bool = False) -> None:
        if not text:
            return
        self.items.append((text, rule, warn))
        with self.slot.container():
            lines = [plain(t) for t, _, _ in self.items]
            body = lines[0] if len(lines) == 1 else "\n".join(f"- {line}" for line in lines)
            if any(w for _, _, w in self.items):
                st.warning(body, icon=":material/warning:")
            else:
                st.info(body, icon=":material/lightbulb:")
            rules = [plain(r) for _, r, _ in self.items if r]
            if rules:
                label = "How this answer is computed" if len(self.items) == 1 else "How these answers are computed"
                with st.expander(label):
                    st.caption(rules[0] if len(rules) == 1 else "\n".join(f"- {r}" for r in rules))


def answers_box() -> Answers:
    """A place for the page's answers, here (call it right under :func:`question`)."""
    return Answers()


def answer(text: str, rule: str = "", container=None, warn: bool = False) -> None:
    """An answer computed from the data (plain text, escaped), and the rule that produced it in an expander;
    ``warn``: an answer the user should act on (e.g. "the merged model is not the same"). ``container``: the
    page's :class:`Answers` (or any container; default: here). Shows nothing when there is no answer."""
    if not text:
        return
    box = container if isinstance(container, Answers) else Answers() if container is None else None
    if box is None:
        with container:
            box = Answers()
    box.add(text, rule, warn)


def result_answer(res, container=None) -> bool:
    """The answer a registered analysis computed (``Result.answer`` / ``.rule``); True when there was one."""
    text = getattr(res, "answer", "") or ""
    answer(text, getattr(res, "rule", "") or "", container=container)
    return bool(text)


def reading(res, i: int) -> str:
    """``Result.readings[i]``: how to read figure ``i`` ("" when there is none)."""
    readings = getattr(res, "readings", None) or []
    return readings[i] if i < len(readings) and readings[i] else ""


def next_question(page: str, text: str, icon: str = ":material/arrow_forward:") -> None:
    """A link to the page where the next question is answered."""
    st.page_link(f"views/{page}.py", label=text, icon=icon)


# ---- charts and tables -----------------------------------------------------------------------------------

def _slug(text: str, fallback: str = "chart") -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text or "")).strip("-").lower()[:60] or fallback


def chart_config(fig: go.Figure) -> dict:
    """Plotly's own toolbar, with its camera button saving the chart as SVG (vector: it scales for papers and
    slides) named after the chart's title."""
    title = fig.layout.title.text if fig.layout.title and fig.layout.title.text else ""
    return {"displaylogo": False, "displayModeBar": True,
            "toImageButtonOptions": {"format": "svg", "filename": _slug(re.sub(r"<[^>]+>", " ", title)),
                                     "scale": 1}}


def chart(fig: go.Figure, key: str | None = None, how_to_read: str = "") -> None:
    """A plotly figure, full width, with the SVG export in its toolbar and, under it, how to read it."""
    st.plotly_chart(fig, width="stretch", key=key, config=chart_config(fig))
    if how_to_read:
        st.caption(f"How to read this: {plain(how_to_read)}")


def table(frame: pd.DataFrame, name: str, key: str, container=None, **kwargs) -> None:
    """A table and, under it, a button that downloads it as CSV (``<name>.csv``). ``kwargs`` go to
    ``st.dataframe`` (default: no index, full width)."""
    box = container or st
    box.dataframe(frame, **{"hide_index": True, "width": "stretch", **kwargs})
    download_csv(frame, name, key, box)


def download_csv(frame: pd.DataFrame, name: str, key: str, container=None) -> None:
    """A small button that downloads ``frame`` as ``<name>.csv`` (for a table drawn some other way)."""
    (container or st).download_button(
        "CSV", frame.to_csv(index=False).encode(), f"{_slug(name, 'table')}.csv", "text/csv", key=f"{key}_csv",
        icon=":material/download:", type="tertiary", on_click="ignore",
        help=f"Download this table ({len(frame)} rows) as CSV")


@contextmanager
def scratch_dir():
    """A private temporary folder inside the user data folder (``<home>/tmp``), removed afterwards: pages write
    nothing outside the user data folder."""
    from lora_analysis.paths import home_dir

    root = home_dir() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        yield tmp


# ---- uploads -----------------------------------------------------------------------------------------------

def uploader(label: str, limit_bytes: int, *, type, key: str, what: str = "per file", more: str = "",
             **kwargs):
    """``st.file_uploader`` whose limit is the page's own (``limit_bytes``), stated in its label and enforced by
    Streamlit (``max_upload_size``); the server's maxUploadSize is the largest any page accepts."""
    limit = fmt_bytes(limit_bytes, digits=0)
    return st.file_uploader(f"{label} (up to {limit} {what})", type=type, key=key,
                            max_upload_size=max(1, limit_bytes // 2**20),
                            help=f"This page accepts up to {limit} {what}.{(' ' + more) if more else ''}", **kwargs)


def read_json_upload(upload, what: str) -> dict:
    """Parse an uploaded JSON file with a size limit; raises ValueError naming the problem."""
    data = upload.getvalue()
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{upload.name} is {len(data) / 2**20:.1f} MiB: a {what} must be under "
                         f"{MAX_JSON_BYTES // 2**20} MiB")
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{upload.name} is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{upload.name} must hold a JSON object")
    return value


def fmt_bytes(n: float, digits: int = 1) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.{digits}f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
