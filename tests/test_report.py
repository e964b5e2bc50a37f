"""The HTML report: one file, plotly.js inlined exactly once, every figure present, no network needed."""

import re

import pytest

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
    assert path.stat().st_mode & 0o777 == 0o644          # shared, not private like a temp file


def test_a_failed_write_leaves_no_temp_file_and_keeps_the_old_report(tmp_path, monkeypatch):
    """Defect 12: the report goes through the one atomic writer; a write that fails (text that cannot be
    encoded, a rename the filesystem refuses) leaves neither a temporary file nor a damaged report."""
    path = write_report(tmp_path / "r.html", "old", sections())
    old = path.read_text()
    with pytest.raises(UnicodeEncodeError):
        write_report(path, "a lone surrogate \ud800 cannot be written as UTF-8", sections())
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"] and path.read_text() == old

    def refuse(src, dst):
        raise OSError("the disk is full")

    monkeypatch.setattr("os.replace", refuse)
    with pytest.raises(OSError, match="the disk is full"):
        write_report(path, "new", sections())
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"] and path.read_text() == old


SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"


def test_user_text_is_escaped_everywhere_in_a_report_of_hostile_names():
    """Run names, module names, config values and notes from shared files reach the report only escaped: in
    the prose, the tables, the takeaways, the settings links, and inside the figures' JSON script blocks
    (where a raw </script> would end the block)."""
    import torch

    from lora_analysis.analysis.registry import Inputs
    from lora_analysis.run_report import report_sections
    from lora_analysis.weights import ModuleUpdate

    g = torch.Generator().manual_seed(0)

    def update(name, rank):
        return ModuleUpdate(name, w0=torch.randn(12, 8, generator=g), lora_A=torch.randn(rank, 8, generator=g),
                            lora_B=torch.randn(12, rank, generator=g), scaling=2.0)

    modules = [f"layers.0.{IMG}", f"layers.1.{SCRIPT}"]
    inputs = Inputs.from_updates({f"run {SCRIPT}": {m: update(m, 4) for m in modules},
                                  f"run {IMG}": {m: update(m, 2) for m in modules}})
    sections = report_sections(inputs, include=("spectra", "subspaces"))
    assert any(SCRIPT in s.answer or IMG in s.answer for s in sections)       # the names do reach the report
    sections[0].runs = ["run-1"]
    configs = {"run-1": {"name": SCRIPT, "config": {"notes": IMG, "targets": [SCRIPT]}, "environment": {}}}
    page = render_report(f"Report {SCRIPT}", sections, configs=configs, subtitle=IMG)
    assert SCRIPT not in page and IMG not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    # inside the figures' JSON: escaped (as \u003c… or &lt;), so no script block is ended early
    blocks = re.findall(r"<script[^>]*>(.*?)</script>", page, flags=re.S)
    for block in blocks:
        for found in re.finditer("alert", block):
            before = block[found.start() - 40:found.start()]
            assert "\\u003c" in before or "&lt;" in before, block[found.start() - 60:found.end()]
    assert page.count("<script") == page.count("</script>")     # every block ends where it should
    # the settings link of a section points at its run's settings table
    assert "href='#run-run-1'" in page and "id='run-run-1'" in page
