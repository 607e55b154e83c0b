"""Scale benchmark of the stability dashboard: 128 layers x 100,000 logged steps.

    .venv/bin/python bench/dashboard_scale.py            # writes bench/results/dashboard_scale.json

Writes a synthetic run in the monitor's JSONL schema (every step carries all 12 per-layer metrics
for all 128 layers: the worst case; the monitor's default logs layers every 100th step), then
measures: reading it into the dashboard, the bytes and time of what the page fetches on its
first load (gzip, as a browser receives it), the answer to a zoom/pan request, and, where
headless Chromium is available, the page's load time and pan latency in a real browser.
Not a test: numbers depend on the machine (state it when quoting them).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from megatron_gate.dashboard.server import Dashboard, DashboardHTTPServer
from megatron_gate.dashboard.store import RunStore
from megatron_gate.dashboard.synthetic import SyntheticRun, write_run
from megatron_gate.monitor.schema import JSONL_NAME

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "dashboard_scale.json"


def _fetch(server: DashboardHTTPServer, path: str) -> tuple[int, float]:
    """(bytes on the wire with gzip, seconds) of one GET."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=120)
    start = time.perf_counter()
    connection.request("GET", path, headers={"Accept-Encoding": "gzip"})
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - start
    connection.close()
    assert response.status == 200, (path, response.status)
    return len(body), elapsed


def _http_numbers(server: DashboardHTTPServer, last_step: int) -> dict[str, Any]:
    # What the page asks for on a 1400-px wide window: 2 x chart width line points,
    # chart width / 1.5 heatmap columns (see dashboard.js requestSize).
    first_load = ["/", "/static/dashboard.css", "/static/plotly.min.js", "/static/dashboard.js",
                  "/api/view?points=1300&heatmap=433"]  # fmt: skip
    sizes, times = {}, {}
    for path in first_load:
        sizes[path], times[path] = _fetch(server, path)
    window = last_step // 20  # a zoom to 5% of the run, then pans across it
    pans = []
    for i in range(5):
        start = 10_000 + i * window // 2
        pans.append(
            _fetch(server, f"/api/view?points=1300&heatmap=433&start={start}&end={start + window}")
        )
    return {
        "first_load_bytes_gzip": sum(sizes.values()),
        "first_load_bytes_by_request": sizes,
        "first_load_http_seconds": round(sum(times.values()), 3),
        "view_full_run_seconds": round(times[first_load[-1]], 3),
        "view_full_run_bytes_gzip": sizes[first_load[-1]],
        "pan_window_steps": window,
        "pan_request_seconds_median": round(statistics.median(t for _, t in pans), 3),
        "pan_request_bytes_gzip_median": int(statistics.median(b for b, _ in pans)),
    }


def _browser_numbers(url: str) -> dict[str, Any]:
    """Load and pan in headless Chromium (Selenium); {} with a reason where it is not available."""
    ensure = subprocess.run(
        [str(ROOT / "scripts" / "ensure_chromium.sh")], capture_output=True, text=True
    )
    if ensure.returncode != 0 or not shutil.which("chromedriver"):
        return {"skipped": ensure.stderr.strip() or "chromedriver not found"}
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = ensure.stdout.strip()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1900"):  # fmt: skip
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_script_timeout(300)
        driver.get(url)
        load_ms = driver.execute_async_script(
            "const done = arguments[0];"
            "(function wait() { if (window.dashboardRenders >= 1) done(performance.now());"
            " else setTimeout(wait, 20); })();"
        )
        transfer = driver.execute_script(
            "const nav = performance.getEntriesByType('navigation')[0];"
            "return performance.getEntriesByType('resource').reduce((n, e) => n + e.transferSize,"
            " nav.transferSize);"
        )
        pans = []
        for i in range(5):
            start = 20_000 + i * 2_500
            pans.append(driver.execute_async_script(
                "const [start, done] = arguments; const before = window.dashboardRenders;"
                "const t0 = performance.now();"
                "Plotly.relayout('chart-loss', {'xaxis.range': [start, start + 5000]});"
                "(function wait() { if (window.dashboardRenders > before) done(performance.now() - t0);"
                " else setTimeout(wait, 10); })();",
                start,
            ))  # fmt: skip
        return {
            "page_load_to_rendered_ms": round(load_ms),
            "page_transfer_bytes": transfer,
            "pan_to_rendered_ms_median": round(statistics.median(pans)),
            "pan_to_rendered_ms_all": [round(p) for p in pans],
        }
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument(
        "--keep", type=Path, help="write the run here and keep it (default: a temp dir)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    work = args.keep or Path(tempfile.mkdtemp(prefix="dashboard_scale_"))
    try:
        run = SyntheticRun(name="scale", num_layers=args.layers, gated_layers=range(1, args.layers + 1, 2),
                           spike_steps=range(7_777, args.steps, 10_000))  # fmt: skip
        start = time.perf_counter()
        path = work / "scale" / JSONL_NAME
        if not (args.keep and path.exists()):  # --keep DIR again: reuse the file written before
            write_run(path.parent, steps=args.steps, run=run)
        write_seconds = time.perf_counter() - start
        print(
            f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {write_seconds:.0f} s",
            flush=True,
        )

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store = RunStore(path.parent)
        start, cpu_start = time.perf_counter(), time.process_time()
        store.refresh(final=True)
        read_seconds = time.perf_counter() - start
        read_cpu_seconds = time.process_time() - cpu_start
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"read in {read_seconds:.1f} s ({read_cpu_seconds:.1f} s CPU)", flush=True)
        cpu_start = time.process_time()
        store.view(points=1300, heatmap_buckets=433)
        view_cpu_seconds = time.process_time() - cpu_start

        dashboard = Dashboard([store])
        dashboard.start_polling()
        server = DashboardHTTPServer(dashboard, port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            http_numbers = _http_numbers(server, args.steps)
            print(json.dumps(http_numbers, indent=1), flush=True)
            browser_numbers = _browser_numbers(server.url)
            print(json.dumps(browser_numbers, indent=1), flush=True)
        finally:
            server.shutdown()
            dashboard.stop_polling()
        result = {
            "command": "python bench/dashboard_scale.py"
            + (
                ""
                if (args.layers, args.steps) == (128, 100_000)
                else f" --layers {args.layers} --steps {args.steps}"
            ),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            "load_average_at_end": os.getloadavg()[0],
            "layers": args.layers,
            "logged_steps": args.steps,
            "per_layer_metrics_per_step": 12,
            "jsonl_bytes": path.stat().st_size,
            "write_seconds": round(write_seconds, 1),
            "read_seconds": round(read_seconds, 1),
            "read_cpu_seconds": round(read_cpu_seconds, 1),
            "view_full_run_cpu_seconds": round(view_cpu_seconds, 3),
            "load_average_at_start": load_at_start,
            "server_peak_rss_increase_mb": round((rss_after - rss_before) / 1024),
            "http": http_numbers,
            "browser": browser_numbers,
        }
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.out)
        print(f"wrote {args.out}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
