"""Actions: turn a step's events into one `Decision` the training loop applies.

Strength order: log < alert < lr_backoff < skip_step < rollback < abort; a decision carries every
action its events asked for (an LR back-off and a skipped step can come together).

- skip_step: the loop does not apply this step's optimizer update. Events found on earlier,
  unlogged steps (read at the log step, `log_interval` > 1) cannot be skipped any more: they
  are reported as alerts and say so, unless the on-device guard (`guard.py`) already skipped
  that step.
- lr_backoff: `LearningRateBackoff` scales the optimizer's learning rates by a factor for K
  steps, then restores them. It works with any object that has `param_groups` (torch
  optimizers, Megatron's `MegatronOptimizer`/`ChainedOptimizer`), and follows schedulers that
  set a fresh `lr` every step.
- rollback: a `RollbackRequest` (reload the last good checkpoint, skip the batches that
  caused the spike), executed by a callback the loop provides; after `max_rollbacks`, abort.
- abort: save through the loop's callback, write why, exit non-zero (`StabilityAbort`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from megatron_gate.monitor.detectors import Event

ACTION_STRENGTH = {
    "log": 0,
    "alert": 1,
    "lr_backoff": 2,
    "skip_step": 3,
    "rollback": 4,
    "abort": 5,
}

ABORT_EXIT_CODE = 3


class StabilityAbort(SystemExit):
    """Raised by the monitor when an `abort` action fires; exits the process with code 3."""

    def __init__(self, reason: str) -> None:
        super().__init__(ABORT_EXIT_CODE)
        self.reason = reason

    def __str__(self) -> str:
        return f"stability monitor aborted training: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class RollbackRequest:
    """Reload the last good checkpoint; then skip the batches of `skip_steps`."""

    step: int
    """The step at which the rollback was decided."""
    spike_step: int
    """The step whose values fired the detector."""
    skip_steps: tuple[int, ...]
    """Steps whose batches must not be replayed (the data window that caused the spike)."""
    reason: str


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What the loop must do after this step's check."""

    step: int
    skip_step: bool = False
    """Do not apply this step's optimizer update."""
    lr_scale: float = 1.0
    """Learning-rate multiplier in force for this step (already applied to the monitor's
    optimizer when it was given one)."""
    rollback: RollbackRequest | None = None
    """Reload the last good checkpoint and skip `rollback.skip_steps`' batches."""
    abort: str | None = None
    """Stop training; the reason."""
    events: tuple[Event, ...] = field(default_factory=tuple)
    """Everything detected (all severities), including earlier unlogged steps."""
    accept: torch.Tensor | None = None
    """The guard's verdict on this step, a 0-dim bool on the device (None: no guard). Not read
    by the monitor: `StabilityMonitor.step_optimizer` applies it with `torch.where`."""
    recompute: bool = False
    """The guard rejected this step and the loop offered a recompute (`end_step(recompute=True)`):
    run its forward and backward again on the same batch and call `end_recompute`."""

    @property
    def action(self) -> str:
        """The strongest action taken."""
        if self.abort:
            return "abort"
        if self.rollback:
            return "rollback"
        if self.skip_step:
            return "skip_step"
        return max((event.action for event in self.events), key=ACTION_STRENGTH.get, default="log")


class LearningRateBackoff:
    """Scale learning rates by `factor` for `steps` steps, then restore them."""

    def __init__(self, *, factor: float, steps: int) -> None:
        self.factor, self.steps = factor, steps
        self.remaining = 0
        self._groups: dict[int, dict[str, float]] = {}

    @property
    def scale(self) -> float:
        """The multiplier in force now."""
        return self.factor if self.remaining > 0 else 1.0

    def trigger(self) -> None:
        """Start (or extend) a back-off of `steps` steps."""
        self.remaining = self.steps

    def apply(self, optimizer: Any) -> None:
        """Set every param group's lr to base x scale; `base` is the scheduler's latest value."""
        groups = getattr(optimizer, "param_groups", None)
        if not groups or (self.remaining == 0 and not self._groups):
            return
        scale = self.scale
        for index, group in enumerate(groups):
            current = float(group["lr"])
            state = self._groups.get(index)
            # A value we did not set came from the scheduler (or the user): it is the new base.
            base = state["base"] if state is not None and current == state["set"] else current
            group["lr"] = base * scale
            self._groups[index] = {"base": base, "set": base * scale}
        if scale == 1.0:
            self._groups.clear()

    def base_of(self, learning_rate: float, *, group: int = 0) -> float:
        """The scheduler's learning rate behind a group's `learning_rate` (undoing our scale)."""
        state = self._groups.get(group)
        return (
            state["base"] if state is not None and learning_rate == state["set"] else learning_rate
        )

    def advance(self) -> None:
        """Count one step of the back-off."""
        self.remaining = max(0, self.remaining - 1)

    def state_dict(self) -> dict[str, Any]:
        """Remaining steps and the remembered base learning rates."""
        return {"remaining": self.remaining, "groups": {str(k): v for k, v in self._groups.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.remaining = int(state.get("remaining", 0))
        self._groups = {int(k): dict(v) for k, v in state.get("groups", {}).items()}


class ActionPolicy:
    """Decide what a step's events ask for, and keep count of rollbacks."""

    def __init__(self, *, rollback_skip_batches: int, max_rollbacks: int) -> None:
        self.rollback_skip_batches = rollback_skip_batches
        self.max_rollbacks = max_rollbacks
        self.rollbacks = 0

    def decide(
        self, step: int, events: Sequence[Event], *, guard_skipped: frozenset[int] = frozenset()
    ) -> tuple[Decision, list[Event]]:
        """The decision for `step` and the events as acted on (late skips become alerts, except
        on the steps in `guard_skipped`, whose update the guard did not apply)."""
        acted: list[Event] = []
        decision = Decision(step=step)
        for event in events:
            if event.action == "skip_step" and event.step in guard_skipped and event.step != step:
                event = replace(event, message=f"{event.message} (skipped by the guard)")
                acted.append(event)
                continue
            if event.action == "skip_step" and event.step != step:
                event = replace(
                    event,
                    action="alert",
                    message=f"{event.message} (found at step {step}: too late to skip; "
                    "set log_interval=1 to skip spiking steps)",
                )
            acted.append(event)
            decision = self._apply(decision, event)
        return replace(decision, events=tuple(acted)), acted

    def _apply(self, decision: Decision, event: Event) -> Decision:
        if event.action == "skip_step":
            return replace(decision, skip_step=True)
        if event.action == "abort":
            return replace(decision, abort=decision.abort or event.message)
        if event.action == "rollback" and decision.rollback is None:
            if self.rollbacks >= self.max_rollbacks:
                return replace(
                    decision,
                    abort=decision.abort
                    or f"{event.message}; rollback limit ({self.max_rollbacks}) reached",
                )
            self.rollbacks += 1
            first = event.step - self.rollback_skip_batches + 1
            return replace(
                decision,
                rollback=RollbackRequest(
                    step=decision.step,
                    spike_step=event.step,
                    skip_steps=tuple(range(first, event.step + 1)),
                    reason=event.message,
                ),
            )
        return decision

    def state_dict(self) -> dict[str, Any]:
        """The rollback count."""
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rollback count."""
        self.rollbacks = int(state.get("rollbacks", 0))
