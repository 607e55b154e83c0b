"""The demo's actions do what they say: rollback reloads the last checkpoint, abort saves one,
ends the run and the command (exit 3), a NaN loss is skipped by the guard (not an abort); a
one-time NaN is a transient fault whose recomputed update is applied."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_gate.cli import main
from megatron_gate.demo import trainer
from megatron_gate.demo.trainer import VARIANTS, RunPlan, TrainConfig, demo_monitor_config, execute
from megatron_gate.monitor import schema

TINY = TrainConfig(layers=2, hidden=32, heads=4, seq_len=16, batch_size=2, steps=8, lr=1e-2,
                   checkpoint_interval=3, eval_interval=100)  # fmt: skip
TINY_FLAGS = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq-len", "16",
              "--batch-size", "2"]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / schema.JSONL_NAME).read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["scalars"]["loss"] for r in _records(run_dir) if r["kind"] == "step"}


def _run(run_dir: Path, *overrides: str, config: TrainConfig = TINY) -> trainer.RunResult:
    monitor = demo_monitor_config(layer_interval=5, overrides=["log_interval=1", *overrides])
    plan = RunPlan(runs=[(VARIANTS["baseline"], config, str(run_dir))], data=None,
                   monitor_config=monitor, progress="off")  # fmt: skip
    return execute(plan)[0]


def test_rollback_reloads_the_last_checkpoint(tmp_path: Path) -> None:
    # massive_activation fires on every layer step (5): log it in one run, roll back in the other
    fire = "detectors.massive_activation.threshold=1.0e-9"
    logged = _run(tmp_path / "log", fire)
    rolled = _run(tmp_path / "rollback", fire, "detectors.massive_activation.action=rollback")
    assert logged.status == rolled.status == "completed"
    before, after = _losses(tmp_path / "log"), _losses(tmp_path / "rollback")
    assert [before[s] for s in range(1, 6)] == [after[s] for s in range(1, 6)]
    # step 6 trains from the weights of step 3 (reloaded), not from those of step 4
    assert after[6] != before[6]
    events = [r for r in _records(tmp_path / "rollback") if r["kind"] == "event"]
    assert (5, "rollback") in {(e["step"], e["action"]) for e in events}


def test_nan_loss_is_skipped_unless_nan_or_inf_says_abort(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    plain_loss = trainer.token_loss

    def nan_at_step_3(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor):  # noqa: ANN202
        loss = plain_loss(model, tokens, labels)
        if torch.is_grad_enabled():  # a training step (validation runs without grad)
            calls["n"] += 1
            if calls["n"] in (3, 4):  # step 3 and its recompute: a reproducible NaN
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "token_loss", nan_at_step_3)
    skipped = _run(tmp_path / "skip")
    assert skipped.status == "completed" and math.isfinite(skipped.final_train_loss)
    events = [r for r in _records(tmp_path / "skip") if r["kind"] == "event"]
    assert (3, "guard", "skip_step", "reproducible") in {
        (e["step"], e["detector"], e["action"], e.get("attribution")) for e in events
    }
    calls["n"] = 0
    aborted = _run(tmp_path / "abort", "detectors.nan_or_inf.action=abort")
    assert aborted.status == "aborted" and aborted.steps_done == 2
    assert "non-finite" in aborted.abort_reason
    assert json.loads((tmp_path / "abort" / "checkpoint" / "latest.json").read_text())["step"] == 2


def test_abort_exits_3_saves_and_stops_the_remaining_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main(["demo", "--steps", "6", *TINY_FLAGS, "--out", str(out), "--quiet",
                     "--monitor-set", "log_interval=2", "--monitor-set", "layer_interval=2",
                     "--monitor-set", "detectors.massive_activation.threshold=1.0e-9",
                     "--monitor-set", "detectors.massive_activation.action=abort"])  # fmt: skip
    assert code == 3, stderr.getvalue()[-2000:]
    records = _records(out / "baseline")
    assert records[-1]["kind"] == "run_end" and records[-1]["status"] == "aborted"
    latest = json.loads((out / "baseline" / "checkpoint" / "latest.json").read_text())
    assert latest["step"] == 1  # the last applied update before the abort at step 2
    assert not (out / "gated_headwise" / schema.JSONL_NAME).exists()  # never started


def test_one_time_nan_is_transient_and_costs_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = _run(tmp_path / "clean")
    calls = {"n": 0}
    plain_loss = trainer.token_loss

    def nan_once_at_step_3(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor):  # noqa: ANN202
        loss = plain_loss(model, tokens, labels)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:  # the first computation of step 3 only
                return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer, "token_loss", nan_once_at_step_3)
    faulty = _run(tmp_path / "faulty")
    assert calls["n"] == TINY.steps + 1  # step 3 computed twice
    guard = [r for r in _records(tmp_path / "faulty") if r["kind"] == "event"
             and r["detector"] == "guard"]  # fmt: skip
    assert [(e["step"], e["action"], e["attribution"]) for e in guard] == [(3, "log", "transient")]
    assert _losses(tmp_path / "faulty") == _losses(tmp_path / "clean")  # nothing lost
    assert faulty.final_validation_loss == clean.final_validation_loss
