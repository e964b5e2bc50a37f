"""Shared text is escaped everywhere it is shown (issue 13): a run bundle whose run names and config values
carry HTML, script and markdown, and an adapter whose module names carry HTML, go through the dashboard's
pages, the plotly charts on them and the HTML reports; no raw tag and no live markdown image or link
survives anywhere.

The bundle is a real tiny run pair (mlp-digits, 5 steps, a 20-step base), exported, given a hostile config
note and imported into a fresh store; built once per module. Each check first proves that the hostile
text really reached what it inspects (the run list, a widget's options, the report), so it can fail.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest

from lora_analysis import runstore
from lora_analysis.plots.checks import raw_markup

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
JSON, BIN = "application/json", "application/octet-stream"

TAGS = "<img src=x onerror=alert(1)><script>alert(2)</script>"
MARKDOWN = "![x](http://example.invalid/x.png) [click](javascript:alert(1))"
HOSTILE = f"{TAGS} {MARKDOWN}"
# charts keep a long name's end (its last 40 characters): the tags come again at the end, so they reach them
LORA_NAME, FULL_NAME = f"{HOSTILE} lora {TAGS}", f"{HOSTILE} full {TAGS}"
NOTE = '<svg onload=alert(3)></svg> "quoted" & <a href="javascript:alert(4)">note</a>'
MODULE = "x<b>y</b><img src=x onerror=alert(5)>"

# raw forms that must never reach a browser as markup
RAW_HTML = ("<img src=x onerror", "<script>alert(2)", "alert(2)</script>", "<svg onload", '<a href="javascript',
            "<b>y</b>")
RAW_MARKDOWN = ("![x](", "[click](", "](javascript:", "](http://example.invalid")
PAGES = ["home", "params", "finetune", "spectra", "rank_alpha", "subspaces", "findings", "merge", "reports"]


# ---- the hostile store --------------------------------------------------------------------------------

def _with_note(bundle: Path) -> Path:
    """The bundle with a hostile config value (kept by import: other config keys are kept as they are)."""
    with zipfile.ZipFile(bundle) as zf:
        entries = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    record = json.loads(entries["run.json"])
    record["config"]["note"] = NOTE
    entries["run.json"] = json.dumps(record).encode()
    out = bundle.with_name("noted-" + bundle.name)
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out


@pytest.fixture(scope="module")
def hostile_home(tmp_path_factory, _shared_cache):
    """A LORA_ANALYSIS_HOME holding, imported from bundles, a LoRA run and a full fine-tuning run (one
    sweep) whose names carry HTML, script and markdown, and whose config holds a hostile note."""
    from lora_analysis.training import TrainConfig, train
    from lora_analysis.training.trainer import task_for

    origin = tmp_path_factory.mktemp("xss-origin")
    home = tmp_path_factory.mktemp("xss-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ANALYSIS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        settings = dict(model="mlp-digits", steps=5, eval_every=5, pretrain_steps=20)
        task = task_for(TrainConfig(**settings))
        made = [train(TrainConfig(**settings, rank=2, alpha=4), task=task, runs_dir=origin / "runs",
                      name=LORA_NAME, sweep_id="xss-sweep"),
                train(TrainConfig(**settings, method="full"), task=task, runs_dir=origin / "runs",
                      name=FULL_NAME, sweep_id="xss-sweep")]
        for result in made:
            bundle = runstore.export_run(result.run_id, origin / "bundles", runs_dir=origin / "runs")
            runstore.import_run(_with_note(bundle))
        runs = runstore.list_runs()
    assert sorted(r.name for r in runs) == sorted([LORA_NAME, FULL_NAME])
    assert all(r.status == "completed" and r.config["note"] == NOTE for r in runs)
    return home


@pytest.fixture
def hostile(hostile_home, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(hostile_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hostile_home


# ---- what a page shows ----------------------------------------------------------------------------------

def open_page(name: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.switch_page(f"views/{name}.py").run()
    return clean(at)


def clean(at: AppTest) -> AppTest:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _nodes(node):
    yield node
    children = getattr(node, "children", None)
    for child in (children.values() if isinstance(children, dict) else children or []):
        yield from _nodes(child)


# element types whose text Streamlit renders as markdown (allow_html only where the page asks for it)
MARKDOWN_BODIES = {"markdown", "caption", "title", "header", "subheader", "info", "success", "warning", "error",
                   "toast", "exception"}


def rendered_texts(at: AppTest) -> list[tuple[str, str, bool]]:
    """(where, text, allow_html) of every string on the page that Streamlit renders as markdown: the bodies
    of markdown and alert elements, and the labels, help texts, radio options and captions of widgets,
    metrics, expanders and tabs (plain option lists of selectboxes and multiselects are text only)."""
    out = []
    for node in (n for root in (at.main, at.sidebar) for n in _nodes(root)):
        proto = getattr(node, "proto", None)
        kind = getattr(node, "type", "")
        if proto is None:
            continue
        if kind in MARKDOWN_BODIES and hasattr(proto, "body"):
            out.append((kind, proto.body, bool(getattr(proto, "allow_html", False))))
        for field in ("label", "help"):
            if isinstance(getattr(proto, field, None), str) and getattr(proto, field):
                out.append((f"{kind}.{field}", getattr(proto, field), False))
        if kind == "radio":
            out += [("radio.option", o, False) for o in proto.options]
            out += [("radio.caption", c, False) for c in getattr(proto, "captions", [])]
    return out


def plain_choices(at: AppTest) -> list[str]:
    """The options of selectboxes and multiselects: where a run's name reaches the page as data."""
    return [o for kind in ("selectbox", "multiselect") for w in at.get(kind) for o in w.options]


def table_cells(at: AppTest) -> list[str]:
    """The text cells of the page's tables (shown as text by Streamlit's data grid, never as markup)."""
    return [v for d in at.dataframe for column in d.value.columns for v in d.value[column].tolist()
            if isinstance(v, str)]


def chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def markup_left(at: AppTest) -> list[str]:
    """What on the page could render the hostile text as HTML or as a markdown image or link."""
    problems = []
    for where, text, allow_html in rendered_texts(at):
        # plain() puts a backslash before every '<', '!', '[', ']', '(' of shared text: a hostile piece with
        # no backslash before it is live markdown (an image, a link), or live HTML where allow_html is on
        for raw in RAW_MARKDOWN + RAW_HTML:
            if re.search(r"(?<!\\)" + re.escape(raw), text):
                problems.append(f"{where}{' (allow_html)' if allow_html else ''}: unescaped {raw!r} in {text[:120]!r}")
    for i, spec in enumerate(chart_specs(at)):
        problems += [f"chart {i}: {p}" for p in raw_markup(spec)]
    return problems


def shown(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)


# ---- the checks can fail --------------------------------------------------------------------------------

def test_the_checks_catch_unescaped_text():
    """The helpers above flag what they exist to flag (a page fed raw text), and pass plain()'s escapes."""
    from dashboard.plain_text import plain

    raw = AppTest.from_string(f"import streamlit as st\nst.caption({HOSTILE!r})\nst.info({HOSTILE!r})")
    problems = markup_left(raw.run())
    assert len(problems) >= 2 and any("![x](" in p for p in problems) and any("<img src=x" in p for p in problems)
    escaped = AppTest.from_string(f"import streamlit as st\nst.caption({plain(HOSTILE)!r})").run()
    assert markup_left(escaped) == []
    assert shown(escaped.caption[0].value) == HOSTILE and "\\!\\[x\\]\\(" in escaped.caption[0].value
    chart = AppTest.from_string("import streamlit as st, plotly.graph_objects as go\n"
                                f"st.plotly_chart(go.Figure(go.Bar(x=[1], y=[2], name={TAGS!r})))").run()
    assert any("<img" in p for p in markup_left(chart))


# ---- the pages ------------------------------------------------------------------------------------------

CHART_PAGES = {"finetune", "spectra", "rank_alpha", "subspaces"}     # pages whose charts name the runs


@pytest.mark.parametrize("page", PAGES)
def test_hostile_run_names_are_shown_as_text_on_every_page(hostile, page):
    at = open_page(page)
    if page == "params":                  # the page's run mode: parameter counts of a run's model
        clean(at.radio(key="params_mode").set_value("A run's model").run())
    specs = chart_specs(at)
    # the hostile names reached the page: as choices, table cells, escaped text or chart text
    everything = plain_choices(at) + table_cells(at) + [shown(t) for _, t, _ in rendered_texts(at)]
    if page not in CHART_PAGES | {"home"}:   # home shows the LoRA diagram, no runs
        assert any(HOSTILE in text for text in everything), \
            f"{page}: the hostile run name is nowhere on the page: the check would prove nothing"
    assert markup_left(at) == []
    if page in CHART_PAGES:               # ... and into its charts, escaped for plotly
        assert any("&lt;script&gt;alert(2)&lt;/script&gt;" in json.dumps(s) for s in specs), \
            f"{page}: no chart names the hostile runs"
    # where a page writes a run's name into markdown (params, spectra, subspaces): escaped, reads back whole
    for _, text, _ in rendered_texts(at):
        if "onerror" in text:
            assert "\\<img src=x onerror=alert\\(1\\)\\>\\<script\\>" in text and HOSTILE in shown(text), text
            assert "\\!\\[x\\]\\(http\\://example.invalid" in text and "\\[click\\]\\(javascript" in text, text


# ---- the HTML reports -----------------------------------------------------------------------------------

def _raw_in_html(html: str) -> list[str]:
    found = [raw for raw in RAW_HTML if raw.lower() in html.lower()]
    found += re.findall(r"""href\s*=\s*["']?\s*javascript:""", html, flags=re.I)
    return found


def report_figures(html: str) -> list[dict]:
    """The figures of an HTML report as plotly.js reads them: the JSON of each ``Plotly.newPlot(id, data,
    layout, ...)`` decoded (plotly writes ``<`` as ``\\u003c``: decoding gives the text plotly.js renders)."""
    decoder, figures = json.JSONDecoder(), []
    for match in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", html):
        data, end = decoder.raw_decode(html, match.end())
        layout, _ = decoder.raw_decode(html, re.compile(r",\s*").match(html, end).end())
        figures.append({"data": data, "layout": layout})
    return figures


def report_problems(html: str) -> list[str]:
    """Raw tags or javascript: links in the report's HTML, and raw tags in the text its figures render."""
    problems = _raw_in_html(html)
    for i, figure in enumerate(report_figures(html)):
        problems += [f"figure {i}: {p}" for p in raw_markup(figure)]
    if not _script_blocks_intact(html):
        problems.append("a <script> block is opened or closed by shared text")
    return problems


def _script_blocks_intact(html: str) -> bool:
    """Every <script> opened is closed once: no shared text inside embedded JSON opens or ends a block."""
    return len(re.findall(r"<script\b", html, flags=re.I)) == len(re.findall(r"</script\s*>", html, flags=re.I))


def test_the_html_report_escapes_run_names_and_config_values(hostile, tmp_path):
    from lora_analysis.cli import main

    out = tmp_path / "report.html"
    # training and spectra only: every analysis goes through the dashboard's report below, in the same sections
    assert main(["report", "--parts", "training,spectra", "--html", str(out)]) == 0
    html = out.read_text(encoding="utf-8")
    # the hostile text is in the report, escaped: as HTML entities or as JSON's \u003c escapes
    assert "&lt;img src=x onerror=alert(1)&gt;" in html or "\\u003cimg src=x onerror=alert(1)\\u003e" in html
    assert "onerror=alert(1)" in html and "svg onload=alert(3)" in html
    figures = report_figures(html)
    assert figures and any("alert(2)" in json.dumps(f) for f in figures)     # the figures name the runs
    assert report_problems(html) == []


def test_the_dashboards_html_report_escapes_run_names_and_config_values(hostile):
    at = open_page("reports")
    assert all(HOSTILE in label for label in at.multiselect(key="rep_runs").value)
    at.button(key="rep_build").click().run()
    html = clean(at).session_state["rep_html"]
    assert "onerror=alert(1)" in html and "svg onload=alert(3)" in html        # the names and the note are in it
    figures = report_figures(html)
    assert figures and any("alert(2)" in json.dumps(f) for f in figures)     # the figures name the runs
    assert report_problems(html) == []


# ---- an adapter whose module names carry HTML -----------------------------------------------------------

def _hostile_adapter(directory: Path) -> Path:
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    tensors = {}
    for name, (out_f, in_f) in ((MODULE, (6, 8)), (f"blocks.0.{MODULE}", (5, 6))):
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(2, in_f)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_f, 2)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [MODULE], "lora_dropout": 0.0,
              "bias": "none", "base_model_name_or_path": f"{TAGS}-base", "task_type": None}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_an_adapter_with_html_module_names_is_read_and_reported_escaped(lora_home, tmp_path, capsys):
    from lora_analysis.cli import main
    from lora_analysis.lora import read_adapter

    folder = _hostile_adapter(tmp_path / "adapter")
    assert sorted(read_adapter(folder).modules) == sorted([MODULE, f"blocks.0.{MODULE}"])   # accepted as is
    out = tmp_path / "spectra.html"
    assert main(["spectra", str(folder), "--html", str(out)]) == 0
    capsys.readouterr()
    html = out.read_text(encoding="utf-8")
    assert "y&lt;/b&gt;" in html or "y\\u003c/b\\u003e" in html          # the module names are in it, escaped
    figures = report_figures(html)
    assert figures and any("alert(5)" in json.dumps(f) for f in figures)     # the figures name the modules
    assert report_problems(html) == []
    assert "alert(5)" in html and "<img src=x onerror=alert(5)" not in html


def test_the_spectra_page_shows_an_uploaded_hostile_adapter_as_text(lora_home, tmp_path):
    folder = _hostile_adapter(tmp_path / "adapter")
    at = open_page("spectra")
    at.radio(key="spectra_src").set_value("Upload a PEFT adapter").run()
    files = [("adapter_config.json", (folder / "adapter_config.json").read_bytes(), JSON),
             ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes(), BIN)]
    at.file_uploader(key="spectra_upload").set_value(files).run()
    clean(at)
    table = [d.value for d in at.dataframe if "name" in d.value.columns]
    assert table and MODULE in set(table[0]["name"])                     # the names reached the page
    specs = chart_specs(at)
    assert specs and any("onerror=alert(5)" in json.dumps(s) for s in specs)
    assert any(MODULE in shown(t) for _, t, _ in rendered_texts(at))   # and into the page's markdown, escaped
    assert markup_left(at) == []
