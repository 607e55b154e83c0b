"""The guard in Megatron-LM's own loop at TP=2 with the distributed optimizer (one torchrun run):
a NaN loss at iteration 3 and a 1000x loss at iteration 11, both at non-logged steps, are not
applied: the weights, the optimizer state and the LR scheduler of iterations 3 and 11 are
bit-identical to those of the iteration before; Megatron counts both as skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pretrain_runs import DATA, run_pretrain

from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow

FAULT_SCRIPT = DATA / "pretrain_with_faults.py"
# Values that legitimately change from one saved iteration to the next.
CHANGING = {"iteration", "rng_state", "args", "num_floating_point_operations_so_far",
            "stability_monitor",  # the monitor's own history goes on (it saw the step)
            "checkpoint_version", "rerun_state_machine", "train_iters"}  # fmt: skip


def _checkpoint(save: Path, iteration: int, rank: int) -> dict[str, Any]:
    folder = save / f"iter_{iteration:07d}" / f"mp_rank_{rank:02d}"
    # files this test's own run just wrote (trusted): Megatron pickles its args in them
    state = torch.load(folder / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    state["distributed_optimizer"] = torch.load(
        folder / "distrib_optim.pt", map_location="cpu", weights_only=False
    )
    return state


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - CHANGING
        return [
            d
            for k in sorted(keys, key=str)
            for d in _differences(a.get(k), b.get(k), f"{path}/{k}")
        ]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}/{i}")
        ]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    return [] if a == b else [path]


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
            before, after = _checkpoint(save, bad - 1, rank), _checkpoint(save, bad, rank)
            assert _differences(before, after) == [], (rank, bad)
        # a normal iteration does change the weights (the comparison can fail)
        assert _differences(_checkpoint(save, 3, rank), _checkpoint(save, 4, rank))
    events = [r for r in read_records(save / "stability") if r["kind"] == "event"]
    guard = [(e["step"], e["metric"], e["severity"]) for e in events if e["detector"] == "guard"]
    assert guard == [(3, "loss", "critical"), (11, "loss", "critical")]  # the monitor acted
    steps = {r["step"]: r for r in read_records(save / "stability") if r["kind"] == "step"}
    assert steps[12]["scalars"]["skipped_steps"] == 2
