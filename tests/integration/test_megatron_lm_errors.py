"""A run that asks for the gate and would train without it, or that names a bad monitor config,
stops with its one-line error before any model is built or trained."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_runs import DATA, MIN_SCRIPT, run_pretrain

from megatron_gate.run import ERROR_EXIT_CODE

pytestmark = pytest.mark.slow

_MODEL_BUILT = "model-and-optimizer-setup"  # Megatron's timer line after the model is built


def test_wrong_spec_stops_before_training_and_lists_only_spec_names() -> None:
    # Megatron itself would log the failed import and train its default, ungated spec.
    run = run_pretrain(MIN_SCRIPT, "--train-iters", "2", "--spec", "megatron_gate.spec",
                       "headwise_specs")  # fmt: skip
    assert run.returncode == ERROR_EXIT_CODE, run.output[-3000:]
    assert run.lines(
        "megatron-gate run: error: megatron_gate.spec has no spec 'headwise_specs' (--spec "
        "megatron_gate.spec headwise_specs): use one of headwise_spec, elementwise_spec, "
        "headwise, elementwise"
    ), run.output[-3000:]
    assert _MODEL_BUILT not in run.output and not run.losses()


BAD_CONFIGS = {
    "interval": ("log_interval: 10\nlayer_interval: 5\n", "monitor config key 'layer_interval'"),
    "repeated key": ("log_interval: 10\nlog_interval: 1\n", "monitor config "),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_stability_config_stops_at_argument_parsing(tmp_path: Path, case: str) -> None:
    """Checked before the model, the optimizer and the `--load` checkpoint are built."""
    text, start = BAD_CONFIGS[case]
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text(text)
    run = run_pretrain(
        MIN_SCRIPT, "--train-iters", "2", "--gated-attention", "headwise",
        "--stability-config", str(monitor_yaml), "--load", str(tmp_path / "no-checkpoint"),
    )  # fmt: skip
    assert run.returncode == ERROR_EXIT_CODE, run.output[-3000:]
    assert run.lines(f"megatron-gate run: error: {start}")
    if case == "repeated key":
        assert run.lines("megatron-gate run: error: monitor config")[0].endswith(
            "'log_interval' is given twice, on lines 1 and 2 (monitor config): keep one of them "
            "(a repeated key is usually a merge or copy mistake)"
        )
    assert _MODEL_BUILT not in run.output and not run.losses()


def test_model_without_gate_stops_at_start_up() -> None:
    """A model class the spec swap cannot reach (not GPTModel) is caught after it is built."""
    run = run_pretrain(
        DATA / "pretrain_custom_model.py", "--train-iters", "2", "--gated-attention", "headwise"
    )
    assert run.returncode == ERROR_EXIT_CODE, run.output[-3000:]
    assert (
        "megatron-gate run: error: --gated-attention headwise was given, but the built model has "
        "no GatedSelfAttention layer (2 self-attention layers, none gated)" in run.output
    )
    assert not run.losses()
