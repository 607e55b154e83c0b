"""`StepGuard`: the per-step decision to apply an update or not, every step.

    verdict = guard.check(loss=loss, grad_norm=grad_norm)   # no host read on a GPU
    bucketed_step(optimizer, accept=verdict.accept)          # old or new state by torch.where

The rule, per signal s in (loss, grad norm), with x_s its value on this rank this step:

- non-finite: x_s is NaN or +-Inf -> reject (`skip_non_finite`).
- spike: on log values. H_s holds the log-values of the last `window` ACCEPTED steps;
  center = median(H_s) (the lower median for an even count, as `torch.nanmedian`),
  scale = max(1.4826 x median(|H_s - center|), `scale_floor`),
  z = (log x_s - center) / scale, jump = x_s / exp(center) - 1.
  Reject when |H_s| >= `min_history` and z > `z_threshold` and jump > J_s, the signal's
  least relative jump (`min_relative_jump` for the loss, `grad_norm_min_relative_jump`).
- a spike that follows `max_consecutive_skips` spike rejections of the same signal is taken as a
  new level: it is accepted and H_s restarts from it (a warm-up again), so that a genuine level
  shift does not skip every following step.

The flags of every rank are combined with ONE `all_reduce(MAX)` of four numbers over the
monitor's group, so every rank takes the same decision. Only accepted steps enter H_s
(`torch.where`), so a NaN or a spike never poisons the statistics. Values <= 0 are checked for
finiteness only.

Two paths evaluate the rule. On a GPU it runs as tensor ops on the device, so the step never
waits for a host read. Where the values live on the CPU (reading them waits for nothing) the
plain-Python `GuardRule` evaluates it, about 20x cheaper than ~80 dispatched tensor ops; its
verdict is still a 0-dim bool tensor and its record the same columns. `reference_decisions`
is that rule for one rank; the tests hold both paths to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gate.monitor.config import GuardConfig
from megatron_gate.monitor.detectors import Event
from megatron_gate.monitor.guard_rule import MAD_TO_SIGMA, RECORD_COLUMNS, SIGNALS, GuardRule

__all__ = ["RECORD_COLUMNS", "SIGNALS", "GuardVerdict", "StepGuard", "reference_decisions"]


@dataclass(frozen=True)
class GuardVerdict:
    """One step's decision, on the device."""

    accept: torch.Tensor
    """0-dim bool: apply this step's update."""
    record: torch.Tensor
    """`[len(RECORD_COLUMNS)]` float64: flags and values, for the step's record."""
    read: tuple[float | None, float | None] | None = None
    """(loss, grad norm) as read to the host by the host path (None on the device path)."""


class StepGuard:
    """The on-device guard: finiteness and robust spike tests of the loss and grad norm.

    Args:
        config: the `guard:` section of the monitor config.
        device: where its statistics live (the model's device).
        process_group: the group whose ranks must agree (the monitor's; default: all ranks).
        gradient_norm: returns the norm of this rank's gradients on the device; used when the
            loop gives no grad norm, to check their finiteness (and spikes) without a host read.
    """

    def __init__(
        self,
        config: GuardConfig,
        *,
        device: torch.device,
        process_group: dist.ProcessGroup | None = None,
        gradient_norm: Callable[[], torch.Tensor | None] | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.process_group = process_group
        self.gradient_norm = gradient_norm
        self.on_host = config.reads_on_host(device.type)
        """Evaluate the rule in plain Python (`GuardRule`) rather than with device ops."""
        self.rule = GuardRule(config)
        self._verdicts = {
            flag: torch.tensor(flag, device=device) for flag in (True, False)
        }  # the host path's `accept` tensors, made once
        window = config.window
        options = dict(device=device)
        # [signal, window] accepted log-values, NaN where empty
        self.history = torch.full((2, window), math.nan, dtype=torch.float64, **options)
        self.count = torch.zeros(2, dtype=torch.long, **options)
        self.position = torch.zeros(2, dtype=torch.long, **options)
        self.streak = torch.zeros(2, dtype=torch.long, **options)
        self._slots = torch.arange(window, **options)
        self._tested = torch.tensor(
            [config.skip_loss_spikes, config.skip_grad_norm_spikes], **options
        )
        self._jumps = torch.tensor(
            [config.relative_jump(signal) for signal in SIGNALS], dtype=torch.float64, **options
        )
        self._presence: dict[tuple[bool, bool], torch.Tensor] = {}
        self._distributed = (
            dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
        )

    # ------------------------------------------------------------------ per step
    @torch.no_grad()
    def check(
        self,
        *,
        loss: torch.Tensor | float | None,
        grad_norm: torch.Tensor | float | None = None,
    ) -> GuardVerdict:
        """This step's verdict (every rank must call it: it runs one small collective)."""
        if grad_norm is None and self.gradient_norm is not None:
            grad_norm = self.gradient_norm()
        if self.on_host:
            return self._check_on_host(loss, grad_norm)
        present = (loss is not None, grad_norm is not None)
        values = torch.stack([self._as_device(loss), self._as_device(grad_norm)])
        mask = self._present(present)
        non_finite = mask & ~torch.isfinite(values)
        positive = mask & torch.isfinite(values) & (values > 0)
        logs = torch.log(torch.where(positive, values, torch.ones_like(values)))
        center, scale = self._center_scale()
        z = (logs - center) / scale
        jump = torch.expm1(logs - center)
        tested = positive & self._tested & (self.count >= self.config.min_history)
        spike = tested & (z > self.config.z_threshold) & (jump > self._jumps)
        new_level = spike & (self.streak >= self.config.max_consecutive_skips)
        spike = spike & ~new_level
        if not self.config.skip_non_finite:
            non_finite = torch.zeros_like(non_finite)
        flags = torch.cat([non_finite, spike]).double()
        if self._distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        accept = ~(flags > 0).any()
        self._update(accept, logs, positive, spike, new_level)
        # [4, signal]; -inf where a signal is absent (neutral for the log step's max-reduction)
        details = torch.where(mask, torch.stack([values, center, scale, z]), -math.inf)
        record = torch.cat([accept.double().reshape(1), flags, details.reshape(-1)])
        return GuardVerdict(accept=accept, record=record)

    def _check_on_host(
        self, loss: torch.Tensor | float | None, grad_norm: torch.Tensor | float | None
    ) -> GuardVerdict:
        """The same rule on host numbers: two reads, one small collective, no tensor math."""
        read = (_host_number(loss), _host_number(grad_norm))
        evaluation = self.rule.evaluate(read)
        flags = evaluation.flags
        if self._distributed:
            combined = torch.tensor(flags, dtype=torch.float64, device=self.device)
            dist.all_reduce(combined, op=dist.ReduceOp.MAX, group=self.process_group)
            flags = combined.tolist()
        accept = not any(flag > 0 for flag in flags)
        self.rule.update(evaluation, accept)
        record = torch.tensor(evaluation.record(accept, flags), dtype=torch.float64)
        return GuardVerdict(accept=self._verdicts[accept], record=record, read=read)

    def _as_device(self, value: torch.Tensor | float | None) -> torch.Tensor:
        if value is None:
            return torch.ones((), dtype=torch.float64, device=self.device)
        if isinstance(value, torch.Tensor):
            return value.detach().reshape(()).to(device=self.device, dtype=torch.float64)
        return torch.tensor(float(value), dtype=torch.float64, device=self.device)

    def _present(self, present: tuple[bool, bool]) -> torch.Tensor:
        if present not in self._presence:  # one host-to-device copy per pattern, then cached
            self._presence[present] = torch.tensor(present, device=self.device)
        return self._presence[present]

    def _center_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        center = torch.nanmedian(self.history, dim=1).values
        deviation = torch.nanmedian((self.history - center[:, None]).abs(), dim=1).values
        scale = torch.clamp(MAD_TO_SIGMA * deviation, min=self.config.scale_floor)
        return center, torch.nan_to_num(scale, nan=self.config.scale_floor)

    def _update(
        self,
        accept: torch.Tensor,
        logs: torch.Tensor,
        positive: torch.Tensor,
        spike: torch.Tensor,
        new_level: torch.Tensor,
    ) -> None:
        """Enter accepted values (a new level restarts its signal's history)."""
        restart = accept & new_level
        enter = accept & positive
        history = torch.where(
            restart[:, None], torch.full_like(self.history, math.nan), self.history
        )
        count = torch.where(restart, torch.zeros_like(self.count), self.count)
        position = torch.where(restart, torch.zeros_like(self.position), self.position)
        # [signal, window]: the slot this step's value goes to
        slot = (self._slots[None, :] == position[:, None]) & enter[:, None]
        self.history = torch.where(slot, logs[:, None], history)
        self.position = torch.where(enter, (position + 1) % self.config.window, position)
        self.count = torch.where(enter, torch.clamp(count + 1, max=self.config.window), count)
        self.streak = torch.where(spike, self.streak + 1, torch.zeros_like(self.streak))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, list]:
        """The running statistics as plain lists (a host read: call it at checkpoint time).

        One format for both paths (the device's ring buffer), so that a checkpoint resumes on
        either."""
        if self.on_host:
            return self.rule.ring_state()
        return {
            "history": self.history.tolist(),
            "count": self.count.tolist(),
            "position": self.position.tolist(),
            "streak": self.streak.tolist(),
        }

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore `state_dict()` output (ignored when the window size differs)."""
        history = torch.tensor(state.get("history", []), dtype=torch.float64)
        if tuple(history.shape) != tuple(self.history.shape):
            return
        if self.on_host:
            self.rule.load_ring_state(state)
            return
        self.history = history.to(self.device)
        for name in ("count", "position", "streak"):
            setattr(self, name, torch.tensor(state[name], dtype=torch.long, device=self.device))


def _host_number(value: torch.Tensor | float | None) -> float | None:
    """A loss or grad norm as a host float (None stays None)."""
    if value is None:
        return None
    return value.item() if isinstance(value, torch.Tensor) else float(value)


# ---------------------------------------------------------------------- records
def skip_event(step: int, values: dict[str, float], config: GuardConfig) -> Event:
    """The event of a step the guard skipped (`values`: its `RECORD_COLUMNS`, host numbers)."""
    for signal in SIGNALS:
        if values[f"non_finite_{signal}"] > 0:
            return Event(
                step=step, detector="guard", severity="critical", metric=signal,
                value=values[signal], threshold=math.inf, layer=None, action="skip_step",
                kind="non_finite", start_step=step, end_step=step, signals=(signal,),
                message=f"step {step}: the {_LABELS[signal]} is {values[signal]} (not finite); "
                "the guard skipped the update (weights and optimizer state unchanged)",
            )  # fmt: skip
    signal = "loss" if values["loss_spike"] > 0 else "grad_norm"
    value, center = values[signal], values[f"{signal}_center"]
    level = math.exp(center)
    threshold = max(math.exp(center + config.z_threshold * values[f"{signal}_scale"]),
                    level * (1 + config.relative_jump(signal)))  # fmt: skip
    return Event(
        step=step, detector="guard", severity="critical", metric=signal, value=value,
        threshold=threshold, layer=None, action="skip_step",
        kind="spike", start_step=step, end_step=step, peak=value, signals=(signal,),
        message=f"step {step}: the {_LABELS[signal]} {value:.4g} is {value / level:.3g}x its "
        f"recent level {level:.4g} (robust z {values[f'{signal}_z']:.3g} > "
        f"{config.z_threshold:g}); the guard skipped the update",
    )  # fmt: skip


_LABELS = {"loss": "loss", "grad_norm": "grad norm"}


# ---------------------------------------------------------------------- plain reference
def reference_decisions(
    values: Iterable[tuple[float | None, float | None]], config: GuardConfig
) -> list[bool]:
    """The guard's rule for one rank in plain Python: accept (True) or skip, per (loss, grad_norm)."""
    rule = GuardRule(config)
    return [rule.decide(step_values) for step_values in values]
