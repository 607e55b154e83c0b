"""bench/megatron_lm_traces.py: the plan and its labels, the watch-only monitor config, the
committed traces' format (that of bench/results/traces), and a real 5-step run of Megatron-LM's
loop with a NaN batch whose update is skipped."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from megatron_gate.monitor.config import MonitorConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"
FAULTS = ("nan_batch", "corrupted_batch", "lr_jump", "scaled_weight", "bitflip_weight")


@pytest.fixture(scope="module")
def traces() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "megatron_lm_traces", BENCH / "megatron_lm_traces.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["megatron_lm_traces"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def test_plan_has_every_fault_after_warmup_with_its_label(traces: ModuleType) -> None:
    runs = traces.plan()
    assert len({run.name for run in runs}) == len(runs)
    assert {run.fault for run in runs if run.fault} == set(FAULTS)
    assert len({run.lr for run in runs if run.fault is None}) >= 2
    for run in runs:
        labels = traces.labels(run)
        if run.fault is None:
            assert labels == []
            continue
        (label,) = labels
        assert set(label) == {"step", "kind", "end"} and label["kind"] == run.fault
        assert run.warmup < label["step"] <= label["end"] <= run.steps - 100
        assert label["end"] - label["step"] + 1 == (10 if run.fault == "lr_jump" else 1)
    with pytest.raises(ValueError, match="only an lr_jump"):
        traces.TraceRun(name="x", fault="nan_batch", fault_length=3)


def test_monitor_only_watches_and_keeps_every_other_default(traces: ModuleType) -> None:
    config = MonitorConfig.from_dict(traces.monitor_config(layer_interval=1))
    default = MonitorConfig()
    assert config.guard.skip_non_finite and config.guard.enabled
    assert not config.guard.skip_loss_spikes and not config.guard.skip_grad_norm_spikes
    assert (config.log_interval, config.layer_interval) == (1, 1)
    for field in dataclasses.fields(config.detectors):
        ours, theirs = getattr(config.detectors, field.name), getattr(default.detectors, field.name)
        assert (ours.action, ours.confirmed_action) == ("log", None), field.name
        assert dataclasses.replace(ours, action=theirs.action,
                                   confirmed_action=theirs.confirmed_action) == theirs  # fmt: skip


def test_committed_traces_have_the_benchmark_format(traces: ModuleType) -> None:
    reference = json.loads(next((BENCH / "results" / "traces").glob("*.json")).read_text())
    paths = sorted(traces.TRACES.glob("*.json"))
    if not paths:
        pytest.skip("no Megatron-LM traces recorded yet")
    for path in paths:
        data = json.loads(path.read_text())
        assert set(data) == set(reference), path.name
        assert set(data["scalars"]) == set(reference["scalars"]), path.name
        run = traces.TraceRun(**data["run"])
        assert run.name == path.stem and data["labels"] == traces.labels(run)
        assert all(len(values) == run.steps for values in data["scalars"].values()), path.name


@pytest.mark.slow
def test_five_steps_of_megatron_lm_with_a_nan_batch(traces: ModuleType) -> None:
    run = traces.TraceRun(name="tiny", layers=2, hidden=64, seq_len=32, global_batch=4,
                          micro_batch=2, warmup=2, steps=5, fault="nan_batch",
                          fault_step=3)  # fmt: skip
    data, layers = traces.trace(run, timeout=300)
    scalars = data["scalars"]
    assert data["labels"] == [{"step": 3, "kind": "nan_batch", "end": 3}]
    assert scalars["nan_or_inf"] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert scalars["loss"][2] is None and scalars["grad_norm"][2] is None
    finite = [i for i in range(5) if i != 2]
    assert all(math.isfinite(scalars["loss"][i]) and scalars["grad_norm"][i] > 0 for i in finite)
    # the NaN step's update is skipped: no change, and Megatron's scheduler does not advance
    assert scalars["update_norm"][2] == 0.0 and scalars["update_norm"][3] > 0
    assert scalars["learning_rate"][3] == scalars["learning_rate"][2] > 0
    assert scalars["update_norm"][4] is None  # measured in the next step's record: none
    assert layers["steps"] == [1, 2, 3, 4, 5]
    assert len(layers["layers"]["max_abs_residual"][0]) == 2
