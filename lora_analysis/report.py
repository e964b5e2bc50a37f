"""Self-contained HTML reports: one file a colleague opens offline, every chart interactive.

plotly.js is inlined once (in the head), each figure is a ``<div>`` drawn by it, tables are plain HTML,
and the configs and environment travel as JSON at the end. Nothing is fetched from a network.
"""

from __future__ import annotations

import html
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from .store.files import atomic_write_text

CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #1f77b4; color: white; padding: 24px 40px; }
header h1 { margin: 0 0 6px 0; font-size: 26px; }
main { padding: 8px 40px 40px 40px; max-width: 1200px; }
section { background: white; border: 1px solid #e4e4e4; border-radius: 8px; padding: 16px 24px; margin: 20px 0; }
h2 { font-size: 20px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #eee; padding: 4px 10px; text-align: right; }
th { background: #f3f6fa; }
td:first-child, th:first-child { text-align: left; }
pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 12px; }
.note { color: #555; }
"""


@dataclass
class Section:
    """One block of the report: a title, prose, figures, tables and a code listing, in that order."""

    title: str
    text: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    code: str = ""


def environment() -> dict:
    """Versions and machine, recorded in every report."""
    import numpy
    import torch

    return {"created": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "numpy": numpy.__version__,
            "pandas": pd.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def _table_html(caption: str, frame: pd.DataFrame) -> str:
    body = frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)
    return f"<h3>{html.escape(caption)}</h3>{body}" if caption else body


def render_report(title: str, sections: list[Section], configs: dict | None = None,
                  subtitle: str = "") -> str:
    """The whole report as one HTML string (plotly.js inlined once, no network needed)."""
    parts = []
    for i, section in enumerate(sections):
        blocks = [f"<h2>{html.escape(section.title)}</h2>"]
        if section.text:
            blocks.append(f"<p class='note'>{html.escape(section.text)}</p>")
        for j, fig in enumerate(section.figures):
            blocks.append(pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig-{i}-{j}",
                                      config={"displaylogo": False, "responsive": True}))
        blocks.extend(_table_html(caption, frame) for caption, frame in section.tables)
        if section.code:
            blocks.append(f"<pre>{html.escape(section.code)}</pre>")
        parts.append(f"<section>{''.join(blocks)}</section>")
    meta = {"environment": environment(), **({"configs": configs} if configs else {})}
    parts.append("<section><h2>Configuration and environment</h2><pre>"
                 f"{html.escape(json.dumps(meta, indent=2, default=str))}</pre></section>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style><script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<header><h1>{html.escape(title)}</h1><div>{html.escape(subtitle)}</div></header>"
            f"<main>{''.join(parts)}</main></body></html>")


def write_report(path: str | os.PathLike, title: str, sections: list[Section], configs: dict | None = None,
                 subtitle: str = "") -> Path:
    """Render and write atomically with the project's one writer; readable by all (a report is shared)."""
    path = Path(path)
    text = render_report(title, sections, configs, subtitle)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text, mode=0o644)
