"""`megatron-gate sweep` at a tiny size, and the LR-sensitivity metric against a plain reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_gate.cli import main
from megatron_gate.demo import sweep

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq-len", "16", "--batch-size", "2"]


def _reference_sensitivity(losses: list[float], init: float) -> float:
    """Wortsman et al. (2023), eq. for LR sensitivity, written out plainly."""
    capped = []
    for loss in losses:
        capped.append(init if math.isnan(loss) else min(loss, init))
    return sum(capped) / len(capped) - min(capped)


def test_lr_sensitivity_counts_divergence_as_init_loss() -> None:
    losses = {1e-3: 3.0, 1e-2: 2.5, 1e-1: float("nan"), 1.0: 9.0}
    got = sweep.lr_sensitivity(losses, init_loss=5.5)
    assert got == pytest.approx(_reference_sensitivity(list(losses.values()), 5.5))
    assert got == pytest.approx((3.0 + 2.5 + 5.5 + 5.5) / 4 - 2.5)
    assert sweep.lr_sensitivity({1e-3: 2.0, 1e-2: 2.0}, init_loss=5.5) == 0.0


def _run(variant: str, lr: float, seed: int, loss: float) -> sweep.SweepRun:
    return sweep.SweepRun(variant=variant, lr=lr, seed=seed, status="completed",
                          initial_loss=5.5, final_loss=loss, max_attention_logit=1.0,
                          max_abs_residual=1.0, first_token_share=0.1, spikes=0)  # fmt: skip


def test_summarise_averages_seeds_per_lr() -> None:
    runs = [_run("a", 1e-3, 0, 3.0), _run("a", 1e-3, 1, 4.0), _run("a", 1e-2, 0, float("nan")),
            _run("a", 1e-2, 1, 2.0), _run("b", 1e-3, 0, 2.0)]  # fmt: skip
    summaries = {s.variant: s for s in sweep.summarise(runs)}
    a = summaries["a"]
    assert a.loss_by_lr == {1e-3: 3.5, 1e-2: pytest.approx((5.5 + 2.0) / 2)}
    assert a.diverged == 1 and a.runs == 4 and a.best_lr == 1e-3
    assert a.lr_sensitivity == pytest.approx(_reference_sensitivity([3.5, 3.75], 5.5))
    assert summaries["b"].lr_sensitivity == 0.0


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "sweep"
    code = main(["sweep", "--lrs", "1e-3,1e-2", "--seeds", "0,1", "--variants",
                 "baseline,gated_headwise", "--steps", "3", *TINY, "--out", str(out)])  # fmt: skip
    assert code == 0
    result = json.loads((out / "sweep.json").read_text())
    runs = result["runs"]
    assert len(runs) == 8
    assert {(r["variant"], r["lr"], r["seed"]) for r in runs} == {
        (v, lr, s) for v in ("baseline", "gated_headwise") for lr in (1e-3, 1e-2) for s in (0, 1)
    }
    for run in runs:
        assert run["status"] == "completed" and math.isfinite(run["final_loss"])
        assert run["max_abs_residual"] > 0 and 0 <= run["first_token_share"] <= 1
    for summary in result["summaries"]:
        mine = [r for r in runs if r["variant"] == summary["variant"]]
        init = sum(r["initial_loss"] for r in mine) / len(mine)
        by_lr = [
            sum(min(r["final_loss"], init) for r in mine if r["lr"] == lr) / 2
            for lr in (1e-3, 1e-2)
        ]
        assert summary["lr_sensitivity"] == pytest.approx(_reference_sensitivity(by_lr, init))
    assert "LR sensitivity" in (out / "sweep.md").read_text()
    html = (out / "sweep.html").read_text()
    assert "data:image/png;base64," in html and "gated_headwise" in html
    assert (out / "sweep.png").stat().st_size > 1000
    assert "[8/8]" in capsys.readouterr().err


def test_coarse_to_fine_order_spans_the_range_first() -> None:
    lrs = [1e-2, 3e-3, 1.0, 3e-2, 1e-1, 3e-1]
    order = sweep.coarse_to_fine(lrs)
    assert sorted(order) == sorted(lrs)
    assert order[:3] == [3e-3, 1.0, 3e-2]


def test_complete_groups_drops_lrs_some_variant_did_not_finish() -> None:
    runs = [_run("a", 1e-3, 0, 3.0), _run("b", 1e-3, 0, 2.0), _run("a", 1e-2, 0, 2.5)]
    kept = sweep.complete_groups(runs)
    assert [(r.variant, r.lr) for r in kept] == [("a", 1e-3), ("b", 1e-3)]
