"""The page in headless Chromium: a live run grows on screen; the export renders with no network.

Chromium and its driver come from Debian (`scripts/ensure_chromium.sh` installs them when it can);
where they cannot be had, these tests skip and say why. Set MEGATRON_GATE_SCREENSHOTS=DIR to keep
the screenshots (they always go to the test's tmp dir too).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_gate.dashboard.export import export_html
from megatron_gate.dashboard.store import load_run
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line
from megatron_gate.monitor.schema import JSONL_NAME
from megatron_gate.monitor.sinks.jsonl import JsonlSink

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)

ROOT = Path(__file__).resolve().parents[2]
PAGE_TIMEOUT = 30.0


def _chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing them when possible; skips when impossible."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "ensure_chromium.sh")], capture_output=True, text=True, timeout=600
    )
    chromedriver = shutil.which("chromedriver")
    if result.returncode != 0 or not chromedriver:
        pytest.skip(
            f"headless Chromium is not available here: {result.stderr.strip() or 'no chromedriver'}"
        )
    return result.stdout.strip(), chromedriver


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    chromium, chromedriver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1900",
        "--hide-scrollbars",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=chromedriver), options=options
    )
    yield driver
    driver.quit()


def _wait_for(driver, script: str, predicate, timeout: float = PAGE_TIMEOUT):
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(script)
        if predicate(value):
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting on `{script}`; last value {value!r}")
        time.sleep(0.2)


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    keep = os.environ.get("MEGATRON_GATE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    assert path.stat().st_size > 10_000  # a real, non-blank PNG
    return path


LAST_LOSS_STEP = "const d = document.getElementById('chart-loss').data; return d && d.length ? Math.max(...d[0].x) : null;"


def test_live_page_shows_new_points(browser, serve, tmp_path: Path) -> None:
    run = SyntheticRun(name="live", num_layers=8, gated_layers=[2, 4, 6, 8], spike_steps=[30, 95])
    path = tmp_path / "live" / JSONL_NAME
    path.parent.mkdir()
    path.write_text(to_line(run.run_start()) + "".join(to_line(r) for r in run.records(1, 40)))
    stop = threading.Event()

    def keep_training() -> None:  # a run still being written by the monitor's JSONL sink
        sink = JsonlSink(path.parent)
        try:
            for step in range(41, 10_000):
                if stop.wait(0.05):
                    return
                for record in run.step(step):
                    sink.write(record)
        finally:
            sink.close()

    writer = threading.Thread(target=keep_training, daemon=True)
    server = serve([path.parent])
    writer.start()
    try:
        browser.get(server.url)
        first = _wait_for(browser, LAST_LOSS_STEP, lambda v: v is not None)
        # The page polls every 2 s: within a few seconds, later steps are on the chart.
        later = _wait_for(
            browser, LAST_LOSS_STEP, lambda v: v is not None and v >= first + 20, timeout=15
        )
        assert later > first
        rendered = browser.execute_script("return window.dashboardRenders")
        assert rendered >= 2
        heat = browser.execute_script(
            "const d = document.getElementById('heat-0-max_abs_residual').data[0];"
            "return [d.z.length, Math.max(...d.x)];"
        )
        assert heat[0] == 8 and heat[1] >= first  # 8 layers, and the heatmap grows too
        _wait_for(
            browser, "return document.querySelectorAll('#events tbody tr').length", lambda n: n >= 1
        )
        chip = browser.execute_script("return document.querySelector('.run').textContent")
        assert "live" in chip and "running" in chip
        time.sleep(2.5)  # let the next poll land so the screenshot shows the grown run
        _screenshot(browser, tmp_path, "dashboard_live.png")
    finally:
        stop.set()
        writer.join()


def test_export_renders_without_network(browser, two_runs: list[Path], tmp_path: Path) -> None:
    out = export_html([load_run(d) for d in two_runs], tmp_path / "report.html")
    browser.set_network_conditions(
        offline=True, latency=0, download_throughput=0, upload_throughput=0
    )
    try:
        browser.get(out.as_uri())
        _wait_for(browser, "return window.dashboardRenders || 0", lambda n: n >= 1)
        traces = browser.execute_script("return document.getElementById('chart-loss').data.length")
        assert traces >= 2  # both runs drawn
        svgs = browser.execute_script(
            "return document.querySelectorAll('#heatmaps .main-svg').length"
        )
        assert svgs >= 6
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert [u for u in fetched if not u.startswith(("file:", "data:", "blob:"))] == []
        _screenshot(browser, tmp_path, "dashboard_export.png")
    finally:
        browser.delete_network_conditions()
