"""The monitor in a plain PyTorch loop: checkpoints, rollback with a skipped data window, abort.

`train_with_monitor` is a small complete loop (also a readable example of the hook points):

    monitor = StabilityMonitor(config, models=[model], run_dir=run_dir, optimizer=optimizer)
    result = train_with_monitor(model=model, optimizer=optimizer, monitor=monitor,
                                batch_at=lambda index: batches[index], loss_of=loss_fn,
                                steps=1000, checkpoints=CheckpointStore(run_dir / "ckpt"),
                                checkpoint_interval=100)

Batches are addressed by a data index; a rollback reloads the newest checkpoint saved before
the spiking step and never replays the batches of the steps in `RollbackRequest.skip_steps`.
Every update goes through `monitor.step_optimizer`: a step the guard rejects (a NaN loss, a
spike) leaves the weights and the optimizer state bit-identical, with no host read; the steps
the logged path skips are listed in `LoopResult.skipped_steps` (the guard's are events). With
the host guard (the CPU default) a rejected step is first computed again on the same batch
(attribution.py): a transient fault's recomputed update is applied, a reproducible one skipped.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_gate.monitor.actions import Decision, RollbackRequest
from megatron_gate.monitor.attribution import RandomState, recompute_available
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
    abort saves one more through `monitor.on_abort` (set here when it is unset). A step the
    guard rejects is recomputed on the same batch first (`guard.recompute_rejected`, where the
    decision is read on the host): a transient fault's recomputed update is applied.
    """
    loop = _Loop(model=model, optimizer=optimizer, monitor=monitor, batch_at=batch_at,
                 loss_of=loss_of, checkpoints=checkpoints, interval=checkpoint_interval,
                 clip=clip_grad_norm, tokens=tokens_per_step)  # fmt: skip
    if monitor.on_abort is None and checkpoints is not None:
        monitor.on_abort = lambda _reason: loop.save(loop.step)
    if checkpoints is not None and checkpoint_interval:
        loop.save(-1)
    status = "failed"
    try:
        while loop.step < steps:
            loop.train_step()
        status = "completed"
    finally:
        monitor.close(status if status == "completed" else "aborted")
        loop.result.losses = {at: float(value) for at, value in loop.losses.items()}
    return loop.result


@dataclass(kw_only=True)
class _Loop:
    """The state of `train_with_monitor` and its steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    monitor: StabilityMonitor
    batch_at: Callable[[int], Any]
    loss_of: Callable[[torch.nn.Module, Any], torch.Tensor]
    checkpoints: CheckpointStore | None
    interval: int
    clip: float | None
    tokens: int | None
    result: LoopResult = field(default_factory=LoopResult)
    step: int = 0
    data_index: int = 0
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    """Read once at the end: no host read per step."""

    def __post_init__(self) -> None:
        self.recompute = recompute_available(self.monitor)

    def save(self, at_step: int) -> None:
        if self.checkpoints is not None:
            state = _state(at_step, self.model, self.optimizer, self.monitor, self.data_index,
                           self.result.skipped_batches)  # fmt: skip
            self.checkpoints.save(at_step, state)

    def forward_backward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss = self.loss_of(self.model, batch)
        loss.backward()
        grad_norm = None
        if self.clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        return loss.detach(), grad_norm

    def train_step(self) -> None:
        """One step: forward and backward, the monitor's decision, the update."""
        step, result = self.step, self.result
        while self.data_index in result.skipped_batches:
            self.data_index += 1
        batch = self.batch_at(self.data_index)
        result.data_index_of_step[step] = self.data_index
        self.monitor.start_step(step)
        decision = self.decide(batch)
        if decision.rollback is not None and self.checkpoints is not None:
            self.step, self.data_index = _rollback(
                decision.rollback, self.model, self.optimizer, self.checkpoints, result
            )
            return
        # The guard's verdict is applied on the device; host-known skips do not step.
        if not self.monitor.step_optimizer(self.optimizer, decision):
            result.skipped_steps.append(step)
        self.optimizer.zero_grad(set_to_none=True)
        self.data_index += 1
        result.last_step = step
        if self.interval and (step + 1) % self.interval == 0:
            self.save(step)
        self.step += 1

    def decide(self, batch: Any) -> Decision:
        """The monitor's decision on this step; a rejected step is recomputed on its batch."""
        random_state = RandomState.take() if self.recompute else None
        loss, grad_norm = self.forward_backward(batch)
        self.losses[self.step] = loss
        decision = self.monitor.end_step(self.step, loss=loss, grad_norm=grad_norm,
                                         tokens=self.tokens, recompute=self.recompute)  # fmt: skip
        if not decision.recompute or random_state is None:
            return decision
        random_state.restore()  # the same dropout masks as the first computation
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm = self.forward_backward(batch)
        self.losses[self.step] = loss
        return self.monitor.end_recompute(self.step, loss=loss, grad_norm=grad_norm,
                                          samples=[self.data_index])  # fmt: skip


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
