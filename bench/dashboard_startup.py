"""Start-up cost of `megatron-gate dashboard`: torch-free (as shipped) against torch imported first
(what the command cost while `megatron_gate.monitor`'s package import pulled torch in).

    .venv/bin/python bench/dashboard_startup.py          # writes bench/results/dashboard_startup.json

Both variants run in the same interpreter and environment, alternately, `--repeats` times each:
start the server on a 200-step, 8-layer synthetic run, time until `/api/status` reports the last
step, and read the peak resident memory (VmHWM) of the server process. Ratios are the numbers to
quote; absolute times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from megatron_gate.dashboard.synthetic import SyntheticRun, write_run

RESULTS = Path(__file__).resolve().parent / "results" / "dashboard_startup.json"
VARIANTS = {
    "torch-free": "from megatron_gate.cli import main; raise SystemExit(main())",
    "torch imported first": "import torch; from megatron_gate.cli import main; raise SystemExit(main())",
}


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def measure(code: str, run_dir: Path, steps: int) -> tuple[float, float]:
    """(seconds to a status with the last step, peak RSS in MB) of one server start."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code, "dashboard", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = process.stdout.readline().split(" at ", 1)[1].split()[0]
        while True:
            with urllib.request.urlopen(url + "api/status", timeout=30) as response:
                if json.load(response)["runs"][0]["last_step"] == steps:
                    break
            time.sleep(0.05)
        return time.perf_counter() - started, _peak_rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    steps = 200
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = write_run(Path(tmp) / "r", steps=steps, run=SyntheticRun(num_layers=8)).parent
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for _ in range(args.repeats):
            for name, code in VARIANTS.items():
                samples[name].append(measure(code, run_dir, steps))
    result = {
        name: {
            "ready_s_median": round(statistics.median(s for s, _ in values), 2),
            "peak_rss_mb_median": round(statistics.median(m for _, m in values), 1),
        }
        for name, values in samples.items()
    }
    free, heavy = result["torch-free"], result["torch imported first"]
    result["ratio torch-imported / torch-free"] = {
        "ready": round(heavy["ready_s_median"] / free["ready_s_median"], 1),
        "peak_rss": round(heavy["peak_rss_mb_median"] / free["peak_rss_mb_median"], 1),
    }
    result["repeats"] = args.repeats
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
