"""`megatron-gate demo` end to end at a tiny size: files, report, checkpoints, TP=2, Ctrl-C."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from megatron_gate.cli import main
from megatron_gate.demo.trainer import latest_checkpoint
from megatron_gate.monitor import schema

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq-len", "16", "--batch-size", "2",
        "--lr", "1e-2"]  # fmt: skip
RUNS = ("baseline", "gated_headwise")


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / schema.JSONL_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be whole JSON


def _step_scalars(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r["scalars"] for r in _records(run_dir) if r["kind"] == "step"}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "out"
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--steps", "6", *TINY, "--out", str(out), "--quiet",
                     "--monitor-set", "probe_queries=4"])  # fmt: skip
    assert code == 0
    return out, stdout.getvalue()


def test_demo_writes_runs_report_and_summary(tiny_demo: tuple[Path, str]) -> None:
    out, stdout = tiny_demo
    for name in RUNS:
        run_dir = out / name
        records = _records(run_dir)
        assert records[0]["kind"] == "run_start" and records[0]["run"] == name
        assert records[0]["config"]["probe_queries"] == 4  # --monitor-set reached the monitor
        assert records[0]["config"]["layer_interval"] == 1  # the demo's cadence for 6 steps
        assert records[-1] == {**records[-1], "kind": "run_end", "status": "completed"}
        steps = _step_scalars(run_dir)
        assert sorted(steps) == list(range(1, 7))
        assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in steps.values())
        layered = [r for r in records if r["kind"] == "step" and r.get("layers")]
        assert layered, "per-layer metrics were never logged"
        layers = layered[-1]["layers"]
        assert len(layers["max_abs_residual"]) == 2
        has_gate = any(v is not None for v in layers.get("gate_mean", []) or [])
        assert has_gate == (name != "baseline")
        assert list((run_dir / "tensorboard").iterdir()), "no TensorBoard event file"
        validation = [
            json.loads(x) for x in (run_dir / "validation.jsonl").read_text().splitlines()
        ]
        assert validation[-1]["step"] == 6
        meta, folder = latest_checkpoint(run_dir)
        assert meta["step"] == 6 and folder.name == "step_000006"
        assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == [
            "latest.json", "step_000006",
        ]  # fmt: skip
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 4
    assert "baseline" in report and "gated_headwise" in report and "http" not in report.lower()
    for column in ("final train loss", "final val loss", "loss spikes", "max abs(h) per layer",
                   "first-token share", "mean gate", "report.html"):  # fmt: skip
        assert column in stdout


def test_checkpoint_and_first_loss_reproduce(tiny_demo: tuple[Path, str]) -> None:
    """Rebuild each model: step-1 loss from the seed, and the final validation loss from the
    checkpoint, must equal what the run logged."""
    from megatron_gate.demo.data import BatchSampler, load_corpus, validation_batches
    from megatron_gate.demo.trainer import VARIANTS, TrainConfig, build_model, validation_loss

    out, _ = tiny_demo
    corpus = load_corpus(None)
    for name in RUNS:
        run_dir = out / name
        meta, folder = latest_checkpoint(run_dir)
        config = TrainConfig(**meta["config"])
        model = build_model(config, VARIANTS[name], vocab_size=256, device=torch.device("cpu"))
        tokens, labels = BatchSampler(
            corpus.train, seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed
        ).next()
        from megatron_gate.demo.trainer import token_loss

        with torch.no_grad():
            first = float(token_loss(model, tokens, labels))
        assert first == pytest.approx(_step_scalars(run_dir)[1]["loss"], rel=1e-5)

        state = torch.load(folder / "tp_rank_00.pt", weights_only=False)
        model.load_state_dict(state["model"])
        batches = validation_batches(
            corpus.validation, seq_len=config.seq_len, batch_size=config.batch_size,
            num_batches=config.eval_batches,
        )  # fmt: skip
        logged = json.loads((run_dir / "validation.jsonl").read_text().splitlines()[-1])
        assert validation_loss(model, batches) == pytest.approx(logged["validation_loss"], rel=1e-5)


@pytest.mark.slow
def test_tensor_parallel_2_matches_tp_1(tiny_demo: tuple[Path, str], tmp_path: Path) -> None:
    """--tp 2 (two gloo processes) trains the same numbers as TP=1 (same full weights)."""
    out, _ = tiny_demo
    code = main(["demo", "--steps", "6", *TINY, "--tp", "2", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    for name in RUNS:
        tp1, tp2 = _step_scalars(out / name), _step_scalars(tmp_path / name)
        assert sorted(tp2) == sorted(tp1)
        assert tp2[1]["loss"] == pytest.approx(tp1[1]["loss"], rel=1e-5)
        assert tp2[1]["grad_norm"] == pytest.approx(tp1[1]["grad_norm"], rel=1e-4)
        for step in tp1:  # later steps: float summation order differs between layouts
            assert tp2[step]["loss"] == pytest.approx(tp1[step]["loss"], rel=1e-3)
            assert tp2[step]["grad_norm"] == pytest.approx(tp1[step]["grad_norm"], rel=1e-2)
        meta, folder = latest_checkpoint(tmp_path / name)
        assert meta["step"] == 6
        assert sorted(p.name for p in folder.iterdir()) == ["tp_rank_00.pt", "tp_rank_01.pt"]


def test_ctrl_c_leaves_consistent_runs_and_a_report(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """SIGINT mid-run: exit 130, whole JSONL lines, status interrupted, the last checkpoint at
    or after the last logged step, later runs not started, and a report."""
    out = tmp_path / "out"
    first_checkpoint = out / "baseline" / "checkpoint" / "latest.json"

    def interrupt_after_first_checkpoint() -> None:
        deadline = time.time() + 120
        while not first_checkpoint.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_after_first_checkpoint, daemon=True)
    watcher.start()
    flags = ["--steps", "400", "--checkpoint-interval", "12", "--out", str(out), "--quiet"]
    code = main(["demo", *TINY, *flags])
    watcher.join()
    assert code == 130
    records = _records(out / "baseline")
    assert records[-1]["kind"] == "run_end" and records[-1]["status"] == "interrupted"
    last_logged = max(r["step"] for r in records if r["kind"] == "step")
    meta, folder = latest_checkpoint(out / "baseline")
    state = torch.load(folder / "tp_rank_00.pt", weights_only=False)
    assert state["step"] == meta["step"] >= max(last_logged, 12)
    assert meta["step"] < 400
    assert not (out / "gated_headwise" / schema.JSONL_NAME).exists()
    assert not list(out.rglob(".*.tmp"))
    assert "baseline" in (out / "report.html").read_text()
    assert "Interrupted" in capsys.readouterr().err
