"""`scripts/gpu_check.sh`: its CPU-side logic (the plan, the gpu-test collection, the budget,
bad arguments), with `--dry-run` as CI runs it; on a CPU without it, a one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pretrain_runs import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_dry_run_writes_the_plan_within_the_budget(tmp_path: Path) -> None:
    result = _run("--dry-run", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["install_te", "gpu_tests", "gate_bench", "monitor_bench"]
    assert all(step["status"] == "planned" for step in steps.values())
    assert sum(step["limit_seconds"] for step in steps.values()) <= 480  # 8 minutes on one GPU
    assert "transformer-engine[pytorch]" in steps["install_te"]["command"]
    assert "-m gpu" in steps["gpu_tests"]["command"]
    assert f"--out {tmp_path}/gate_overhead.json" in steps["gate_bench"]["command"]
    assert f"--output {tmp_path}/monitor_overhead.json" in steps["monitor_bench"]["command"]
    assert (
        summary["gpu_tests_collected"] >= 10
    )  # this file's and tests/test_transformer_engine.py's


def test_without_cuda_or_with_bad_arguments_one_line_and_exit_2(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "megatron-gate gpu-check: error: no CUDA device (torch.cuda.is_available() is False): "
        "run on a GPU machine, or pass --dry-run"
    ]
    assert not (tmp_path / "summary.json").exists()
    result = _run("--dry-run", "--budget", "60", "--out", str(tmp_path))
    assert result.returncode == 2 and "more than the budget (--budget 60)" in result.stderr
