"""The DeepSpeed entry point on a real engine (ZeRO 0, CPU): the guard skips a NaN step that is
not logged through the basic torch optimizer (bit-identical state); DeepSpeed's csv backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt

deepspeed = pytest.importorskip("deepspeed")


def _state(engine) -> list[torch.Tensor]:  # noqa: ANN001
    optimizer = engine.optimizer
    state = [t.clone() for s in optimizer.state.values() for t in s.values()]
    return [p.detach().clone() for p in engine.module.parameters()] + state


def test_deepspeed_engine_guard_and_csv_backend(one_rank_world: None, tmp_path: Path) -> None:
    from megatron_gate.deepspeed import monitor_engine

    model = tiny_gated_gpt(seed=4)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={
            "train_batch_size": 2,
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": 0},
            "csv_monitor": {
                "enabled": True,
                "output_path": str(tmp_path / "ds"),
                "job_name": "job",
            },
        },
    )
    monitor = monitor_engine(
        engine,
        {"log_interval": 4, "layer_interval": 4, "sinks": {"console": False, "tensorboard": False}},
        run_dir=tmp_path,
    )
    unchanged = []
    for step in range(1, 6):
        before = _state(engine)
        loss = lm_loss(engine, batch_at(step))  # through the engine's forward (hooked)
        if step == 3:  # a non-logged step
            loss = loss * float("nan")
        engine.backward(loss)
        engine.step()
        after = _state(engine)
        unchanged.append(
            len(before) == len(after)
            and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        )
    monitor.close()
    assert unchanged == [False, False, True, False, False]
    assert engine.global_steps == 5
    records = read_records(tmp_path)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert steps[2]["scalars"]["nan_or_inf"] == 1.0 and "layers" in steps[3]
    guard = [(r["step"], r["metric"]) for r in records if r["kind"] == "event"
             and r["detector"] == "guard"]  # fmt: skip
    assert guard == [(3, "loss")]
    csv_files = {p.name for p in (tmp_path / "ds").rglob("*.csv")}
    assert any("stability" in name and "loss" in name for name in csv_files), csv_files
    assert any("max_abs_residual" in name for name in csv_files), csv_files
