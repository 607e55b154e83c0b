"""The spike-detection benchmark's scoring on a small fixed subset of its synthetic curves:
megatron-gate's detectors meet the targets there, and the OLMo-core-style rule does not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "spike_detection.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("spike_detection", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["spike_detection"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def curves(bench: ModuleType) -> list:
    faulty = [bench.synthetic_curve(seed, steps=3000) for seed in bench.QUICK_SEEDS[:4]]
    healthy = bench.synthetic_curve(bench.QUICK_HEALTHY[0], steps=3000, faults=False)
    return [*faulty, healthy]


def test_targets_on_the_fixed_subset(bench: ModuleType, curves: list) -> None:
    results = bench.evaluate({"ours": bench.ours()}, curves)["ours"]
    assert results["faults"] >= 15
    assert results["precision"] >= 0.95, results["false_examples"]
    assert results["recall"] >= 0.95, results["missed"]
    assert results["false_per_10k_healthy_steps"] <= 1.0
    assert results["per_fault_kind"]["non_finite"]["recall"] == 1.0


def test_scoring_tells_a_noisy_rule_apart(bench: ModuleType, curves: list) -> None:
    rule = bench.reference_detectors()["mean_std_6sigma_128 (OLMo-core SkipStep)"]
    results = bench.evaluate({"mean_std": rule}, curves)["mean_std"]
    assert results["false_per_10k_healthy_steps"] > 1.0 and results["precision"] < 0.95


def test_matching_rule(bench: ModuleType) -> None:
    curve = bench.Curve(
        name="c",
        scalars={"loss": [1.0] * 100},
        labels=[{"step": 40, "kind": "spike", "end": 40}],
        first_step=0,
    )
    opening = bench.Opening
    tally = bench.Tally()
    late, early, benign = (
        opening(step=51, kind="spike", signal="loss"),
        opening(step=45, kind="spike", signal="loss"),
        opening(step=80, kind="level_shift", signal="loss"),
    )
    bench.score_curve(curve, [early, late, benign], tally)
    summary = bench.summary(tally)
    # 45 is within K = 10 steps (found, delay 5); 51 is outside the fault window: false.
    assert summary["recall"] == 1.0 and summary["median_delay"] == 5
    assert summary["true_events"] == 1 and summary["false_events"] == 1
    assert summary["benign_level_shift_events"] == 1
