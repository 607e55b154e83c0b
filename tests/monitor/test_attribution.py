"""Attribution of rejected steps in the plain loop (`train_with_monitor`), with injected faults:
a one-time corruption of a matmul output or of a gradient is transient (the recomputed update
is applied: weights, optimizer state and guard statistics bit-identical to a run without the
fault); a NaN or extreme batch and a weight corrupted in memory are reproducible (skipped).
Healthy steps never recompute; at two ranks a fault on one rank is attributed alike on both."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.monitor import MonitorConfig, StabilityMonitor, attribution
from megatron_gate.monitor.loops import train_with_monitor
from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt
from .faults import (
    OneTimeFault,
    StepClock,
    corrupt_gradient,
    corrupt_matmul_output,
    corrupt_weight_in_memory,
)

STEPS, FAULT_STEP = 14, 9
Fault = Callable[[torch.nn.Module, StepClock], Any]


def _config(**guard: object) -> MonitorConfig:
    return MonitorConfig.from_dict({
        "log_interval": 4, "layer_interval": 8,
        "sinks": {"console": False, "tensorboard": False},
        "guard": {"min_history": 6, "skip_mode": "host", **guard},
    })  # fmt: skip


def _train(
    run_dir: Path,
    *,
    fault: Fault | None = None,
    scales: dict[int, float] | None = None,
    config: MonitorConfig | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Train STEPS steps; `fault(model, clock)` is set up before; batch i's loss x scales[i]."""
    torch.manual_seed(0)
    model = model if model is not None else tiny_gated_gpt(seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(config or _config(), models=[model], run_dir=run_dir,
                               optimizer=optimizer)  # fmt: skip
    clock, calls = StepClock(), []
    injected = fault(getattr(model, "module", model), clock) if fault is not None else None

    def loss_of(model_: torch.nn.Module, batch: dict) -> torch.Tensor:
        clock.step = batch["index"]
        calls.append(batch["index"])
        return lm_loss(model_, batch) * (scales or {}).get(batch["index"], 1.0)

    result = train_with_monitor(
        model=model, optimizer=optimizer, monitor=monitor, steps=STEPS, clip_grad_norm=1.0,
        batch_at=lambda index: {**batch_at(index), "index": index}, loss_of=loss_of,
    )  # fmt: skip
    optimizer_state = [t for s in optimizer.state.values() for t in s.values()]
    return {
        "result": result, "calls": calls, "injected": injected,
        "state": [p.detach().clone() for p in model.parameters()] + optimizer_state,
        "guard": monitor.guard.state_dict(),
        "events": [r for r in read_records(run_dir) if r["kind"] == "event"],
    }  # fmt: skip


def _guard_events(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in run["events"] if e["detector"] == "guard"]


def _bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def clean(one_rank_world: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _train(tmp_path_factory.mktemp("clean"))


def test_healthy_steps_never_recompute(clean: dict[str, Any]) -> None:
    assert clean["calls"] == list(range(STEPS))  # one forward per step
    assert _guard_events(clean) == [] and clean["result"].skipped_steps == []


def _matmul_nan(model: torch.nn.Module, clock: StepClock) -> OneTimeFault:
    fault = OneTimeFault(clock, FAULT_STEP, math.nan)
    corrupt_matmul_output(model.decoder.layers[0].mlp.linear_fc1, fault)
    return fault


def _matmul_spike(model: torch.nn.Module, clock: StepClock) -> OneTimeFault:
    fault = OneTimeFault(clock, FAULT_STEP, 1.0e3)  # logits x 1000: a loss spike
    corrupt_matmul_output(model.output_layer, fault)
    return fault


def _gradient_inf(model: torch.nn.Module, clock: StepClock) -> OneTimeFault:
    fault = OneTimeFault(clock, FAULT_STEP, math.inf)
    corrupt_gradient(model.decoder.layers[1].mlp.linear_fc2.weight, fault)
    return fault


@pytest.mark.parametrize("fault", [_matmul_nan, _matmul_spike, _gradient_inf])
def test_one_time_fault_is_transient_and_its_recompute_applied(
    clean: dict[str, Any], tmp_path: Path, fault: Fault
) -> None:
    run = _train(tmp_path, fault=fault)
    assert run["injected"].fired == [FAULT_STEP]  # the fault happened
    assert run["calls"].count(FAULT_STEP) == 2  # computed twice, every other step once
    assert len(run["calls"]) == STEPS + 1
    (event,) = _guard_events(run)
    assert (event["step"], event["attribution"], event["action"]) == (
        FAULT_STEP,
        "transient",
        "log",
    )
    assert event["samples"] == [FAULT_STEP] and "recomputed update was applied" in event["message"]
    value = event["value"]  # the fault's (NaN and Inf are written as null)
    assert value is None or value > 10 * clean["result"].losses[0]
    assert run["result"].skipped_steps == []
    # no data lost: the same weights, moments and guard statistics as without the fault
    assert _bit_identical(run["state"], clean["state"])
    assert run["guard"] == clean["guard"]
    assert run["result"].losses == clean["result"].losses


def test_nan_batch_is_reproducible_and_skipped(clean: dict[str, Any], tmp_path: Path) -> None:
    run = _train(tmp_path, scales={FAULT_STEP: math.nan})
    (event,) = _guard_events(run)
    assert (event["step"], event["attribution"], event["action"]) == (
        FAULT_STEP, "reproducible", "skip_step",
    )  # fmt: skip
    assert event["samples"] == [FAULT_STEP] and "the batch or the model" in event["message"]
    assert run["calls"].count(FAULT_STEP) == 2
    assert run["result"].skipped_steps == [FAULT_STEP]
    assert not _bit_identical(run["state"], clean["state"])  # the batch's update is not applied


def test_extreme_batch_is_reproducible(tmp_path: Path, one_rank_world: None) -> None:
    run = _train(tmp_path, scales={FAULT_STEP: 1.0e4})
    (event,) = _guard_events(run)
    assert (event["step"], event["attribution"], event["episode"]["kind"]) == (
        FAULT_STEP, "reproducible", "spike",
    )  # fmt: skip
    assert run["result"].skipped_steps == [FAULT_STEP]


def test_weight_corrupted_in_memory_is_reproducible(tmp_path: Path, one_rank_world: None) -> None:
    def weight_fault(model: torch.nn.Module, clock: StepClock) -> None:
        weight = model.decoder.layers[0].self_attention.linear_qkv.weight

        def corrupt(_module: torch.nn.Module, _inputs: object) -> None:
            if clock.step == FAULT_STEP:
                corrupt_weight_in_memory(weight)

        model.register_forward_pre_hook(corrupt)

    run = _train(tmp_path, fault=weight_fault)
    events = _guard_events(run)
    # from the corrupted step on, every step reproduces its NaN: skipped, until a rollback
    assert [e["step"] for e in events] == list(range(FAULT_STEP, STEPS))
    assert {e["attribution"] for e in events} == {"reproducible"}


def test_device_guard_says_why_it_does_not_recompute(
    tmp_path: Path,
    one_rank_world: None,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attribution, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        run = _train(tmp_path, scales={FAULT_STEP: math.nan}, config=_config(skip_mode="device"))
    assert run["calls"] == list(range(STEPS))  # no recompute: the decision stays on the device
    (event,) = _guard_events(run)
    assert "attribution" not in event and event["action"] == "skip_step"
    assert "skipped without a recompute" in caplog.text


def test_recompute_can_be_turned_off(tmp_path: Path, one_rank_world: None) -> None:
    run = _train(tmp_path, scales={FAULT_STEP: math.nan}, config=_config(recompute_rejected=False))
    assert run["calls"] == list(range(STEPS))
    assert "attribution" not in _guard_events(run)[0]


@pytest.mark.parametrize("skip_mode", ["device", "host"])
def test_the_recompute_is_tested_against_the_statistics_before_the_step(
    tmp_path: Path, one_rank_world: None, skip_mode: str
) -> None:
    """Both guard paths: a reproduced spike leaves the guard as a plain rejection does (its
    streak too: the next spike is a new level), a clean recompute as a clean step does."""
    model = tiny_gated_gpt(seed=2)
    config = _config(skip_mode=skip_mode, min_history=4, max_consecutive_skips=1)
    clean_values = [(2.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)) for i in range(12)]
    first = dict(enumerate(clean_values)) | {6: (500.0, 1.0), 7: (600.0, 1.0), 9: (math.nan, 1.0)}
    recomputed = {6: (500.0, 1.0), 9: clean_values[9]}  # step 7 is a new level: accepted
    plain = {**dict(enumerate(clean_values)), 6: first[6], 7: first[7]}  # what the run applies
    monitors = [StabilityMonitor(config, models=[model], run_dir=tmp_path / name)
                for name in ("attributed", "plain")]  # fmt: skip
    outcomes = {}
    for step in range(12):
        loss, norm = first[step]
        decision = monitors[0].end_step(step, loss=loss, grad_norm=norm, recompute=True)
        if decision.recompute:
            loss, norm = recomputed[step]
            decision = monitors[0].end_recompute(step, loss=loss, grad_norm=norm)
            outcomes[step] = bool(decision.accept)
        loss, norm = plain[step]
        monitors[1].end_step(step, loss=loss, grad_norm=norm)
    assert outcomes == {6: False, 9: True}
    states = [json.dumps(monitor.guard.state_dict()) for monitor in monitors]  # NaN: empty slots
    assert states[0] == states[1]
    for monitor in monitors:
        monitor.close()


# ---------------------------------------------------------------------- two ranks
def _rank_worker(rank: int, world_size: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Data-parallel training (DDP, gloo); the fault happens on rank 1 only."""
    init_model_parallel(tp=1, pp=1)
    case = payload["case"]
    model = torch.nn.parallel.DistributedDataParallel(tiny_gated_gpt(seed=2))
    fault = None
    if rank == 1 and case == "matmul":
        fault = _matmul_nan
    scales = {FAULT_STEP: math.nan} if rank == 1 and case == "batch" else None
    run = _train(Path(payload["dir"]) / case, fault=fault, scales=scales, model=model)
    return {
        "calls": run["calls"],
        "state": run["state"],
        "skipped": run["result"].skipped_steps,
        "events": _guard_events(run) if rank == 0 else None,
    }


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    folder = str(tmp_path_factory.mktemp("ranks"))
    return {
        case: launch(_rank_worker, world_size=2, payload={"case": case, "dir": folder})
        for case in ("clean", "matmul", "batch")
    }


@pytest.mark.slow
def test_two_ranks_attribute_a_one_rank_fault_alike(two_ranks: dict[str, list]) -> None:
    clean, matmul, batch = two_ranks["clean"], two_ranks["matmul"], two_ranks["batch"]
    # both ranks recompute the step the fault of rank 1 made them reject (one all_reduce)
    for ranks in (matmul, batch):
        assert [r["calls"].count(FAULT_STEP) for r in ranks] == [2, 2]
    (event,) = matmul[0]["events"]
    assert (event["step"], event["attribution"]) == (FAULT_STEP, "transient")
    for rank in (0, 1):
        assert _bit_identical(matmul[rank]["state"], clean[rank]["state"])
        assert not _bit_identical(batch[rank]["state"], clean[rank]["state"])
    (event,) = batch[0]["events"]
    assert (event["step"], event["attribution"]) == (FAULT_STEP, "reproducible")
