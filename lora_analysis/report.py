"""Self-contained HTML reports: one file a colleague opens offline, every chart interactive.

plotly.js is inlined once (in the head), each figure is a ``<div>`` drawn by it, tables are plain HTML,
and the configs and environment travel as JSON at the end. Nothing is fetched from a network.

The report opens with its takeaways: the answer of every section that has one, grouped by the question it
answers, each linked to its evidence. Each section links to the settings of the runs that made it (a table
per run at the end). Every piece of text that comes from users' files (run names, module names, config
values, notes) is escaped: HTML text through ``html.escape``, figure JSON by plotly (``<``, ``>`` and ``/``
as ``\u003c``-style escapes, so no ``</script>`` can end a script block).
"""

from __future__ import annotations

import html
import json
import os
import platform
import re
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
.question { color: #1f77b4; font-weight: 600; margin-bottom: 2px; }
.answer { font-size: 15px; background: #f3f8fc; border-left: 4px solid #1f77b4; padding: 8px 12px; }
.reading { color: #555; font-size: 13px; margin-top: 0; }
.settings-link { font-size: 12px; color: #555; }
details { margin: 6px 0; color: #444; font-size: 13px; }
@media (prefers-color-scheme: dark) {
  body { color: #ddd; background: #161a1f; } section { background: #1e2329; border-color: #333; }
  th { background: #263040; } th, td { border-color: #333; } pre { background: #262b33; color: #ddd; }
  .answer { background: #1b2836; } .note, .reading, .settings-link, details { color: #aaa; } a { color: #7fb8e6; }
}
"""


@dataclass
class Section:
    """One block of the report: a title, prose, figures, tables and a code listing, in that order."""

    title: str
    text: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    code: str = ""
    answer: str = ""        # the answer computed from the data (shown first, and in the takeaways)
    rule: str = ""          # how the answer was computed
    readings: list[str] = field(default_factory=list)    # "how to read this chart", one per figure
    question: str = ""      # the user question the answer belongs to
    runs: list[str] = field(default_factory=list)        # ids of the runs whose settings made it (links)
    analysis: str = ""      # the registered analysis it shows: repeated sections (one per run) share it


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


def run_anchor(run_id: str) -> str:
    """The id of a run's settings table in the report (letters, digits, ``-`` and ``_`` only)."""
    return "run-" + re.sub(r"[^A-Za-z0-9_-]", "-", str(run_id))


def _run_settings(configs: dict | None) -> dict[str, dict]:
    """{run id: {"name", "config", ...}} when ``configs`` is :func:`lora_analysis.run_report.run_configs`'s."""
    if not isinstance(configs, dict):
        return {}
    return {str(k): v for k, v in configs.items() if isinstance(v, dict) and isinstance(v.get("config"), dict)}


def _value_text(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _settings_html(settings: dict[str, dict]) -> str:
    blocks = ["<section id='settings'><h2>Settings of the runs</h2><p class='note'>What made each result: every "
              "section links here to the runs it read.</p>"]
    for run_id, entry in settings.items():
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_value_text(v))}</td></tr>"
                       for k, v in entry["config"].items())
        blocks.append(f"<h3 id='{run_anchor(run_id)}'>{html.escape(str(entry.get('name', run_id)))} "
                      f"<span class='settings-link'>({html.escape(run_id)})</span></h3>"
                      f"<table><tr><th>setting</th><th>value</th></tr>{rows}</table>")
    return "".join(blocks) + "</section>"


def _summary_html(sections: list[Section]) -> str:
    """The takeaways: each answer under its question, linked to its section; then what was not shown."""
    groups: dict[str, dict[str, list[str]]] = {}      # question → analysis → answers, in report order
    skipped = []
    for i, section in enumerate(sections):
        link = f"<a href='#sec-{i}'>{html.escape(section.title)}</a>"
        if section.answer:
            item = f"{html.escape(section.answer)} <span class='settings-link'>({link})</span>"
            groups.setdefault(section.question or "Other findings", {}).setdefault(
                section.analysis or f"#{i}", []).append(item)
        elif section.text.startswith("Not shown:"):
            skipped.append(f"<li>{link}: {html.escape(section.text.removeprefix('Not shown:').strip())}</li>")
    if not groups and not skipped:
        return ""
    parts = ["<section id='takeaways' class='takeaways'><h2>Takeaways</h2>"]
    for question, analyses in groups.items():
        items = []
        for answers in analyses.values():
            # an analysis shown once per run: its first answer here, the others one click away
            more = (f"<details><summary>{len(answers) - 1} more: the same for the other runs</summary><ul>"
                    + "".join(f"<li>{a}</li>" for a in answers[1:]) + "</ul></details>") if len(answers) > 1 else ""
            items.append(f"<li>{answers[0]}{more}</li>")
        parts.append(f"<p class='question'>{html.escape(question)}</p><ul>{''.join(items)}</ul>")
    if skipped:
        parts.append(f"<p class='question'>Not shown, and why</p><ul>{''.join(skipped)}</ul>")
    return "".join(parts) + "</section>"


def _section_html(i: int, section: Section, settings: dict[str, dict]) -> str:
    blocks = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.question and section.answer:
        blocks.append(f"<p class='question'>{html.escape(section.question)}</p>")
    if section.answer:
        blocks.append(f"<p class='answer'>{html.escape(section.answer)}</p>")
    if section.rule:
        blocks.append(f"<details><summary>How this was computed</summary>{html.escape(section.rule)}</details>")
    if section.text:
        blocks.append(f"<p class='note'>{html.escape(section.text)}</p>")
    for j, fig in enumerate(section.figures):
        # plotly writes the figure's JSON with <, > and / escaped: user text cannot end the script block
        blocks.append(pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=f"fig-{i}-{j}",
                                  config={"displaylogo": False, "responsive": True}))
        reading = section.readings[j] if j < len(section.readings) else ""
        if reading:
            blocks.append(f"<p class='reading'>How to read it: {html.escape(reading)}</p>")
    blocks.extend(_table_html(caption, frame) for caption, frame in section.tables)
    if section.code:
        blocks.append(f"<pre>{html.escape(section.code)}</pre>")
    links = [f"<a href='#{run_anchor(r)}'>{html.escape(str(settings[r].get('name', r)))}</a>"
             for r in section.runs if r in settings]
    if links:
        blocks.append(f"<p class='settings-link'>Settings of the runs it read: {', '.join(links)}</p>")
    elif settings and not section.text.startswith("Not shown:"):
        blocks.append("<p class='settings-link'><a href='#settings'>Settings of the runs</a></p>")
    # the anchor wraps the section: a plain <section><h2> is what readers of the file look for
    return f"<div id='sec-{i}'><section>{''.join(blocks)}</section></div>"


def render_report(title: str, sections: list[Section], configs: dict | None = None,
                  subtitle: str = "") -> str:
    """The whole report as one HTML string (plotly.js inlined once, no network needed): the takeaways
    first (every section's answer, by question), then each section, then the runs' settings and the
    configuration and environment as JSON."""
    settings = _run_settings(configs)
    parts = [_summary_html(sections)]
    parts.extend(_section_html(i, section, settings) for i, section in enumerate(sections))
    if settings:
        parts.append(_settings_html(settings))
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
