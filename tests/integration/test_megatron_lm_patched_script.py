"""A script patched with `patches/`, whose imports bind `pretrain` before `enable_megatron_gate()`
runs (the structure of Megatron-LM's real `pretrain_gpt.py`): the monitor's record is whole, and
the one CPU switch `megatron_gate.cpu.enable_cpu_runtime()` alone runs Megatron-LM's loop."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from pretrain_runs import DATA, REPO, run_pretrain

from megatron_gate.megatron_lm.monitor_hooks import STATE_KEY
from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow

PATCH = REPO / "patches" / "megatron-lm-core_v0.19.0-pretrain_gpt.patch"
IMPORTS_FIRST = DATA / "megatron_lm" / "imports_first"


def _patched_script(folder: Path) -> Path:
    """The imports-first script with the real 0.19.0 patch applied, beside its sibling module."""
    script = folder / "pretrain_gpt.py"
    shutil.copy(IMPORTS_FIRST / "pretrain_gpt.py.template", script)
    shutil.copy(IMPORTS_FIRST / "gpt_parts.py", folder / "gpt_parts.py")
    subprocess.run(["git", "apply", str(PATCH)], cwd=folder, check=True)
    text = script.read_text()
    # The patched lines come before the `pretrain` call, but after the imports that bind it.
    assert text.index("\nfrom megatron.training import pretrain") < text.index(
        "\n    enable_megatron_gate()"
    )
    return script


def _run(tmp_path: Path, *args: str):
    monitor_yaml = tmp_path / "monitor.yaml"
    # log_interval 10: steps 11 on are still buffered when training ends.
    monitor_yaml.write_text("log_interval: 10\nlayer_interval: 10\nsinks:\n  console: false\n")
    return run_pretrain(
        _patched_script(tmp_path), "--gated-attention", "headwise",
        "--stability-config", str(monitor_yaml), "--save", str(tmp_path / "ckpt"),
        "--ckpt-format", "torch", *args, through_megatron_gate=False,
    )  # fmt: skip


def _steps(records: list[dict]) -> list[int]:
    return sorted(r["step"] for r in records if r["kind"] == "step")


def test_patched_script_writes_every_step_and_run_end(tmp_path: Path) -> None:
    run = _run(tmp_path, "--train-iters", "15", "--save-interval", "100")
    assert run.returncode == 0, run.output[-3000:]
    assert run.lines("megatron-gate: gated attention on layers 1-2 of 2 | granularity headwise")
    assert sorted(run.losses()) == list(range(1, 16))  # the CPU switch alone ran the loop
    records = read_records(tmp_path / "ckpt" / "stability")
    assert _steps(records) == list(range(1, 16))
    assert records[-1] == {**records[-1], "kind": "run_end", "status": "completed", "step": 15}
    # The final checkpoint (saved by pretrain after training) still carries the monitor's state.
    path = tmp_path / "ckpt" / "iter_0000015" / "mp_rank_00" / "model_optim_rng.pt"
    assert torch.load(path, map_location="cpu", weights_only=False)[STATE_KEY]["step"] == 15


def test_megatron_exit_interval_closes_the_record(tmp_path: Path) -> None:
    """`--exit-interval` leaves Megatron's loop through `sys.exit` after its checkpoint."""
    run = _run(tmp_path, "--train-iters", "20", "--exit-interval", "12", "--save-interval", "100")
    assert run.returncode == 0, run.output[-3000:]
    assert max(run.losses()) == 12
    records = read_records(tmp_path / "ckpt" / "stability")
    assert _steps(records) == list(range(1, 13))
    assert records[-1] == {**records[-1], "kind": "run_end", "status": "completed", "step": 12}
