"""bench/monitor_overhead.py at a tiny production shape, 1 round: the JSON's structure, the step
kinds and counts of the default cadence, and the composition of the cadence ratios from the
measured per-kind times (a timing check it is not: the machine may be loaded)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from megatron_gate.monitor import MonitorConfig

pytestmark = pytest.mark.slow  # the bench in its own processes, as a user runs it

BENCH = Path(__file__).resolve().parents[2] / "bench" / "monitor_overhead.py"
TINY = {"hidden": 64, "seq": 32, "layers": 2, "heads": 4, "groups": 2, "batch": 1}
COMPARISONS = {
    "default_cadence": ("default_cadence", "plain"),
    "fully_logged": ("fully_logged", "plain"),
    "no_guard": ("no_guard", "plain"),
    "guard": ("default_cadence", "no_guard"),
}


def _run_bench(output: Path, *flags: str) -> dict[str, Any]:
    shape = [part for name, value in TINY.items() for part in (f"--production-{name}", str(value))]
    command = [sys.executable, str(BENCH), *flags, *shape, "--output", str(output)]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("bench") / "production.json"
    flags = ["--no-small", "--no-memory", "--production-rounds", "1", "--probe-repetitions", "1"]
    return _run_bench(output, *flags)["production_shape"]


def _reference_kind(step: int, config: MonitorConfig) -> str:
    """A plain restatement of the default cadence: which work `step` does."""
    if step % config.layer_interval == 0:
        return "per_layer"
    if config.update_norm and (step + 1) % config.layer_interval == 0:
        return "update_norm"
    return "log" if step % config.log_interval == 0 else "unlogged"


def _composed(production: dict[str, Any], name: str, clock: str) -> list[float]:
    """Per round: sum_k n_k * t_measured,k / sum_k n_k * t_baseline,k from the raw times."""
    measured, baseline = COMPARISONS[name]
    counts = production[name]["counts_per_period"]
    raw = production["step_s"]

    def period(variant: str, index: int) -> float:
        return sum(counts[kind] * raw[variant][kind][clock][index] for kind in counts)

    return [period(measured, r) / period(baseline, r) for r in range(production["rounds"])]


def test_step_kinds_and_counts_follow_the_default_config(production: dict[str, Any]) -> None:
    config = MonitorConfig()
    period = range(1, config.layer_interval + 1)
    kinds = [_reference_kind(step, config) for step in period]
    expected = {kind: kinds.count(kind) for kind in ("unlogged", "log", "update_norm", "per_layer")}
    first = {kind: period[kinds.index(kind)] for kind in expected if kind in kinds}
    assert production["method"] == "composed_from_step_kinds"
    assert production["period_steps"] == config.layer_interval
    assert production["step_kinds"] == first
    assert list(production["step_kinds"].values()) == sorted(first.values())
    for name in ("default_cadence", "no_guard", "guard"):
        assert production[name]["counts_per_period"] == expected
    logged = production["fully_logged"]["counts_per_period"]
    assert logged == {**dict.fromkeys(expected, 0), "per_layer": config.layer_interval}
    assert production["shape"] == TINY


def test_raw_times_are_kept_per_variant_kind_and_round(production: dict[str, Any]) -> None:
    rounds = production["rounds"]
    assert rounds == 1
    assert set(production["step_s"]) == {"plain", "default_cadence", "fully_logged", "no_guard"}
    for per_kind in production["step_s"].values():
        assert list(per_kind) == list(production["step_kinds"])
        for times in per_kind.values():
            assert len(times["wall"]) == len(times["cpu"]) == rounds
            assert all(seconds > 0 for seconds in times["wall"])


@pytest.mark.parametrize("name", list(COMPARISONS))
def test_cadence_ratio_is_composed_from_the_step_kinds(
    production: dict[str, Any], name: str
) -> None:
    entry = production[name]
    wall, cpu = _composed(production, name, "wall"), _composed(production, name, "cpu")
    assert entry["method"] == "composed_from_step_kinds"
    assert entry["wall_time_ratios"] == pytest.approx(wall)
    assert entry["median_wall_time_ratio"] == pytest.approx(statistics.median(wall))
    assert entry["robust_wall_time_ratio"] == pytest.approx(statistics.median(wall))  # 1 round
    assert entry["median_cpu_time_ratio"] == pytest.approx(statistics.median(cpu))
    spread = entry["wall_spread"]
    assert spread["min"] <= spread["q1"] <= spread["q3"] <= spread["max"]
    measured, baseline = COMPARISONS[name]
    for kind, kind_entry in entry["per_kind"].items():
        ours, theirs = (production["step_s"][v][kind]["wall"] for v in (measured, baseline))
        assert kind_entry["wall_time_ratios"] == pytest.approx(_divide(ours, theirs))


def _divide(numerators: list[float], denominators: list[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def test_breakdown_at_the_production_shape(tmp_path: Path) -> None:
    flags = ["--breakdown-production", "--production-rounds", "1"]
    results = _run_bench(tmp_path / "breakdown.json", *flags)["breakdown_production"]
    parts = ["without_tensorboard", "without_probe", "without_update_norm", "scalars_only"]
    assert list(results["variants"]) == ["fully_logged", *parts]
    assert results["shape"] == TINY
    assert results["block_steps"] == 1 and results["rounds"] == 1
    for name in results["variants"]:
        assert len(results[name]["wall_time_ratios"]) == 1
        assert results[name]["wall_time_ratios"][0] > 0
