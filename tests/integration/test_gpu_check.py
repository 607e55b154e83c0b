"""`scripts/gpu_check.sh` for an offline GPU machine: its CPU-side logic as CI runs it
(`--dry-run`: the wheels' list, the plan, the budget, the gpu-test collection), its one-line
errors, and its CUDA checks run on a CPU at tiny shapes (the same code the GPU runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_runs import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
WHEELS = REPO / "scripts" / "gpu_check_wheels.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--python", sys.executable, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def _wheels(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WHEELS), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_dry_run_writes_the_plan_within_the_budget(tmp_path: Path) -> None:
    result = _run("--dry-run", "--out", str(tmp_path), "--wheels", str(tmp_path / "no-wheels"))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {step["name"]: step for step in summary["steps"]}
    assert list(steps) == ["wheels", "gpu_tests", "correctness", "guard", "gate_bench",
                           "monitor_bench"]  # fmt: skip
    assert all(step["status"] == "planned" for step in steps.values())
    assert sum(step["limit_seconds"] for step in steps.values()) <= 480  # 8 minutes on one GPU
    assert "--no-index" in steps["wheels"]["command"]  # offline
    assert "transformer-engine" not in json.dumps(summary)  # nothing installed from a network
    assert "-m gpu" in steps["gpu_tests"]["command"]
    assert "--hidden 4096" in steps["monitor_bench"]["command"]
    assert f"--out {tmp_path}" in steps["gate_bench"]["command"]
    listed = {wheel["name"]: wheel["version"] for wheel in summary["wheels"]["wheels"]}
    assert listed["megatron_core"] == "0.19.2"
    assert summary["gpu_tests_collected"] >= 10


def test_wheel_list_pins_match_the_tested_requirements() -> None:
    pins = dict(
        line.split("#")[0].strip().split("==")
        for line in (REPO / "requirements" / "py312.txt").read_text().splitlines()
        if "==" in line.split("#")[0]
    )
    listed = (REPO / "scripts" / "gpu_check_wheels.txt").read_text()
    entries = [line for line in listed.splitlines() if line and not line.startswith("#")]
    assert "megatron-core==0.19.2" in entries
    for entry in entries:
        name, version = entry.split("==")
        assert pins[name] == version


def test_wrong_or_doubled_wheels_are_one_line_errors(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    (folder / "megatron_core-0.19.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    result = _wheels("check", "--wheels", str(folder))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "megatron-gate gpu-check: error: megatron_core-0.19.1-cp312-cp312-manylinux_2_28_x86_64"
        f".whl is not megatron_core==0.19.2 ({folder}): fetch again with "
        "scripts/gpu_check_wheels.py fetch"
    ]
    (folder / "megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    result = _wheels("check", "--wheels", str(folder))
    assert result.returncode == 2 and "keep one version" in result.stderr
    bad = tmp_path / "list.txt"
    bad.write_text("megatron-core\n")
    result = _wheels("check", "--list", str(bad))
    assert result.returncode == 2 and "line 1 is not name==version" in result.stderr
    # an existing folder must hold every listed wheel (a dry run catches a forgotten fetch)
    result = _run("--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path))
    assert result.returncode == 2 and "no wheel of megatron_core" in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


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


@pytest.mark.slow
@pytest.mark.parametrize("check", ["correctness", "guard", "gate-bench"])
def test_cuda_checks_run_on_a_cpu_at_tiny_shapes(tmp_path: Path, check: str) -> None:
    command = [sys.executable, str(REPO / "scripts" / "gpu_check_cuda.py"), check, "--out",
               str(tmp_path), "--device", "cpu", "--small", "--steps", "12", "--repeats", "2"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / f"{check.replace('-', '_')}.json").read_text())
    if check == "correctness":
        errors = [v["relative_error"] for v in report["bf16_vs_fp32"].values()]
        assert report["passed"] and all(0 < error < 2e-2 for error in errors)
    elif check == "guard":
        assert report["unlogged_steps_without_host_sync"] > 0 and report["final_loss"] > 0
    else:
        assert set(report["ratio_to_no_gate"]) == {"no_gate", "native_elementwise",
                                                   "ours_headwise", "ours_elementwise"}  # fmt: skip
