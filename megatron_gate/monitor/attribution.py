"""Attribution of a rejected step: recompute it on the same batch before skipping it.

    decision = monitor.end_step(step, loss=loss, grad_norm=norm, recompute=True)
    if decision.recompute:                       # the guard rejected this step (every rank)
        loss, norm = forward_backward_again(batch)           # same batch, same RNG state
        decision = monitor.end_recompute(step, loss=loss, grad_norm=norm, samples=[...])
    monitor.step_optimizer(optimizer, decision)

Silent data corruption in one device's arithmetic gives NaNs and spikes that do not come back
when the step is computed again; a bad batch or a bad model gives the same values again. So,
before the guard's rejection is carried out, the step's forward and backward run once more on
the same batch, with the random state of the first run, and the guard tests the new values
against the statistics it had before the step:

- accepted: `transient`. The recomputed update is applied (no data lost); on a deterministic
  device the weights are bit-identical to those of a run without the fault.
- rejected again: `reproducible` (the batch or the model). The step is skipped as before.

The guard's re-test ends in its own all_reduce, so every rank reaches the same attribution.
Nothing here runs on an accepted step: the loop asks only where it reads the guard's decision
on the host anyway (`StabilityMonitor.decides_on_host`, Megatron-LM's grad-norm read), and the
state kept per step is a few references (the guard's tensors are replaced, never written in
place) and the host's random state.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from megatron_gate.monitor import schema
from megatron_gate.monitor.detectors import Event

logger = logging.getLogger(__name__)

TRANSIENT, REPRODUCIBLE = schema.ATTRIBUTIONS

# The guard's running state: `StepGuard` (device path) replaces these tensors on every check,
# `GuardRule` (host path) keeps deques that a rejected step leaves as they are, and a streak.
_DEVICE_STATE = ("history", "count", "position", "streak")


@dataclass(frozen=True)
class GuardSnapshot:
    """The guard's running statistics before a step's check (to test a recompute against)."""

    device: dict[str, torch.Tensor]
    streak: list[int]

    @classmethod
    def take(cls, guard: Any) -> GuardSnapshot:
        """References to the device tensors and a copy of the host rule's streak: no copy of
        any tensor, no device work."""
        return cls(
            device={name: getattr(guard, name) for name in _DEVICE_STATE},
            streak=copy.copy(guard.rule.streak),
        )

    def restore(self, guard: Any) -> None:
        """Put the guard back as it was before the rejected check."""
        for name, value in self.device.items():
            setattr(guard, name, value)
        guard.rule.streak = copy.copy(self.streak)


@dataclass(frozen=True)
class RandomState:
    """The host's random state (CPU and, where present, CUDA generators) at a step's start, so
    that a recompute draws the same dropout masks."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def take(cls) -> RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass(frozen=True)
class Attribution:
    """Why a rejected step was rejected, as the recompute tells."""

    step: int
    outcome: str
    """`transient` (the recompute was clean: its update was applied) or `reproducible`."""
    recomputed: tuple[float | None, float | None]
    """(loss, grad norm) of the recompute on this rank."""
    samples: tuple[int, ...] | None = None
    """The batch's sample indices, where the loop knows them."""


def outcome(accepted: bool) -> str:
    """The attribution of a rejected step whose recompute the guard `accepted` (or not)."""
    return TRANSIENT if accepted else REPRODUCIBLE


def attributed_event(event: Event, attribution: Attribution) -> Event:
    """The guard's event of a rejected step, with what the recompute found."""
    loss, grad_norm = attribution.recomputed
    found = f"recomputed on the same batch: loss {_number(loss)}, grad norm {_number(grad_norm)}"
    if attribution.outcome == TRANSIENT:
        # The recompute's update was applied: the step is not lost.
        return replace(
            event, action="log", attribution=TRANSIENT, samples=attribution.samples,
            message=f"step {event.step}: the guard rejected the {event.metric} "
            f"{_number(event.value)}; {found}: clean, a transient fault (hardware or "
            "arithmetic); the recomputed update was applied",
        )  # fmt: skip
    return replace(
        event, attribution=REPRODUCIBLE, samples=attribution.samples,
        message=f"{event.message}; {found}: reproduced, the batch or the model",
    )  # fmt: skip


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def recompute_available(monitor: Any) -> bool:
    """Whether a loop that steps through `monitor.step_optimizer` should offer recomputes:
    only where that step reads the guard's decision on the host anyway. Where the guard
    decides on the device (no read), says once why rejected steps go unattributed."""
    guard = monitor.config.guard
    if not (monitor.enabled and guard.enabled and guard.recompute_rejected):
        return False
    if monitor.decides_on_host():
        return True
    warn_unavailable(
        "the guard decides on the device (guard.skip_mode), and reading its decision every "
        "step would synchronise every step; set guard.skip_mode: host to attribute them"
    )
    return False


_WARNED: set[str] = set()


def warn_unavailable(reason: str) -> None:
    """Say once why rejected steps are skipped without a recompute."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        logger.warning("stability guard: rejected steps are skipped without a recompute "
                       "(no attribution): %s", reason)  # fmt: skip
