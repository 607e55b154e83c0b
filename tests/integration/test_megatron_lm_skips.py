"""One skip and one count per step in Megatron-LM's loop: Megatron's `grad_norm_skip_threshold`
and the stability guard (one run, world size 1). Faults: a 100x loss at iteration 2 (the guard is
still warming up: only Megatron's threshold skips it), NaN at 3 (only the guard: NaN is not above
a threshold), 1000x at 11 (both rules fire; skipped and counted once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_runs import DATA, run_pretrain

from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow


def test_threshold_and_guard_skip_each_step_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGATRON_GATE_FAULTS", "2:100,3:nan,11:1000")
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text(
        "log_interval: 4\nlayer_interval: 8\nsinks: {console: false}\nguard: {min_history: 6}\n"
    )
    run = run_pretrain(
        DATA / "pretrain_with_faults.py", "--train-iters", "12",
        "--gated-attention", "headwise", "--stability-config", str(monitor_yaml),
        "--stability-dir", str(tmp_path / "stability"), "--grad-norm-skip-threshold", "50",
        timeout=400,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    assert run.lines("megatron-gate: step skips:") == [
        "megatron-gate: step skips: Megatron's grad_norm_skip_threshold=50 first, then the "
        "stability guard (NaN/Inf, spikes); each skipped step counts once in Megatron's "
        "'skipped iterations' and the monitor's skipped_steps"
    ]
    skipped = {i: n for i, n in run.skipped().items() if n}
    assert skipped == {2: 1, 3: 1, 11: 1}, run.skipped()
    records = list(read_records(tmp_path / "stability"))
    guard = [e["step"] for e in records if e["kind"] == "event" and e["detector"] == "guard"]
    assert guard == [3, 11]  # the guard's own skips; iteration 2 was Megatron's alone
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    assert steps[12]["scalars"]["skipped_steps"] == sum(skipped.values())
