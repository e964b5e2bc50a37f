"""The dashboard in a real headless Chromium: every page renders without an exception, the quick demo
fills the pages with charts, the HTML report opens offline with its charts drawn, and the screenshots in
docs/screenshots/ come from here (``UPDATE_SCREENSHOTS=1 python -m pytest tests/test_dashboard_browser.py``).

Needs Debian's chromium at /usr/bin/chromium (``.ci/run`` installs it); skipped where it is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dashboard.browser import CHROMIUM, ROOT, chromium, dashboard_server, open_page, wait_idle

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
pytest.importorskip("playwright.sync_api")

# (url path, title shown on the page)
PAGES = [
    ("", "lora-analysis"),
    ("params", "Parameter savings"),
    ("finetune", "Fine-tune"),
    ("spectra", "Spectra"),
    ("rank_alpha", "Rank & alpha effects"),
    ("subspaces", "Subspaces"),
    ("findings", "Findings"),
    ("merge", "Merge equivalence"),
    ("reports", "Reports"),
]

# every chart drawn on a page, as plotly.js holds it (typed arrays as lists)
PLOTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => JSON.stringify(
    {data: gd.data, layout: gd.layout},
    (k, v) => ArrayBuffer.isView(v) ? Array.from(v) : v))"""


def question_of(path: str) -> str:
    from tests.test_dashboard_pages import QUESTIONS

    return QUESTIONS[path or "home"]


def assert_answers(page, path: str) -> None:
    """The page's question under its title, and at least one answer computed from the runs under it."""
    page.get_by_text(question_of(path), exact=True).first.wait_for(timeout=60_000)
    answers = page.locator('[data-testid="stAlertContentInfo"], [data-testid="stAlertContentWarning"]')
    assert answers.count() >= 1, f"{path}: no answer shown"


def assert_axes_fit(page, path: str) -> None:
    """No chart's axis, as drawn, reaches far past its data."""
    from lora_analysis.plots.checks import axis_problems

    for spec in page.evaluate(PLOTS_JS):
        problems = axis_problems(spec)
        assert not problems, (path, problems)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with dashboard_server(home) as url:
        yield url, home


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    if os.environ.get("UPDATE_SCREENSHOTS"):
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")


def assert_clean(page, where: str) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{where}: {exceptions.first.inner_text()[:500]}"
    assert "Traceback" not in page.inner_text("body"), where


def test_every_page_renders_on_an_empty_store(server, browser):
    url, _ = server
    for path, title in PAGES:
        page = open_page(browser, f"{url}/{path}")
        assert_clean(page, path or "home")
        page.get_by_role("heading", name=title).first.wait_for(timeout=180_000)
        if path not in ("", "params", "finetune", "reports"):      # says so (wait: the body renders after the title)
            page.get_by_text("no completed runs yet").first.wait_for(timeout=180_000)
        page.close()


def test_a_trainer_callback_run_shows_its_spectra_over_training(server, browser, shots, tmp_path):
    """A fine-tune recorded by LoRASpectraCallback in a real transformers.Trainer, alone in the store (it is
    removed afterwards: the quick demo below starts from an empty store), shows its spectra over training."""
    from lora_analysis import runstore
    from tests.test_callback import trainer_callback_run

    url, home = server
    run = trainer_callback_run(tmp_path, runs_dir=home / "runs")["run"]
    try:
        page = open_page(browser, f"{url}/spectra")
        page.get_by_text("How the spectrum grew during training").first.wait_for(timeout=180_000)
        wait_idle(page)
        assert_clean(page, "spectra of the callback run")
        specs = [json.loads(s) for s in page.evaluate(PLOTS_JS)]
        (grew,) = [s for s in specs if "grew during training" in s["layout"]["title"]["text"]]
        assert len(grew["data"]) == 12                           # 6 modules, effective rank and ‖ΔW‖_F each
        assert_axes_fit(page, "spectra")
        page.get_by_text("How the spectrum grew during training").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "spectra_history.png"))
        page.close()
    finally:
        runstore.delete_run(run.id, home / "runs")


def test_quick_demo_fills_the_pages(server, browser, shots):
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("button", name="Run the quick demo").click()
    page.get_by_text("Done:").first.wait_for(timeout=600_000)
    wait_idle(page)
    assert_clean(page, "home after demo")
    page.reload()                 # the answer counts the demo's runs
    wait_idle(page)
    assert_answers(page, "")
    page.screenshot(path=str(shots / "home.png"))
    page.close()
    for path, title in PAGES[1:]:
        page = open_page(browser, f"{url}/{path}")
        assert_clean(page, path)
        if path != "reports":
            page.wait_for_selector(".js-plotly-plot", timeout=180_000)
            wait_idle(page)
            assert page.locator(".js-plotly-plot").count() >= 1, path
            assert_axes_fit(page, path)
        assert_answers(page, path)
        page.screenshot(path=str(shots / f"{path}.png"))
        page.close()


def test_report_opens_offline_with_charts(server, browser, tmp_path):
    """Build the report on the Reports page, download it, open it with the network cut off."""
    url, _ = server
    page = open_page(browser, f"{url}/reports")
    if page.get_by_role("button", name="Build the report").count() == 0:
        pytest.skip("needs the quick demo's runs (test_quick_demo_fills_the_pages)")
    page.get_by_role("button", name="Build the report").click()
    with page.expect_download(timeout=300_000) as download:
        page.get_by_role("button", name="Download report.html").click(timeout=300_000)
    path = tmp_path / "report.html"
    download.value.save_as(path)
    page.close()
    offline = browser.new_context(offline=True)
    report = offline.new_page()
    report.goto(path.as_uri())
    report.wait_for_selector(".js-plotly-plot .main-svg", timeout=120_000)
    assert report.locator(".js-plotly-plot").count() >= 6
    assert report.locator(".js-plotly-plot .main-svg").count() >= report.locator(".js-plotly-plot").count()
    offline.close()
