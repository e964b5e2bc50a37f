"""What every page shares: error display, chart display, upload limits. No analysis lives here."""

from __future__ import annotations

import json
from contextlib import contextmanager

import plotly.graph_objects as go
import streamlit as st

MAX_UPLOAD_BYTES = 200 * 2**20        # adapters bigger than this belong on the CLI
MAX_JSON_BYTES = 2 * 2**20


class Outcome:
    failed = False


@contextmanager
def guarded(action: str = "this"):
    """Show library errors as an ``st.error`` with the message, never a traceback on the page.

    ``with guarded("loading") as g: ...`` then ``if g.failed: return``.
    """
    outcome = Outcome()
    try:
        yield outcome
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        outcome.failed = True
        st.error(f"Could not do {action}: {msg}", icon=":material/error:")
    except Exception as exc:  # a bug of ours: still no traceback for the user, but a clear pointer
        outcome.failed = True
        st.error(f"Unexpected {type(exc).__name__} while doing {action}: {exc}", icon=":material/bug_report:")


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
