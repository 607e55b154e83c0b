"""The on-device guard against its plain-Python reference, and the guarded optimizer step."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from megatron_gate.distributed import launch
from megatron_gate.monitor.config import GuardConfig
from megatron_gate.monitor.guard import RECORD_COLUMNS, StepGuard, reference_decisions
from megatron_gate.monitor.guarded_step import bucketed_step
from megatron_gate.monitor.update_norm import UpdateNorm

from .conftest import batch_at, lm_loss, tiny_gated_gpt


def _series(seed: int, steps: int) -> list[tuple[float | None, float | None]]:
    """Heavy-tailed noisy curves with spikes, NaN/Inf, a level shift and zeros."""
    rng = random.Random(seed)
    loss, norm = 3.0, 1.0
    values: list[tuple[float | None, float | None]] = []
    for step in range(steps):
        loss *= 0.999
        if step == steps // 2:
            loss *= 3.0  # a lasting level shift: the guard must not skip forever
        noise = rng.gauss(0, 0.02) if rng.random() < 0.95 else rng.gauss(0, 0.3)
        value = loss * math.exp(noise)
        grad = norm * math.exp(rng.gauss(0, 0.1))
        roll = rng.random()
        if roll < 0.03:
            value *= rng.choice([2.0, 10.0, 1000.0])
        elif roll < 0.05:
            value = rng.choice([math.nan, math.inf, -math.inf])
        elif roll < 0.07:
            grad *= rng.choice([5.0, 100.0])
        elif roll < 0.08:
            grad = math.nan
        elif roll < 0.085:
            value = 0.0
        values.append((value, None if rng.random() < 0.05 else grad))
    return values


def _on(config: GuardConfig, on_host: bool) -> GuardConfig:
    """The config evaluating on the host (plain Python) or as device ops, on this CPU."""
    return dataclasses.replace(config, skip_mode="host" if on_host else "device")


def _verdicts(values, config: GuardConfig, *, as_tensors: bool, on_host: bool) -> list:  # noqa: ANN001
    guard = StepGuard(_on(config, on_host), device=torch.device("cpu"))
    verdicts = []
    for loss, grad in values:
        if as_tensors:
            loss = None if loss is None else torch.tensor(loss, dtype=torch.float32)
            grad = None if grad is None else torch.tensor(grad)
        verdicts.append(guard.check(loss=loss, grad_norm=grad))
    return verdicts


def _device_decisions(values, config: GuardConfig, *, as_tensors: bool, on_host: bool = False):  # noqa: ANN001, ANN202
    verdicts = _verdicts(values, config, as_tensors=as_tensors, on_host=on_host)
    return [bool(verdict.accept) for verdict in verdicts]


def _float32_series(seed: int, steps: int) -> list[tuple[float | None, float | None]]:
    # float32 losses, as a loop hands them over
    return [(None if v is None else float(torch.tensor(v, dtype=torch.float32)), g)
            for v, g in _series(seed, steps)]  # fmt: skip


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_guard_equals_reference(seed: int, on_host: bool) -> None:
    config = GuardConfig(window=32, min_history=8, z_threshold=5.0, max_consecutive_skips=3)
    values = _float32_series(seed, 400)
    expected = reference_decisions(values, config)
    assert _device_decisions(values, config, as_tensors=True, on_host=on_host) == expected
    skipped = expected.count(False)
    assert 10 < skipped < 100, skipped  # the series exercises both outcomes
    # after the level shift the guard accepts again (a new level, not endless skips)
    after_shift = expected[len(values) // 2 + 10 : len(values) // 2 + 110]
    assert after_shift.count(True) > 85, after_shift


def test_host_and_device_paths_write_the_same_records() -> None:
    config = GuardConfig(window=16, min_history=4, z_threshold=4.0, max_consecutive_skips=2)
    values = _float32_series(3, 200)
    device = _verdicts(values, config, as_tensors=True, on_host=False)
    host = _verdicts(values, config, as_tensors=True, on_host=True)
    for step, (on_device, on_host) in enumerate(zip(device, host, strict=True)):
        assert isinstance(on_host.accept, torch.Tensor) and on_host.accept.dtype == torch.bool
        expected = torch.tensor(on_device.record.tolist(), dtype=torch.float64)
        actual = on_host.record
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0, equal_nan=True,
                                   msg=lambda m, step=step: f"step {step}: {m}")  # fmt: skip


@pytest.mark.parametrize(("saved_on", "resumed_on"), [(False, True), (True, False), (True, True)])
def test_guard_state_resumes_on_either_path(saved_on: bool, resumed_on: bool) -> None:
    config = GuardConfig(window=8, min_history=4, z_threshold=4.0)
    values = _float32_series(4, 60)
    reference = _device_decisions(values, config, as_tensors=False, on_host=True)
    first = StepGuard(_on(config, saved_on), device=torch.device("cpu"))
    decisions = [bool(first.check(loss=v, grad_norm=g).accept) for v, g in values[:37]]
    resumed = StepGuard(_on(config, resumed_on), device=torch.device("cpu"))
    resumed.load_state_dict(first.state_dict())
    decisions += [bool(resumed.check(loss=v, grad_norm=g).accept) for v, g in values[37:]]
    assert decisions == reference
    assert reference.count(False) > 0


def test_default_guard_skips_non_finite_and_1000x_spike_only() -> None:
    config = GuardConfig()
    values: list[tuple[float | None, float | None]] = [
        (3.0 * math.exp(0.01 * math.sin(i)), 1.0) for i in range(60)
    ]
    values[40] = (3000.0, 1.0)
    values[45] = (math.nan, 1.0)
    values[50] = (4.0, 1.0)  # +33%: below the default +50%, an alert for the detectors
    values[55] = (3.0, math.inf)
    decisions = _device_decisions(values, config, as_tensors=False)
    assert [i for i, d in enumerate(decisions) if not d] == [40, 45, 55]
    assert decisions == reference_decisions(values, config)


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
def test_default_grad_norm_bar_is_4x_its_level(on_host: bool) -> None:
    # Healthy grad norms reach 1.5-3.5x their median (real llm.c run): reported, never skipped.
    rng = random.Random(7)
    values: list[tuple[float | None, float | None]] = [
        (3.0, 0.3 * math.exp(rng.gauss(0, 0.03))) for _ in range(200)
    ]
    for step, ratio in ((60, 1.6), (80, 2.8), (100, 3.9), (120, 4.3), (140, 15.0)):
        values[step] = (3.0, 0.3 * ratio)
    config = GuardConfig()
    decisions = _device_decisions(values, config, as_tensors=True, on_host=on_host)
    assert [i for i, d in enumerate(decisions) if not d] == [120, 140]
    assert decisions == reference_decisions(values, config)
    lower = dataclasses.replace(config, grad_norm_min_relative_jump=0.5)
    lowered = _device_decisions(values, lower, as_tensors=True, on_host=on_host)
    assert [i for i, d in enumerate(lowered) if not d] == [60, 80, 100, 120, 140]


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
def test_rejected_values_never_enter_the_statistics(on_host: bool) -> None:
    guard = StepGuard(_on(GuardConfig(min_history=4), on_host), device=torch.device("cpu"))
    for value in [1.0, 1.01, 0.99, 1.0, math.nan, 1000.0, 1.02]:
        verdict = guard.check(loss=torch.tensor(value), grad_norm=None)
    record = dict(zip(RECORD_COLUMNS, verdict.record.tolist(), strict=True))
    assert record["accepted"] == 1.0
    state = guard.state_dict()
    assert state["count"][0] == 5  # NaN and the spike stayed out
    assert all(math.isfinite(v) for v in state["history"][0][:5])
    assert math.exp(record["loss_center"]) == pytest.approx(1.0)


def _adam_model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optimizer


def _backward(model: torch.nn.Module, scale: float = 1.0) -> None:
    torch.manual_seed(7)
    loss = model(torch.randn(5, 8)).square().mean() * scale
    loss.backward()


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [v.clone() for s in optimizer.state.values() for v in s.values()]
    return [p.detach().clone() for p in model.parameters()] + state


def _bit_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype
        and torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))
        for x, y in zip(a, b, strict=True)
    )


def test_bucketed_step_equals_plain_step_bit_for_bit() -> None:
    plain, plain_opt = _adam_model(0)
    guarded, guarded_opt = _adam_model(0)
    buckets = []
    for _ in range(3):
        for model in (plain, guarded):
            _backward(model)
        plain_opt.step()
        # tiny buckets: each parameter in its own bucket, 4 optimizer calls
        bucketed_step(
            guarded_opt,
            accept=torch.tensor(True),
            on_bucket=lambda params, _old: buckets.append(len(params)),
            bucket_bytes=1,
        )
        for optimizer in (plain_opt, guarded_opt):
            optimizer.zero_grad()
    assert buckets == [1] * 12
    assert _bit_equal(_snapshot(plain, plain_opt), _snapshot(guarded, guarded_opt))
    assert len(guarded_opt.param_groups[0]["params"]) == 4  # groups restored


@pytest.mark.parametrize("first_step", [True, False])
def test_rejected_step_leaves_weights_and_state_bit_identical(first_step: bool) -> None:
    model, optimizer = _adam_model(1)
    if not first_step:
        _backward(model)
        optimizer.step()
        optimizer.zero_grad()
    before = _snapshot(model, optimizer)
    _backward(model, scale=math.nan)
    bucketed_step(optimizer, accept=torch.tensor(False), bucket_bytes=100)
    after = _snapshot(model, optimizer)
    if first_step:  # the state created by the step is the fresh state: zeros
        assert all(not t.any() for t in after[len(before) :])
        after = after[: len(before)]
    assert _bit_equal(before, after)
    # and the next accepted step continues as if the rejected one never happened
    optimizer.zero_grad()
    _backward(model)
    bucketed_step(optimizer, accept=torch.tensor(True))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_update_norm_equals_copy_reference(one_rank_world: None) -> None:
    model = tiny_gated_gpt(seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    layers = {layer.layer_number: layer for layer in model.decoder.layers}
    params, groups = [], []
    for number, layer in layers.items():
        for param in layer.parameters():
            params.append(param)
            groups.append(number - 1)
    update = UpdateNorm(params, groups, num_layers=len(layers), device=torch.device("cpu"))
    lm_loss(model, batch_at(0)).backward()
    copies = [p.detach().clone() for p in params]
    update.begin()
    bucketed_step(optimizer, on_bucket=update.add, bucket_bytes=20_000)
    update.finish()
    expected = torch.zeros(len(layers) + 1)
    for param, copy, group in zip(params, copies, groups, strict=True):
        expected[group] += (param.detach() - copy).double().square().sum()
    torch.testing.assert_close(update.update_sumsq, expected.float(), rtol=1e-5, atol=0)
    assert (update.update_sumsq[:-1] > 0).all()


def _same_decision_worker(rank: int, world_size: int, on_host: bool) -> list[bool]:
    del world_size
    guard = StepGuard(_on(GuardConfig(min_history=4), on_host), device=torch.device("cpu"))
    decisions = []
    for step in range(10):
        # rank 1 alone sees a 100x spike at step 6 and a NaN at step 8
        loss = 2.0 + 0.01 * step
        if rank == 1 and step == 6:
            loss = 200.0
        if rank == 1 and step == 8:
            loss = math.nan
        decisions.append(bool(guard.check(loss=torch.tensor(loss), grad_norm=None).accept))
    return decisions


@pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])
def test_every_rank_takes_the_same_decision(tmp_path: Path, on_host: bool) -> None:
    results = launch(_same_decision_worker, world_size=2, payload=on_host)
    expected = [True] * 10
    expected[6] = expected[8] = False
    assert results[0] == results[1] == expected
