"""The regime search's bookkeeping (bench/regime_search.py, docs/evidence.md): every point is a
valid training configuration, and the numbers its tables are built from mean what they say."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from megatron_gate.demo.trainer import TrainConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load_bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the bench modules import each other by these names
    spec.loader.exec_module(module)
    return module


regime_points = _load_bench_module("regime_points")  # below regime_report and regime_search
_load_bench_module("regime_report")  # imported by regime_search
regime_search = _load_bench_module("regime_search")


@pytest.mark.parametrize("name", sorted(regime_search.SEARCH))
def test_every_point_is_a_train_config(name: str) -> None:
    point = regime_search.SEARCH[name]
    fields = {k: v for k, v in {**regime_search.BASE, **point}.items()
              if k not in regime_search.DATA_KEYS}  # fmt: skip
    config = TrainConfig(**fields, seed=0)
    assert config.steps >= config.warmup >= 1
    assert set(point) - set(fields) <= set(regime_search.DATA_KEYS)


def test_bootstrap_interval_brackets_the_mean_and_collapses_without_spread() -> None:
    mean, low, high = regime_points.bootstrap_ci([1.0, 2.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert 1.0 <= low < mean < high <= 6.0
    assert regime_points.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)


def test_loss_jump_is_the_rise_over_the_running_minimum() -> None:
    losses = [3.0 - 0.01 * i for i in range(100)]
    assert regime_search.max_loss_jump(losses) < 0  # a falling loss never rises
    losses[60] += 2.0
    assert regime_search.max_loss_jump(losses) == pytest.approx(2.0 - 0.01)


def test_interleave_alternates_final_seeds_with_search_points() -> None:
    final = [("f", {}, v, s) for s in (0, 1) for v in ("a", "b")]
    search = [("p", {}, "a", 0), ("q", {}, "a", 0)]
    order = [(n, v, s) for n, _p, v, s in regime_search.interleave(search, final, group=2)]
    assert order == [("f", "a", 0), ("f", "b", 0), ("p", "a", 0),
                     ("f", "a", 1), ("f", "b", 1), ("q", "a", 0)]  # fmt: skip


def test_a_committed_run_reads_back_with_its_trajectory() -> None:
    run_dir = BENCH / "results" / "evidence" / "runs" / "bos_2k_lr3e-3" / "baseline_seed0"
    row = regime_search.read_run(run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    layers = record["config"]["layers"]
    assert len(row["first_token_share_final"]) == layers
    trajectory = row["first_token_share_trajectory"]
    assert trajectory[-1][0] == record["config"]["steps"]
    assert trajectory[-1][1] == pytest.approx(max(row["first_token_share_final"]))
    peak = max(share for _step, share in trajectory)
    assert peak == pytest.approx(max(row["first_token_share_peak"]))
    assert all(0.0 <= share <= 1.0 for _step, share in trajectory if math.isfinite(share))


def test_summary_writes_the_search_table_and_a_final_comparison(tmp_path: Path) -> None:
    report = _load_bench_module("regime_report")
    runs = BENCH / "results" / "evidence" / "runs"
    rows = [regime_search.read_run(runs / "bos" / f"{v}_seed{s}")
            for v in regime_search.VARIANT_ORDER for s in (0, 1, 2)]  # fmt: skip
    for row in rows:
        row["name"] = "bos"
    report.write_summary(tmp_path, rows, finals=["bos"])
    table = (tmp_path / "search.md").read_text().splitlines()
    assert len(table) == 2 + 3  # header, rule, the three baseline seeds
    final = (tmp_path / "final_bos.md").read_text()
    for variant in regime_search.VARIANT_ORDER:
        assert f"| {variant} | 0,1,2 |" in final
    raw = json.loads((tmp_path / "final_bos.json").read_text())
    losses = raw["values"]["baseline"]["val loss"]
    mean = sum(losses.values()) / 3
    assert f"| baseline | 0,1,2 | {mean:.3g} [" in final
    assert (tmp_path / "final_bos.png").stat().st_size > 0
    assert (tmp_path / "trajectory.png").exists()


def test_sweep_table_is_the_per_seed_sensitivity_with_a_diverged_run_at_init(
    tmp_path: Path,
) -> None:
    report = _load_bench_module("regime_report")
    runs = [
        {"variant": variant, "lr": lr, "seed": seed, "initial_loss": 5.0,
         "final_loss": math.nan if (variant, lr) == ("baseline", 1.0) else loss + 0.1 * seed}
        for variant, loss in (("baseline", 2.0), ("gated_headwise", 3.0))
        for lr in (0.1, 1.0) for seed in (0, 1, 2)
    ]  # fmt: skip
    rows = {row["variant"]: row for row in report.sweep_rows(runs)}
    # baseline: losses {2 + 0.1 s, init 5} -> (2 + 0.1 s + 5) / 2 - (2 + 0.1 s) = 1.5 - 0.05 s
    assert rows["baseline"]["LR sensitivity"].startswith("1.45 [")
    assert rows["gated_headwise"]["LR sensitivity"] == "0 [0, 0]"  # flat in the LR
    assert rows["gated_headwise"]["- baseline (paired)"].startswith("-1.45 [")
    assert rows["baseline"]["val loss @ 1"] == "- [-, -]"  # every seed diverged there
    partial = [r for r in runs if not (r["variant"] == "baseline" and r["seed"] == 2)]
    assert report.sweep_rows(partial)[0]["seeds"] == "0,1"
    report.sweep_figure(runs, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_sweep_runs_read_back_as_one_point_per_learning_rate(tmp_path: Path) -> None:
    source = BENCH / "results" / "evidence" / "runs" / "bos" / "baseline_seed1"
    target = tmp_path / "runs" / "baseline" / "lr0.1_seed1"
    target.mkdir(parents=True)
    for name in ("stability.jsonl", "validation.jsonl"):
        (target / name).write_bytes((source / name).read_bytes())
    [row] = regime_search.read_sweep(tmp_path)
    assert (row["name"], row["variant"], row["seed"], row["status"]) == (
        "sweep_lr0.1", "baseline", 1, "completed")  # fmt: skip
    assert row["final_validation_loss"] == regime_search.read_run(source)["final_validation_loss"]
