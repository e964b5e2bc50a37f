"""How fast the dashboard feels, measured in a real headless Chromium on this machine.

  - start: from launching ``streamlit run`` to the Home page rendered;
  - quick demo: from the click to its runs finished, and to the Spectra page's charts drawn;
  - page switch: from clicking a page in the sidebar to that page rendered with its charts (demo data).

    python -m benchmarks.bench_dashboard

Writes benchmarks/results/dashboard.json. Needs Debian's chromium and the playwright package.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from dashboard.browser import chromium, dashboard_server, wait_idle

RESULTS = Path(__file__).parent / "results"
SWITCH = [("Parameter savings", True), ("Spectra", True), ("Rank & alpha effects", True), ("Subspaces", True),
          ("Merge equivalence", True), ("Fine-tune", True), ("Reports", False), ("Home", True)]


def settle(page, charts: bool, timeout: float = 120.0) -> float:
    """Seconds until the page shows no running script (and, if asked, at least one drawn chart)."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count() > 0
        drawn = not charts or page.locator(".js-plotly-plot .main-svg").count() > 0
        if not running and drawn:
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError("the page did not settle")


def main() -> None:
    result: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor()}}
    with tempfile.TemporaryDirectory() as home, chromium() as browser:
        t0 = time.perf_counter()
        with dashboard_server(Path(home)) as url:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.get_by_role("heading", name="lora-analysis").first.wait_for(timeout=60_000)
            settle(page, charts=True)
            result["start_to_home_s"] = time.perf_counter() - t0

            t1 = time.perf_counter()
            page.get_by_role("button", name="Run the quick demo").click()
            page.get_by_text("Done:").first.wait_for(timeout=180_000)
            result["quick_demo_runs_s"] = time.perf_counter() - t1
            wait_idle(page)
            page.get_by_role("link", name="Spectra").click()
            page.get_by_role("heading", name="Spectra").first.wait_for()
            settle(page, charts=True)
            result["quick_demo_to_spectra_charts_s"] = time.perf_counter() - t1

            switches: dict[str, list[float]] = {name: [] for name, _ in SWITCH}
            for _ in range(3):          # the first round fills the caches; rounds 2-3 are what users feel
                for name, charts in SWITCH:
                    wait_idle(page, quiet=0.3)
                    t = time.perf_counter()
                    page.get_by_role("link", name=name).click()
                    page.get_by_role("heading", name="lora-analysis" if name == "Home" else name).first.wait_for()
                    settle(page, charts)
                    switches[name].append(time.perf_counter() - t)
            result["page_switch_first_visit_s"] = {k: v[0] for k, v in switches.items()}
            result["page_switch_cached_median_s"] = {k: statistics.median(v[1:]) for k, v in switches.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"streamlit run -> Home rendered: {result['start_to_home_s']:.1f} s")
    print(f"quick demo click -> runs done: {result['quick_demo_runs_s']:.1f} s; "
          f"-> Spectra charts drawn: {result['quick_demo_to_spectra_charts_s']:.1f} s")
    print(f"{'page switch':24s} {'first visit':>12s} {'cached':>8s}")
    for name in switches:
        print(f"{name:24s} {result['page_switch_first_visit_s'][name]:11.2f}s "
              f"{result['page_switch_cached_median_s'][name]:7.2f}s")


if __name__ == "__main__":
    main()
