"""The HTML report: one file, plotly.js inlined exactly once, every figure present, no network needed."""

import re

import pandas as pd
import plotly.graph_objects as go

from lora_analysis.report import Section, render_report, write_report


def sections():
    fig1 = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2], name="first"))
    fig2 = go.Figure(go.Bar(x=["a", "b"], y=[1, 2], name="second"))
    table = pd.DataFrame({"module": ["fc1", "fc2"], "rank": [4, 8], "stable_rank": [1.23456, 2.5]})
    return [Section("Spectra", "what the update learned", [fig1, fig2], [("Per module", table)]),
            Section("Second <section>", figures=[go.Figure()])]


def test_plotly_js_inlined_once_and_no_network():
    page = render_report("Report <1>", sections(), configs={"run": {"rank": 4}})
    assert page.count("<script type='text/javascript'>") == 1          # the library, once
    assert len(page) > 3_000_000                                         # plotly.js really is inside
    assert not re.search(r"<script[^>]+src=", page)                      # nothing fetched
    for div in ("fig-0-0", "fig-0-1", "fig-1-0"):
        assert f'id="{div}"' in page
    assert "Report &lt;1&gt;" in page and "Second &lt;section&gt;" in page   # titles escaped
    assert "<td>fc1</td>" in page and "1.235" in page
    assert '&quot;rank&quot;: 4' in page and '&quot;torch&quot;' in page


def test_write_is_atomic(tmp_path):
    path = write_report(tmp_path / "out" / "r.html", "t", sections())
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]
