"""The monitor in a plain PyTorch loop: checkpoints, rollback with a skipped data window, abort.

`train_with_monitor` is a small complete loop (also a readable example of the hook points):

    monitor = StabilityMonitor(config, models=[model], run_dir=run_dir, optimizer=optimizer)
    result = train_with_monitor(model=model, optimizer=optimizer, monitor=monitor,
                                batch_at=lambda index: batches[index], loss_of=loss_fn,
                                steps=1000, checkpoints=CheckpointStore(run_dir / "ckpt"),
                                checkpoint_interval=100)

Batches are addressed by a data index; a rollback reloads the newest checkpoint saved before
the spiking step and never replays the batches of the steps in `RollbackRequest.skip_steps`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_gate.monitor.actions import RollbackRequest
from megatron_gate.monitor.monitor import StabilityMonitor


class CheckpointStore:
    """Whole-state checkpoints `<directory>/step_<n>.pt`, written atomically (temp + rename)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        """File of the checkpoint taken after `step`."""
        return self.directory / f"step_{step:08d}.pt"

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` atomically; returns the path."""
        target = self.path(step)
        handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(state, temporary)
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return target

    def steps(self) -> list[int]:
        """Steps with a checkpoint, ascending."""
        return sorted(int(path.stem.split("_")[1]) for path in self.directory.glob("step_*.pt"))

    def latest_before(self, step: int) -> int | None:
        """The newest checkpointed step strictly before `step`."""
        earlier = [saved for saved in self.steps() if saved < step]
        return earlier[-1] if earlier else None

    def load(self, step: int) -> dict[str, Any]:
        """Read the checkpoint of `step` (tensors and plain values only: no code from files)."""
        return torch.load(self.path(step), weights_only=True)


@dataclass
class LoopResult:
    """What happened in `train_with_monitor`."""

    last_step: int = -1
    losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    rollbacks: list[RollbackRequest] = field(default_factory=list)
    skipped_batches: set[int] = field(default_factory=set)
    data_index_of_step: dict[int, int] = field(default_factory=dict)


def _state(
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    monitor: StabilityMonitor,
    data_index: int,
    skipped: set[int],
) -> dict[str, Any]:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "monitor": monitor.state_dict(),
        "data_index": data_index,
        "skipped_batches": sorted(skipped),
    }


def train_with_monitor(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    monitor: StabilityMonitor,
    batch_at: Callable[[int], Any],
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor],
    steps: int,
    checkpoints: CheckpointStore | None = None,
    checkpoint_interval: int = 0,
    clip_grad_norm: float | None = None,
    tokens_per_step: int | None = None,
) -> LoopResult:
    """Train `steps` steps with the monitor's decisions applied.

    `batch_at(index)` returns batch number `index`; `loss_of(model, batch)` its scalar loss.
    A checkpoint is saved after every `checkpoint_interval`-th step (and before step 0), an
    abort saves one more through `monitor.on_abort` (set here when it is unset).
    """
    result = LoopResult()
    step, data_index = 0, 0

    def save(at_step: int) -> None:
        if checkpoints is not None:
            state = _state(at_step, model, optimizer, monitor, data_index, result.skipped_batches)
            checkpoints.save(at_step, state)

    if monitor.on_abort is None and checkpoints is not None:
        monitor.on_abort = lambda _reason: save(step)
    if checkpoints is not None and checkpoint_interval:
        save(-1)
    status = "failed"
    try:
        while step < steps:
            while data_index in result.skipped_batches:
                data_index += 1
            batch = batch_at(data_index)
            result.data_index_of_step[step] = data_index
            monitor.start_step(step)
            loss = loss_of(model, batch)
            loss.backward()
            grad_norm = None
            if clip_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            decision = monitor.end_step(
                step, loss=loss.detach(), grad_norm=grad_norm, tokens=tokens_per_step
            )
            result.losses[step] = float(loss.detach())
            if decision.rollback is not None and checkpoints is not None:
                step, data_index = _rollback(
                    decision.rollback, model, optimizer, checkpoints, result
                )
                continue
            if decision.skip_step:
                result.skipped_steps.append(step)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            data_index += 1
            result.last_step = step
            if checkpoint_interval and (step + 1) % checkpoint_interval == 0:
                save(step)
            step += 1
        status = "completed"
    finally:
        monitor.close(status if status == "completed" else "aborted")
    return result


def _rollback(
    request: RollbackRequest,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoints: CheckpointStore,
    result: LoopResult,
) -> tuple[int, int]:
    """Reload the newest checkpoint before the spike; mark the window's batches as skipped.

    Returns the next (step, data index). The monitor keeps its own history (not reloaded), so
    its windows still hold the spike and the rollback counter goes on counting.
    """
    saved = checkpoints.latest_before(request.spike_step)
    if saved is None:
        raise RuntimeError(f"rollback at step {request.step}: no checkpoint before the spike")
    state = checkpoints.load(saved)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    optimizer.zero_grad(set_to_none=True)
    result.rollbacks.append(request)
    result.skipped_batches.update(state["skipped_batches"])
    result.skipped_batches.update(
        result.data_index_of_step[s] for s in request.skip_steps if s in result.data_index_of_step
    )
    return saved + 1, state["data_index"]
