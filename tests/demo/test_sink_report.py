"""bench/sink_report.py: its numbers are the run's own records, and its tables pair by seed."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from megatron_gate.demo.report import load_run

BENCH = Path(__file__).resolve().parents[2] / "bench"
COMMITTED = BENCH / "results" / "sink" / "b16_400steps"


def _load(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # sink_report imports regime_search by this name
    spec.loader.exec_module(module)
    return module


_load("regime_search")
sink_report = _load("sink_report")


def test_a_committed_run_reads_back_as_its_last_logged_values() -> None:
    (row,) = sink_report.read_runs([COMMITTED])
    run = load_run(COMMITTED / "runs" / "baseline" / "lr0.003_seed0")
    assert (row["variant"], row["lr"], row["seed"]) == ("baseline", 0.003, 0)
    assert row["share_nontrigger"] == run.final_layers("first_token_share_unflagged")[-1]
    assert row["value_drain"] == run.final_layers("value_norm_ratio_first_token")[-1]
    assert row["val_loss"] == run.final_validation_loss()
    assert row["steps"][-1] == 400 and len(row["trajectory"]) == len(row["steps"])
    assert math.isnan(row["sink_step"])  # no sink in that run


def test_tables_pair_variants_with_the_baseline_by_seed() -> None:
    def row(variant: str, seed: int, share: float) -> dict:
        values = {key: 1.0 for key in sink_report.METRICS}
        return {"variant": variant, "lr": 1e-3, "seed": seed, **values, "share_nontrigger": share}

    rows = [row("baseline", s, 0.95) for s in (0, 1, 2)]
    rows += [row("gated_headwise", s, 0.95 - 0.1 * s) for s in (0, 1)]
    means, differences = sink_report.lr_tables(rows, 1e-3)
    assert [m["variant"] for m in means] == ["baseline", "gated_headwise"]
    assert means[0]["sink (>= 0.9)"] == "3/3" and means[1]["sink (>= 0.9)"] == "1/2"
    (difference,) = differences
    assert difference["seeds"] == "0,1"
    assert difference["share non-trigger (last layer)"].startswith("-0.05 ")
    assert "sink event step" not in difference


@pytest.mark.parametrize("values", [[0.5, 0.7, 0.9]])
def test_interval_text_brackets_the_mean(values: list[float]) -> None:
    text = sink_report._ci_text(values + [math.nan])
    mean, rest = text.split(" [")
    low, high = (float(x) for x in rest.split("]")[0].split(", "))
    assert low <= float(mean) <= high and "(1 n/a)" in text
