"""A run that asks for the gate and would train without it stops at start-up with its error."""

from __future__ import annotations

import pytest
from pretrain_runs import DATA, MIN_SCRIPT, run_pretrain

from megatron_gate.run import ERROR_EXIT_CODE

pytestmark = pytest.mark.slow


def test_wrong_spec_stops_before_training() -> None:
    # Megatron itself would log the failed import and train its default, ungated spec.
    run = run_pretrain(MIN_SCRIPT, "--train-iters", "2", "--spec", "megatron_gate.spec",
                       "headwise_specs")  # fmt: skip
    assert run.returncode == ERROR_EXIT_CODE, run.output[-3000:]
    assert (
        "megatron-gate: error: --spec megatron_gate.spec headwise_specs: megatron_gate.spec has "
        "no 'headwise_specs'" in run.output
    )
    assert not run.losses()


def test_model_without_gate_stops_at_start_up() -> None:
    """A model class the spec swap cannot reach (not GPTModel) is caught after it is built."""
    run = run_pretrain(
        DATA / "pretrain_custom_model.py", "--train-iters", "2", "--gated-attention", "headwise"
    )
    assert run.returncode == ERROR_EXIT_CODE, run.output[-3000:]
    assert (
        "megatron-gate: error: --gated-attention headwise was given, but the built model has no "
        "GatedSelfAttention layer (2 self-attention layers, none gated)" in run.output
    )
    assert not run.losses()
