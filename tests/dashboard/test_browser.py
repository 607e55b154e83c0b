"""The page in headless Chromium: a live run grows on screen; the export renders with no network.

Chromium and its driver come from Debian (`scripts/ensure_chromium.sh` installs them when it can);
where they cannot be had, these tests skip and say why. Set MEGATRON_GATE_SCREENSHOTS=DIR to keep
the screenshots (they always go to the test's tmp dir too).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_gate.dashboard.export import export_html
from megatron_gate.dashboard.store import load_run
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line, write_run
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


# ---- on real monitor output (tests/dashboard/real_run.py) ----

CHART_GEOMETRY = """
return Array.from(document.querySelectorAll('.chart')).filter(d => d._fullLayout && d.data)
  .map(d => ({id: d.id, range: d._fullLayout.xaxis.range.map(Number),
              left: d._fullLayout._size.l, width: d._fullLayout._size.w}));
"""


def _copy_run(source: Path, target: Path, *, drop_run_end: bool = False) -> Path:
    target.mkdir(parents=True)
    lines = (source / JSONL_NAME).read_text().splitlines(keepends=True)
    if drop_run_end:  # a run killed before it could write run_end
        lines = [line for line in lines if '"kind": "run_end"' not in line]
    (target / JSONL_NAME).write_text("".join(lines))
    return target


def _load(browser, server) -> None:
    browser.get(server.url)
    _wait_for(browser, "return window.dashboardRenders || 0", lambda n: n >= 1)


def _charts_agree(geometry: list[dict]) -> bool:
    first = geometry[0]
    return all(
        abs(g["range"][0] - first["range"][0]) < 1e-9
        and abs(g["range"][1] - first["range"][1]) < 1e-9
        and g["left"] == first["left"]
        and g["width"] == first["width"]
        for g in geometry
    )


def test_shared_step_axis_markers_and_click_to_zoom(
    browser, serve, real_run: Path, tmp_path: Path
) -> None:
    from megatron_gate.monitor.sinks.jsonl import read_records

    records = read_records(real_run)
    steps = [r["step"] for r in records if r["kind"] == "step"]
    layer_events = [r for r in records if r["kind"] == "event" and r["layer"] is not None]
    assert layer_events, "the real run must raise per-layer events"
    server = serve([real_run])
    _load(browser, server)
    assert browser.execute_script(
        "return document.querySelector('link[rel=icon]').href.startsWith('data:image/svg')"
    )
    # One step axis: every chart (lines and heatmaps) has the same x range and plot area.
    geometry = browser.execute_script(CHART_GEOMETRY)
    assert len(geometry) >= 7  # 4 line charts + 3 heatmaps
    assert _charts_agree(geometry), geometry
    assert geometry[0]["range"] == [min(steps), max(steps)]
    # Per-layer events sit at (step, layer) on their heatmap, not on the loss curve.
    metric = layer_events[0]["metric"]
    markers = browser.execute_script(
        f"const d = document.getElementById('heat-0-{metric}').data[1];return [d.x, d.y];"
    )
    expected = sorted((e["step"], e["layer"]) for e in layer_events if e["metric"] == metric)
    assert sorted(zip(*markers, strict=True)) == expected
    on_loss = browser.execute_script(
        "return document.getElementById('chart-loss').data.filter(t => t.mode === 'markers')"
        ".reduce((n, t) => n + t.x.length, 0)"
    )
    assert on_loss == len([r for r in records if r["kind"] == "event"]) - len(layer_events)
    # Zoom on one chart, around the last per-layer event (episodes: events are few): all follow.
    event = layer_events[-1]
    low = max(min(steps), event["step"] - 3)
    window = [low, low + 6]
    browser.execute_script(f"Plotly.relayout('chart-grad_norm', {{'xaxis.range': {window}}})")
    _wait_for(
        browser,
        CHART_GEOMETRY,
        lambda g: _charts_agree(g) and [round(x) for x in g[0]["range"]] == window,
    )
    # Filter the events table by severity and detector, then click an event: every chart
    # zooms to its step.
    detector = event["detector"]
    browser.execute_script(
        "const s = document.getElementById('filter-detector');"
        f"s.value = '{detector}'; s.dispatchEvent(new Event('change'));"
    )
    rows = browser.find_elements("css selector", "#events tbody tr")
    assert rows and all(detector in r.text for r in rows)
    badge = rows[0].find_element("css selector", ".badge")
    assert badge.text == event["severity"]
    target = int(rows[-1].get_attribute("data-step"))
    rows[-1].click()
    geometry = _wait_for(
        browser,
        CHART_GEOMETRY,
        lambda g: (
            _charts_agree(g)
            and g[0]["range"][0] < target < g[0]["range"][1]
            and [round(x) for x in g[0]["range"]] != window
        ),
    )
    assert geometry[0]["range"][1] - geometry[0]["range"][0] < max(steps) - min(steps) + 20
    _screenshot(browser, tmp_path, "dashboard_real.png")


def test_stale_badge_and_latest_values(browser, serve, real_run: Path, tmp_path: Path) -> None:
    from megatron_gate.dashboard.store import load_run

    killed = _copy_run(real_run, tmp_path / "killed", drop_run_end=True)
    finished = _copy_run(real_run, tmp_path / "finished")
    time.sleep(1.2)  # the last record is older than the 1 s stale limit below
    server = serve([killed, finished], stale_after=1.0)
    _load(browser, server)
    chips = _wait_for(
        browser,
        "return Array.from(document.querySelectorAll('.run')).map(c => c.textContent)",
        lambda c: len(c) == 2 and "stale" in c[0],
    )
    assert "running" in chips[0] and "last record" in chips[0]
    assert "completed" in chips[1] and "stale" not in chips[1]
    latest = load_run(killed).summary()["latest"]
    for key, label in (("loss", "loss"), ("grad_norm", "grad norm")):
        shown = f"{label} {float(f'{latest[key]:.4g}'):g}"
        assert shown in chips[0], (shown, chips[0])


def test_error_banner_shows_the_servers_message(
    browser, serve, real_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megatron_gate.dashboard.store import RunStore

    server = serve([real_run])
    _load(browser, server)
    banner = (
        "const b = document.getElementById('error-banner'); return b.hidden ? null : b.textContent;"
    )
    assert browser.execute_script(banner) is None

    def broken_view(self, **_window):  # the disk under the run fails while the page reads it
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(RunStore, "view", broken_view)
    browser.execute_script("window.dashboardZoomTo(5)")
    text = _wait_for(browser, banner, lambda t: t is not None)
    assert "500" in text and "Input/output error" in text
    assert browser.find_element("id", "error-banner").is_displayed()
    monkeypatch.undo()
    browser.execute_script("window.dashboardZoomTo(6)")
    _wait_for(browser, banner, lambda t: t is None)  # cleared by the next good answer


def test_banner_when_the_server_is_gone(browser, real_run: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "megatron_gate.cli", "dashboard", str(real_run), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        url = process.stdout.readline().split(" at ", 1)[1].split()[0]
        browser.get(url)
        _wait_for(browser, "return window.dashboardRenders || 0", lambda n: n >= 1)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: the server stops
        assert process.wait(timeout=20) == 0
        process.stdout.close()
    banner = (
        "const b = document.getElementById('error-banner'); return b.hidden ? null : b.textContent;"
    )
    text = _wait_for(browser, banner, lambda t: t is not None, timeout=15)
    assert "server unreachable" in text


def test_episodes_and_unknown_fields(browser, serve, tmp_path: Path) -> None:
    """Events of a newer monitor (episode fields, a guard detector, a field nobody knows, a
    literal NaN) are drawn and listed, and the page keeps working."""
    from megatron_gate.monitor.schema import SCHEMA

    path = write_run(tmp_path / "r", steps=200, run=SyntheticRun(num_layers=4), finished=False)
    episode = {
        "schema": SCHEMA, "kind": "event", "step": 120, "time": time.time(),
        "detector": "massive_activation", "severity": "critical", "metric": "max_abs_residual",
        "value": 9e4, "threshold": 1e4, "layer": 3, "action": "alert", "message": "episode",
        "start_step": 100, "end_step": 150, "peak": 9e4, "duration": 50, "delay": 2,
    }  # fmt: skip
    guard = {
        "schema": SCHEMA, "kind": "event", "step": 60, "time": time.time(), "detector": "guard",
        "severity": "warning", "metric": "loss", "value": float("nan"), "layer": None,
        "action": "skip_step", "message": "guard skipped", "start_step": 55, "end_step": 70,
        "novel_field": {"nested": [1, 2]},
    }  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(episode) + "\n" + json.dumps(guard) + "\n")  # NaN written literally
    server = serve([path.parent])
    browser.get(server.url)
    _wait_for(browser, "return window.dashboardRenders || 0", lambda n: n >= 1)
    bars = browser.execute_script(
        "const d = document.getElementById('heat-0-max_abs_residual').data[1];"
        "return [d.x, d.y, d.error_x.arrayminus, d.error_x.array];"
    )
    assert bars == [[120], [3], [20], [30]]  # the episode spans steps 100-150 at layer 3
    loss_bars = browser.execute_script(
        "const d = document.getElementById('chart-loss').data[1]; return [d.x, d.error_x.array];"
    )
    assert loss_bars == [[60], [10]]
    rows = browser.find_elements("css selector", "#events tbody tr.episode")
    texts = [r.text for r in rows]
    # One row per episode, in words, most severe first.
    for fragment in ("critical", "max_abs_residual", "in layer 3", "step 100, seen at 120",
                     "50 steps", "90000 vs 10000 (9×)", "alerted"):  # fmt: skip
        assert fragment in texts[0], (fragment, texts[0])
    for fragment in ("warning", "guard", "step 55, seen at 60", "16 steps", "skipped the update"):
        assert fragment in texts[1], (fragment, texts[1])
    # The raw record, field for field, is one click away (and a second click hides it).
    rows[1].find_element("css selector", "button.raw-toggle").click()
    raw = browser.find_element("css selector", "#events tbody tr.raw pre").text
    assert json.loads(raw)["novel_field"] == {"nested": [1, 2]}
    rows[1].find_element("css selector", "button.raw-toggle").click()
    assert browser.find_elements("css selector", "#events tbody tr.raw") == []
    assert browser.execute_script("return document.getElementById('error-banner').hidden")


def test_events_table_reads_as_words_on_a_real_run(browser, serve, real_run: Path) -> None:
    """One row per episode the real monitor opened, severity first, no `key=value` dumps."""
    from megatron_gate.monitor.schema import SEVERITIES, opens_episode
    from megatron_gate.monitor.sinks.jsonl import read_records

    events = [r for r in read_records(real_run) if r["kind"] == "event"]
    server = serve([real_run])
    _load(browser, server)
    rows = browser.find_elements("css selector", "#events tbody tr.episode")
    assert len(rows) == sum(map(opens_episode, events)) > 0
    headers = [h.text for h in browser.find_elements("css selector", "#events thead th")]
    assert headers[:1] == ["severity"] and "peak vs threshold" in headers
    severities = [r.find_element("css selector", ".badge").text for r in rows]
    assert sorted(severities, key=SEVERITIES.index, reverse=True) == severities
    for row in rows:
        cells = [c.text for c in row.find_elements("css selector", "td")]
        assert "=" not in row.text and cells[3].startswith("step ")
        assert cells[4].endswith(("step", "steps", "so far)")) and cells[6], cells
    rows[0].find_element("css selector", "button.raw-toggle").click()
    raw = browser.find_element("css selector", "#events tbody tr.raw pre").text
    first, _end = json.JSONDecoder().raw_decode(raw)  # the episode's records, one after another
    assert first["kind"] == "event" and "episode" in first
