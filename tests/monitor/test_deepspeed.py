"""The DeepSpeed hook: a real engine (ZeRO 0, CPU), skip_step, DeepSpeed's csv monitor backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig
from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt

deepspeed = pytest.importorskip("deepspeed")


def test_deepspeed_engine_hook(one_rank_world: None, tmp_path: Path) -> None:
    from megatron_gate.monitor.deepspeed import DeepSpeedStabilityHook

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
    hook = DeepSpeedStabilityHook(
        engine,
        MonitorConfig.from_dict(
            {
                "log_interval": 1,
                "layer_interval": 2,
                "sinks": {"console": False, "tensorboard": False},
            }
        ),
        run_dir=tmp_path,
    )

    def loss_of(engine_, batch):  # noqa: ANN001, ANN202
        loss = lm_loss(engine_.module, batch)
        return loss * float("nan") if batch["nan"] else loss

    decisions = []
    for index in range(4):
        before = [p.detach().clone() for p in engine.module.parameters()]
        decision = hook.train_step(
            {**batch_at(index), "nan": index == 2}, loss_of=loss_of, tokens=32
        )
        moved = any(
            not torch.equal(a, b) for a, b in zip(before, engine.module.parameters(), strict=True)
        )
        assert moved == (not decision.skip_step)
        decisions.append(decision)
    hook.close()
    assert [d.skip_step for d in decisions] == [False, False, True, False]
    assert engine.global_steps == 4
    records = read_records(tmp_path)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert "layers" in steps[2] and steps[2]["scalars"]["nan_or_inf"] == 1.0
    csv_files = {p.name for p in (tmp_path / "ds").rglob("*.csv")}
    assert any("stability" in name and "loss" in name for name in csv_files), csv_files
    assert any("max_abs_residual" in name for name in csv_files), csv_files
