"""The viewer (`dashboard`, `watch`) and monitoring/ in an environment without torch.

A venv holding only the viewer's dependencies (numpy, plotly, rich at the pinned versions) is
built once and cached beside the project's other environments; megatron-gate itself comes from
this checkout on PYTHONPATH. Where the venv cannot be built (no package index), the same checks
run in this interpreter with `torch` made unimportable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_gate.dashboard.synthetic import SyntheticRun, write_run

ROOT = Path(__file__).resolve().parents[2]
VIEWER_PACKAGES = ("numpy", "plotly", "rich")
MAX_SERVER_RSS_MB = 250  # with torch imported the server took 517 MB


def _pins() -> list[str]:
    pins = {}
    for line in (ROOT / "requirements" / "py312.txt").read_text().splitlines():
        name = line.split("==")[0].strip().lower()
        if name in VIEWER_PACKAGES:
            pins[name] = line.strip()
    return [pins.get(p, p) for p in VIEWER_PACKAGES]


def _build_venv(target: Path, pins: list[str]) -> bool:
    cache = target.parent
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".viewer-"))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True,
                       capture_output=True, timeout=120)  # fmt: skip
        subprocess.run([sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"),
                        "install", "-q", *pins], check=True, capture_output=True, timeout=600)  # fmt: skip
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return True


@pytest.fixture(scope="module")
def torch_free(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[str, str]]:
    """(python command, environment) of an interpreter where `import torch` fails."""
    pins = _pins()
    cache = Path(os.environ.get("MEGATRON_GATE_CACHE", Path.home() / ".cache" / "megatron-gate"))
    key = hashlib.sha256(f"{sys.version}{pins}".encode()).hexdigest()[:12]
    venv = cache / f"viewer-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(ROOT)
    if (venv / ".complete").exists() or _build_venv(venv, pins):
        return [str(venv / "bin" / "python")], env
    # No index to install from: block torch in this interpreter instead.
    blocker = tmp_path_factory.mktemp("no_torch")
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(ROOT), *sys.path[1:]])
    return [sys.executable], env


def _run(torch_free, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    python, env = torch_free
    return subprocess.run([*python, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)  # fmt: skip


def test_torch_is_not_importable_there(torch_free) -> None:
    result = _run(torch_free, "-c", "import torch")
    assert result.returncode != 0 and "torch" in result.stderr


def test_export_watch_and_monitoring_without_torch(torch_free, tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=4, gated_layers=[2, 4], spike_steps=[30])
    run_dir = write_run(tmp_path / "r", steps=60, run=run, finished=False).parent
    out = tmp_path / "report.html"
    result = _run(
        torch_free, "-m", "megatron_gate.cli", "dashboard", str(run_dir), "--export", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 1_000_000
    result = _run(torch_free, "-m", "megatron_gate.cli", "watch", str(run_dir), "--once")
    assert result.returncode == 0, result.stderr
    assert "step 60" in result.stdout
    script = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('g', 'monitoring/generate.py')\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        "print(len(g.render())); assert 'torch' not in sys.modules\n"
    )
    result = _run(torch_free, "-c", script)
    assert result.returncode == 0 and result.stdout.strip() == "2", result.stderr


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_live_server_without_torch(torch_free, tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "r", steps=200, run=SyntheticRun(num_layers=8)).parent
    python, env = torch_free
    started = time.time()
    process = subprocess.Popen(
        [*python, "-m", "megatron_gate.cli", "dashboard", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"}, cwd=ROOT,
    )  # fmt: skip
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line, line + process.stderr.read()
        url = line.split(" at ", 1)[1].split()[0]
        deadline = time.time() + 20
        while True:
            with urllib.request.urlopen(url + "api/status", timeout=5) as response:
                runs = json.load(response)["runs"]
            if runs[0]["last_step"] == 200 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert runs[0]["last_step"] == 200
        with urllib.request.urlopen(url + "api/view", timeout=10) as response:
            assert json.load(response)["runs"][0]["scalars"]["loss"]["x"][-1] == 200
        ready = time.time() - started
        rss = _rss_peak_mb(process.pid)
        print(f"torch-free dashboard: ready in {ready:.1f} s, peak RSS {rss:.0f} MB")
        if sys.platform.startswith("linux"):
            assert rss < MAX_SERVER_RSS_MB
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        process.stdout.close()
        process.stderr.close()
