"""The monitor's defaults on real training logs by others (bench/data/real_traces): the guard leaves
a healthy run alone, one-step outliers are reported, NaN runs are caught on their first bad row."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    _module("real_logs")
    return _module("spike_detection")


@pytest.fixture(scope="module")
def logs(bench: ModuleType) -> dict:
    return {log.name: log for log in sys.modules["real_logs"].load_logs()}


def test_outlier_labels_follow_their_definition(logs: dict) -> None:
    real_logs = sys.modules["real_logs"]
    # 919 and 947 recur in every 124M record that shares the data order
    assert real_logs.unmistakable_outliers(logs["mng_2024-10-29_opt_adam"]) == [
        919,
        947,
        1760,
        3656,
    ]
    assert real_logs.unmistakable_outliers(logs["llmc_siddanthemani_124m"]) == []
    assert logs["llmc_siddanthemani_124m"].blips == (8715, 12008)


@pytest.mark.parametrize("name", ["llmc_siddanthemani_124m", "mng_2024-10-13_llmc"])
def test_guard_leaves_a_healthy_full_batch_run_alone(
    bench: ModuleType, logs: dict, name: str
) -> None:
    # Two llm.c GPT-2 124M runs (~19,500 steps each, full-batch loss and global grad norm)
    real_logs = sys.modules["real_logs"]
    marks = bench.on_logs(bench.ours())(logs[name])
    assert {m.step for m in marks if m.skip} <= set(logs[name].blips)
    result = real_logs.score_clean([logs[name]], bench.on_logs(bench.ours()))
    assert result["healthy_skips_per_10k"] == 0.0, result["false_examples"]
    assert result["actionable_loss_events_per_10k"] == 0.0, result["false_examples"]
    assert result["actionable_grad_norm_events_per_10k_outside_blips"] <= 1.0
    assert result["blips_found"] == "2/2"


def test_one_step_outliers_of_micro_batch_logs_are_reported(bench: ModuleType, logs: dict) -> None:
    real_logs = sys.modules["real_logs"]
    chosen = [logs["mng_2024-10-10_muon"], logs["pg_pr1_gqa4"]]
    result = real_logs.score_micro(chosen, bench.on_logs(bench.ours()))
    assert result["outliers"] == 20
    assert result["outlier_recall"] >= 0.95, result["missed"]
    assert result["other_actionable_per_10k"] <= 5.0


def test_nan_runs_are_caught_on_their_first_non_finite_row(bench: ModuleType, logs: dict) -> None:
    real_logs = sys.modules["real_logs"]
    runs = [log for log in logs.values() if log.kind == "nan"]
    result = real_logs.score_nan(runs, bench.on_logs(bench.ours()))
    assert result["caught_on_first_row"] == f"{len(runs)}/{len(runs)}"


def test_a_grad_norm_rule_at_6_sigma_skips_healthy_updates(bench: ModuleType, logs: dict) -> None:
    # The scoring tells a rule that skips healthy updates apart (OLMo-core's SkipStep defaults).
    real_logs = sys.modules["real_logs"]
    rule = bench.on_logs(bench.reference_detectors()["mean_std_6sigma_128 (OLMo-core SkipStep)"])
    result = real_logs.score_clean([logs["llmc_siddanthemani_124m"]], rule)
    assert result["actionable_grad_norm_events_per_10k_outside_blips"] > 5.0


def test_benchmark_sees_what_the_monitor_does(
    bench: ModuleType, logs: dict, tmp_path: Path
) -> None:
    # The benchmark's harness (guard rule + detector suite) against StabilityMonitor.end_step fed
    # with the same rows of a real log: the same opened episodes and skipped steps.
    import json

    import torch

    from megatron_gate.monitor.config import MonitorConfig, SinksConfig
    from megatron_gate.monitor.monitor import StabilityMonitor

    log = logs["pg_pr1_gqa4"]
    rows = slice(0, 2000)  # outliers at 1241, 1455, 1609, 1794
    short = dataclasses.replace(log, steps=log.steps[rows], loss=log.loss[rows],
                                grad_norm=log.grad_norm[rows])  # fmt: skip
    config = MonitorConfig(sinks=SinksConfig(tensorboard=False, console=False))
    monitor = StabilityMonitor(config, models=torch.nn.Linear(2, 2), run_dir=tmp_path)
    for step, loss in zip(short.steps, short.loss, strict=True):
        monitor.end_step(step, loss=loss)
    monitor.close()
    records = [json.loads(line) for line in (tmp_path / "stability.jsonl").read_text().splitlines()]
    opened = sorted(
        (r["step"], r["detector"] == "guard")
        for r in records
        if r["kind"] == "event" and r["episode"]["phase"] == "open"
    )
    marks = bench.on_logs(bench.ours())(short)
    assert opened == sorted((m.step, m.skip) for m in marks)
    assert {1241, 1455, 1609, 1794} <= {step for step, _ in opened}
