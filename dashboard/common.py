"""What every page shares: error display, chart display, upload limits. No analysis lives here."""

from __future__ import annotations

import json
from contextlib import contextmanager

import plotly.graph_objects as go
import streamlit as st
from dashboard.plain_text import plain

MAX_UPLOAD_BYTES = 200 * 2**20        # adapters bigger than this belong on the CLI
MAX_JSON_BYTES = 2 * 2**20


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


def chart(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False})


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


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
