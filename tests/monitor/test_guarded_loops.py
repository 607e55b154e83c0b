"""`train_with_monitor` with the guard: a NaN batch or a 1000x spike at a non-logged step is not
applied; weights and AdamW state stay bit-identical to the step before."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityMonitor
from megatron_gate.monitor.loops import CheckpointStore, train_with_monitor
from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    state = [t.clone() for s in optimizer.state.values() for t in s.values()]
    return [p.detach().clone() for p in model.parameters()] + state


def _run(tmp_path: Path, *, bad_step: int, scale: float, steps: int, **config: object) -> dict:
    """Train with the default config (sinks quiet); the batch of `bad_step` is scaled."""
    torch.manual_seed(0)
    model = tiny_gated_gpt(seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = StabilityMonitor(
        MonitorConfig.from_dict({"sinks": {"console": False, "tensorboard": False}, **config}),
        models=[model], run_dir=tmp_path, optimizer=optimizer,
    )  # fmt: skip
    seen: dict[int, list[torch.Tensor]] = {}

    def loss_of(model_: torch.nn.Module, batch: dict) -> torch.Tensor:
        seen[batch["index"]] = _state(model_, optimizer)  # before this step's update
        loss = lm_loss(model_, batch)
        return loss * scale if batch["index"] == bad_step else loss

    result = train_with_monitor(
        model=model, optimizer=optimizer, monitor=monitor, steps=steps,
        batch_at=lambda index: {**batch_at(index), "index": index}, loss_of=loss_of,
        checkpoints=CheckpointStore(tmp_path / "ckpt"), checkpoint_interval=10,
    )  # fmt: skip
    return {"result": result, "seen": seen, "records": read_records(tmp_path)}


def _bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("skip_mode", ["device", "host"])
def test_nan_batch_at_a_non_logged_step_is_not_applied(
    one_rank_world: None, tmp_path: Path, skip_mode: str
) -> None:
    run = _run(tmp_path, bad_step=13, scale=float("nan"), steps=21, guard={"skip_mode": skip_mode})
    seen = run["seen"]
    assert _bit_identical(seen[13], seen[14])  # the NaN step left everything as it was
    assert not _bit_identical(seen[12], seen[13]) and not _bit_identical(seen[14], seen[15])
    assert all(torch.isfinite(t).all() for t in seen[15])
    events = [r for r in run["records"] if r["kind"] == "event"]
    guard = [e for e in events if e["detector"] == "guard"]
    assert [(e["step"], e["metric"], e["action"]) for e in guard] == [(13, "loss", "skip_step")]
    nan_events = [e for e in events if e["detector"] == "nan_or_inf"]
    # one episode: opened at the NaN step (its skip already done by the guard), closed after it
    assert [(e["step"], e["episode"]["phase"]) for e in nan_events] == [(13, "open"), (14, "close")]
    assert "skipped by the guard" in nan_events[0]["message"]
    # rollback checkpoints hold tensors and plain values only: weights_only loading works
    assert CheckpointStore(tmp_path / "ckpt").load(9)["step"] == 9


def test_1000x_spike_at_a_non_logged_step_is_not_applied(
    one_rank_world: None, tmp_path: Path
) -> None:
    run = _run(tmp_path, bad_step=37, scale=1000.0, steps=39, guard={"min_history": 16})
    seen = run["seen"]
    assert _bit_identical(seen[37], seen[38])
    assert not _bit_identical(seen[36], seen[37])
    guard = [r for r in run["records"] if r["kind"] == "event" and r["detector"] == "guard"]
    assert [(e["step"], e["metric"]) for e in guard] == [(37, "loss")]
    assert guard[0]["value"] == pytest.approx(1000 * run["result"].losses[37] / 1000, rel=1e-6)
    assert "its recent level" in guard[0]["message"]
