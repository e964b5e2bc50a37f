"""The dashboard in a real headless Chromium: every page renders without an exception, the quick demo
fills the pages with charts, and the screenshots in docs/screenshots/ come from here
(``UPDATE_SCREENSHOTS=1 python -m pytest tests/test_dashboard_browser.py``).

Needs Debian's chromium at /usr/bin/chromium (``.ci/run`` installs it); skipped where it is missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")

# (url path, title shown on the page)
PAGES = [
    ("", "lora-analysis"),
    ("params", "Parameter savings"),
    ("finetune", "Fine-tune"),
    ("spectra", "Spectra"),
    ("rank_alpha", "Rank & alpha effects"),
    ("subspaces", "Subspaces"),
    ("merge", "Merge equivalence"),
    ("reports", "Reports"),
]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    port = free_port()
    env = dict(os.environ, LORA_ANALYSIS_HOME=str(home), PYTHONUNBUFFERED="1")
    log = open(home / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("streamlit did not start:\n" + (home / "streamlit.log").read_text()[-3000:])
        time.sleep(0.3)
    yield url, home
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    if os.environ.get("UPDATE_SCREENSHOTS"):
        out = ROOT / "docs" / "screenshots"
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp("screenshots")


def wait_idle(page, timeout: float = 60.0) -> None:
    """Wait until Streamlit has rendered and its script is no longer running."""
    page.wait_for_selector('[data-testid="stMain"]', timeout=timeout * 1000)
    deadline = time.time() + timeout
    quiet_since = None
    while time.time() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0 or \
            page.locator('[data-testid="stSkeleton"]').count() > 0
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since > 0.8:
            return
        time.sleep(0.1)
    raise AssertionError("the page did not finish running in time")


def assert_clean(page, where: str) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{where}: {exceptions.first.inner_text()[:500]}"
    body = page.inner_text("body")
    assert "Traceback" not in body, where


def open_page(browser, url: str):
    # tall: Streamlit scrolls inside its own container, so a "full page" shot is only the viewport
    page = browser.new_page(viewport={"width": 1280, "height": 1800})
    page.goto(url)
    wait_idle(page)
    return page


def test_every_page_renders_on_an_empty_store(server, browser):
    url, _ = server
    for path, title in PAGES:
        page = open_page(browser, f"{url}/{path}")
        assert_clean(page, path or "home")
        page.get_by_role("heading", name=title).first.wait_for(timeout=10_000)
        page.close()


def test_quick_demo_fills_the_pages(server, browser, shots):
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("button", name="Run the quick demo").click()
    page.get_by_text("Done:").first.wait_for(timeout=180_000)
    wait_idle(page)
    assert_clean(page, "home after demo")
    page.screenshot(path=str(shots / "home.png"), full_page=True)
    page.close()
    for path, title in PAGES[1:]:
        page = open_page(browser, f"{url}/{path}")
        assert_clean(page, path)
        if path not in ("finetune", "reports"):
            page.wait_for_selector(".js-plotly-plot", timeout=60_000)
            wait_idle(page)
            assert page.locator(".js-plotly-plot").count() >= 1, path
        page.screenshot(path=str(shots / f"{path}.png"), full_page=True)
        page.close()
