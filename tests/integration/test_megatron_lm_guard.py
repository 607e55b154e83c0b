"""The guard in Megatron-LM's own loop at TP=2 with the distributed optimizer (one torchrun run):
a NaN loss at iteration 3 and a 1000x loss at iteration 11, both at non-logged steps, are not
applied: the weights, the optimizer state and the LR scheduler of iterations 3 and 11 are
bit-identical to those of the iteration before; Megatron counts both as skipped."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_runs import DATA, checkpoint_state, differences, run_pretrain

from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow

FAULT_SCRIPT = DATA / "pretrain_with_faults.py"


def test_guard_skips_nan_and_spike_at_tp2_with_distributed_optimizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGATRON_GATE_FAULTS", "3:nan,11:1000")
    save = tmp_path / "ckpt"
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text(
        "log_interval: 5\nlayer_interval: 10\nsinks: {console: false}\nguard: {min_history: 6}\n"
    )
    run = run_pretrain(
        FAULT_SCRIPT, "--train-iters", "12", "--tensor-model-parallel-size", "2",
        "--use-distributed-optimizer",  # Megatron's NaN check left on: the guard takes over
        "--gated-attention", "headwise", "--stability-config", str(monitor_yaml),
        "--save", str(save), "--save-interval", "1", "--ckpt-format", "torch",
        nproc=2, timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    assert "--check-for-nan-in-loss-and-grad (which stops the run) is off" in run.output
    skipped = run.skipped()
    assert {i: n for i, n in skipped.items() if n} == {3: 1, 11: 1}, skipped
    for rank in (0, 1):
        for bad in (3, 11):
            before, after = checkpoint_state(save, bad - 1, rank), checkpoint_state(save, bad, rank)
            assert differences(before, after) == [], (rank, bad)
        # a normal iteration does change the weights (the comparison can fail)
        assert differences(checkpoint_state(save, 3, rank), checkpoint_state(save, 4, rank))
    events = [r for r in read_records(save / "stability") if r["kind"] == "event"]
    guard = [(e["step"], e["metric"], e["severity"]) for e in events if e["detector"] == "guard"]
    assert guard == [(3, "loss", "critical"), (11, "loss", "critical")]  # the monitor acted
    steps = {r["step"]: r for r in read_records(save / "stability") if r["kind"] == "step"}
    assert steps[12]["scalars"]["skipped_steps"] == 2
