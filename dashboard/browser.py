"""Drive the dashboard in a real headless Chromium: start ``streamlit run`` on a free localhost port, wait
for it, open pages and wait until Streamlit is idle. Used by the browser tests and the dashboard benchmark.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (its own browser download is not
used, so nothing is fetched).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dashboard_server(home: Path, timeout: float = 180.0):
    """``streamlit run dashboard/app.py`` headless with LORA_ANALYSIS_HOME=home; yields its base URL once
    /_stcore/health answers ok, and stops it afterwards."""
    port = free_port()
    env = dict(os.environ, LORA_ANALYSIS_HOME=str(home), PYTHONUNBUFFERED="1")
    log_path = Path(home) / "streamlit.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "app.py"), "--server.headless",
             "true", "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats",
             "false", "--server.fileWatcherType", "none"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        try:
            while True:
                try:
                    if urllib.request.urlopen(url + "/_stcore/health", timeout=2).read() == b"ok":
                        break
                except OSError:
                    pass
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("streamlit did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_idle(page, timeout: float = 180.0, quiet: float = 0.8) -> None:
    """Wait until Streamlit has rendered and its script has not been running for ``quiet`` seconds."""
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
        elif time.time() - quiet_since > quiet:
            return
        time.sleep(0.05)
    raise AssertionError("the page did not finish running in time")


def open_page(browser, url: str, height: int = 1800):
    # tall: Streamlit scrolls inside its own container, so a "full page" shot is only the viewport
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(url)
    wait_idle(page)
    return page
