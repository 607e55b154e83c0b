"""Each action on a tiny Megatron GPT in a plain PyTorch loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityAbort, StabilityMonitor
from megatron_gate.monitor.actions import ABORT_EXIT_CODE, LearningRateBackoff
from megatron_gate.monitor.loops import CheckpointStore, train_with_monitor
from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt

POISON = 9  # the batch index that makes the loss spike


def _config(loss_action: str, **overrides: object) -> MonitorConfig:
    return MonitorConfig.from_dict(
        {
            "log_interval": 1,
            "layer_interval": 4,
            "lr_backoff_steps": 3,
            "rollback_skip_batches": 1,
            "sinks": {"console": False, "tensorboard": False},
            "detectors": {"loss_spike": {"action": loss_action, "min_history": 4}},
            **overrides,
        }
    )


def poisoned_batch(index: int) -> dict:
    return {**batch_at(index), "poison": index == POISON}


def poisoned_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    loss = lm_loss(model, batch)
    return loss * 40 if batch["poison"] else loss


def test_skip_step_on_nan(one_rank_world: None, tmp_path: Path) -> None:
    model = tiny_gated_gpt()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = StabilityMonitor(_config("alert"), models=[model], run_dir=tmp_path)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        monitor.start_step(step)
        loss = lm_loss(model, batch_at(step))
        loss.backward()
        if step == 1:
            loss = loss * float("nan")
        decision = monitor.end_step(step, loss=loss.detach())
        if not decision.skip_step:
            optimizer.step()
        optimizer.zero_grad()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert decision.skip_step == (step == 1) == unchanged
    assert [(e.detector, e.phase, e.action) for e in decision.events] == [
        ("nan_or_inf", "close", "log")
    ]
    monitor.close()
    events = [r for r in read_records(tmp_path) if r["kind"] == "event"]
    phases = [
        (e["step"], e["detector"], e["action"], e.get("episode", {}).get("phase")) for e in events
    ]
    assert phases == [
        (1, "guard", "skip_step", "open"),  # the on-device guard's verdict, recorded at the log step
        (1, "nan_or_inf", "skip_step", "open"),
        (2, "nan_or_inf", "log", "close"),
    ]


def test_lr_backoff_follows_a_scheduler(one_rank_world: None, tmp_path: Path) -> None:
    model = tiny_gated_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)
    monitor = StabilityMonitor(
        _config("lr_backoff"), models=[model], run_dir=tmp_path, optimizer=optimizer
    )
    used: list[float] = []
    for step in range(14):
        monitor.start_step(step)
        loss = poisoned_loss(model, poisoned_batch(step))
        loss.backward()
        decision = monitor.end_step(step, loss=loss.detach())
        used.append(optimizer.param_groups[0]["lr"])
        assert decision.lr_scale == (0.5 if POISON <= step < POISON + 3 else 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    monitor.close()
    expected = [1e-3 * 0.9**s * (0.5 if POISON <= s < POISON + 3 else 1.0) for s in range(14)]
    assert used == pytest.approx(expected, rel=1e-12)
    # the recorded learning rate is the one the update used (the backed-off one)
    records = [r for r in read_records(tmp_path) if r["kind"] == "step"]
    assert [r["scalars"]["learning_rate"] for r in records] == pytest.approx(expected, rel=1e-12)


def test_lr_backoff_unit() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    backoff = LearningRateBackoff(factor=0.25, steps=2)
    backoff.apply(optimizer)
    assert optimizer.param_groups[0]["lr"] == 1.0
    backoff.trigger()
    lrs = []
    for _ in range(4):
        backoff.apply(optimizer)
        lrs.append(optimizer.param_groups[0]["lr"])
        backoff.advance()
    assert lrs == [0.25, 0.25, 1.0, 1.0]


def _train(tmp_path: Path, *, action: str, batch_of_step, steps: int = 14):  # noqa: ANN001, ANN202
    model = tiny_gated_gpt(seed=11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = StabilityMonitor(
        _config(action), models=[model], run_dir=tmp_path, optimizer=optimizer
    )
    result = train_with_monitor(
        model=model,
        optimizer=optimizer,
        monitor=monitor,
        batch_at=batch_of_step,
        loss_of=poisoned_loss,
        steps=steps,
        checkpoints=CheckpointStore(tmp_path / "ckpt"),
        checkpoint_interval=4,
    )
    return model, optimizer, result


def test_rollback_restores_exact_state_and_skips_the_window(
    one_rank_world: None, tmp_path: Path
) -> None:
    model, optimizer, result = _train(
        tmp_path / "spiky", action="rollback", batch_of_step=poisoned_batch
    )
    assert [(r.spike_step, r.skip_steps) for r in result.rollbacks] == [(POISON, (POISON,))]
    assert result.skipped_batches == {POISON}
    # Reference: the same run where batch POISON never existed.
    clean_order = [i for i in range(100) if i != POISON]
    reference, reference_optimizer, clean = _train(
        tmp_path / "clean",
        action="rollback",
        batch_of_step=lambda i: poisoned_batch(clean_order[i]),
    )
    assert clean.rollbacks == []
    for (name, value), (_, expected) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected), name
    state, expected_state = (
        optimizer.state_dict()["state"],
        reference_optimizer.state_dict()["state"],
    )
    assert state.keys() == expected_state.keys()
    for key in state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][field], expected_state[key][field]), (key, field)


def test_abort_saves_and_exits_non_zero(one_rank_world: None, tmp_path: Path) -> None:
    with pytest.raises(StabilityAbort) as raised:
        _train(tmp_path, action="abort", batch_of_step=poisoned_batch)
    assert raised.value.code == ABORT_EXIT_CODE and "loss" in raised.value.reason
    assert isinstance(raised.value, SystemExit)
    assert POISON in CheckpointStore(tmp_path / "ckpt").steps()  # saved by on_abort
    records = read_records(tmp_path)
    assert records[-1]["kind"] == "run_end" and records[-1]["status"] == "aborted"
    assert any(r["kind"] == "event" and r["action"] == "abort" for r in records)


def test_lr_backoff_on_megatron_optimizer_and_scheduler(one_rank_world: None) -> None:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model = tiny_gated_gpt()
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-5, clip_grad=0.0), [ddp]
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=1e-3,
        min_lr=1e-5,
        lr_warmup_steps=2,
        lr_decay_steps=10,
        lr_decay_style="cosine",
        start_wd=0.0,
        end_wd=0.0,
        wd_incr_steps=10,
        wd_incr_style="constant",
    )
    backoff = LearningRateBackoff(factor=0.5, steps=2)
    used, scheduled = [], []
    for step in range(5):
        scheduled.append([group["lr"] for group in optimizer.param_groups])
        if step == 1:
            backoff.trigger()
        backoff.apply(optimizer)
        used.append([group["lr"] for group in optimizer.param_groups])
        backoff.advance()
        scheduler.step(1)
    factors = [1.0, 0.5, 0.5, 1.0, 1.0]
    assert len(used[0]) >= 1
    for step, factor in enumerate(factors):
        assert used[step] == pytest.approx([lr * factor for lr in scheduled[step]], rel=1e-12)
    assert scheduled[3][0] > 0  # warm-up over: the test sees real learning rates
