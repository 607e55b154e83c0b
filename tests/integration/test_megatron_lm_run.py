"""End to end: Megatron-LM's own `pretrain` through `python -m megatron_gate.run` on the CPU.

Each test is one or two real training runs (mock data, a 2-layer GPT, a few iterations).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from pretrain_runs import (
    LEGACY_SCRIPT,
    MIN_SCRIPT,
    SMOKE_MONITOR,
    run_pretrain,
    run_smoke_script,
)

from megatron_gate.megatron_lm.monitor_hooks import STATE_KEY
from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow


NAN_CHECK_NOTICE = "--check-for-nan-in-loss-and-grad (which stops the run) is off"


def _write_monitor_yaml(path: Path, extra: str = "") -> Path:
    path.write_text("log_interval: 1\nlayer_interval: 2\nsinks:\n  console: false\n" + extra)
    return path


def _steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["kind"] == "step"}


def _torch_checkpoint_state(save: Path, iteration: int) -> dict:
    path = save / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    return torch.load(path, map_location="cpu", weights_only=False)[STATE_KEY]


def _tensorboard_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def _assert_loss_falls(losses: dict[int, float]) -> None:
    assert len(losses) >= 4, losses
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 0.05, losses


def test_cpu_smoke_example_gated_monitored_checkpointed_and_resumed(tmp_path: Path) -> None:
    """examples/cpu_smoke_test.sh (world size 1), then a resumed run from its checkpoint."""
    save, tensorboard = tmp_path / "checkpoints", tmp_path / "tensorboard"
    first = run_smoke_script(tmp_path, "--ckpt-format", "torch")
    assert first.returncode == 0, first.output[-3000:]
    assert first.lines("megatron-gate: gated attention on layers 1-2 of 2 | granularity headwise "
                       "| backend local | TP=1 PP=1 DP=1 CP=1 | monitor sinks: jsonl, tensorboard")  # fmt: skip
    _assert_loss_falls(first.losses())

    records = read_records(save / "stability")
    assert records[0]["kind"] == "run_start"
    assert records[0]["model"]["gated_layers"] == [1, 2]
    assert records[0]["model"]["granularity"] == "headwise"
    steps = _steps(records)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    # The monitor sees the loss and grad norm Megatron logs for the same iteration.
    assert steps[6]["scalars"]["loss"] == pytest.approx(first.losses()[6], rel=1e-4)
    assert steps[4]["layers"]["gate_mean"][0] is not None  # per-layer statistics on layer steps
    assert records[-1] == {**records[-1], "kind": "run_end", "status": "completed", "step": 6}
    tags = _tensorboard_tags(tensorboard)
    assert {schema.tensorboard_tag("loss"), "lm loss"} <= tags, sorted(tags)

    saved = _torch_checkpoint_state(save, 6)
    assert saved["step"] == 6

    resumed = run_pretrain(
        MIN_SCRIPT, "--train-iters", "8", "--load", str(save), "--save", str(save),
        "--save-interval", "3", "--ckpt-format", "torch", "--override-opt_param-scheduler",
        "--gated-attention", "headwise", "--stability-config", str(SMOKE_MONITOR),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert resumed.lines("megatron-gate: stability monitor state restored from the checkpoint "
                         "(last monitored step 6)")  # fmt: skip
    assert sorted(resumed.losses()) == [7, 8]
    history = _torch_checkpoint_state(save, 8)["detectors"]["loss_spike"]["recent"]
    assert len(history) == 8  # 6 losses from before the restart + 2 after it


def test_bf16_run_says_once_that_megatrons_nan_check_is_off(tmp_path: Path) -> None:
    """Megatron parses the command line twice (its fault-tolerance set-up re-reads it): the
    notice that the guard replaces Megatron's NaN check is printed once, and the check is off."""
    run = run_pretrain(MIN_SCRIPT, "--train-iters", "2", "--bf16", "--gated-attention", "headwise",
                       "--stability-dir", str(tmp_path / "stability"))  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    assert run.output.count(NAN_CHECK_NOTICE) == 1, run.output[-3000:]
    assert re.search(r"check_for_nan_in_loss_and_grad \.+ False", run.output)
    assert sorted(run.losses()) == [1, 2]


def test_tensor_parallel_2_with_spec_callable(tmp_path: Path) -> None:
    run = run_pretrain(
        MIN_SCRIPT, "--train-iters", "5", "--tensor-model-parallel-size", "2",
        "--spec", "megatron_gate.spec", "elementwise_spec",
        "--stability-config", str(_write_monitor_yaml(tmp_path / "monitor.yaml")),
        "--save", str(tmp_path / "ckpt"), "--save-interval", "5",
        nproc=2,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    assert run.lines("megatron-gate: gated attention on layers 1-2 of 2 | granularity "
                     "elementwise | backend local | TP=2 PP=1 DP=1 CP=1")  # fmt: skip
    assert run.output.count(NAN_CHECK_NOTICE) == 1  # rank 0 only, before init_process_group too
    _assert_loss_falls(run.losses())
    steps = _steps(read_records(tmp_path / "ckpt" / "stability"))
    assert sorted(steps) == [1, 2, 3, 4, 5]
    assert steps[5]["scalars"]["loss"] == pytest.approx(run.losses()[5], rel=1e-4)
    # the update of step 3, measured bucket by bucket in Megatron's inner optimizer (TP shards)
    update = steps[4]["layers"]["update_norm"]
    assert all(value is not None and value > 0 for value in update), update
    assert steps[4]["scalars"]["update_norm"] > 0


def test_legacy_api_spec_object_skip_and_lr_backoff(tmp_path: Path) -> None:
    """The older `pretrain(..., model_provider, ...)` script with `--spec` naming a spec
    object; two detectors made to fire on every layer step: one skips the update, one backs
    the learning rate off."""
    monitor_yaml = _write_monitor_yaml(
        tmp_path / "monitor.yaml",
        "lr_backoff_factor: 0.5\nlr_backoff_steps: 100\ndetectors:\n"
        "  massive_activation: {action: skip_step, threshold: 1.0e-9}\n"
        "  attention_sink: {action: lr_backoff, threshold: 0.0}\n",
    )
    run = run_pretrain(
        LEGACY_SCRIPT, "--train-iters", "4", "--spec", "megatron_gate.spec", "headwise",
        "--stability-config", str(monitor_yaml), "--stability-dir", str(tmp_path / "stability"),
    )  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    assert run.lines("megatron-gate: gated attention on layers 1-2 of 2 | granularity headwise")
    # Megatron counts the skipped updates of the layer steps 2 and 4 (its counter resets on log).
    assert run.skipped() == {1: 0, 2: 1, 3: 0, 4: 1}
    records = read_records(tmp_path / "stability")
    actions = {(r["step"], r["action"]) for r in records if r["kind"] == "event"}
    assert {(2, "skip_step"), (2, "lr_backoff"), (4, "skip_step")} <= actions
    learning_rates = {step: r["scalars"]["learning_rate"] for step, r in _steps(records).items()}
    assert learning_rates[1] == pytest.approx(3e-3)
    # the back-off triggered at step 2 is in force for step 2's own update: recorded there
    assert learning_rates[2] == pytest.approx(1.5e-3)
    assert learning_rates[3] == pytest.approx(1.5e-3)


def test_rollback_then_abort_after_max_rollbacks(tmp_path: Path) -> None:
    """A detector that fires on every layer step (3, 6) with `rollback`: step 3 rolls back to
    the checkpoint of iteration 2; step 6 exceeds `max_rollbacks: 1` and aborts (exit code 3)
    after saving the last applied iteration."""
    save = tmp_path / "ckpt"
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text(
        "log_interval: 1\nlayer_interval: 3\nmax_rollbacks: 1\nsinks: {console: false}\n"
        "detectors:\n  massive_activation: {action: rollback, threshold: 1.0e-9}\n"
    )
    run = run_pretrain(
        MIN_SCRIPT, "--train-iters", "8", "--gated-attention", "elementwise",
        "--stability-config", str(monitor_yaml), "--save", str(save), "--save-interval", "2",
        "--ckpt-format", "torch",
    )  # fmt: skip
    assert run.returncode == 3, run.output[-3000:]
    assert run.lines("megatron-gate: rolled back to iteration 2 after a spike at step 3")
    assert run.lines("megatron-gate: saved before aborting")
    assert sorted(run.losses()) == [1, 2, 3, 4, 5]  # 6 aborted before its log line
    assert (save / "iter_0000005").is_dir()
    records = read_records(save / "stability")
    assert records[-1]["kind"] == "run_end" and records[-1]["status"] == "aborted"
    assert _torch_checkpoint_state(save, 5)["policy"]
