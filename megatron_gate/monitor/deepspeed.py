"""The monitor on a DeepSpeed engine, also writing through DeepSpeed's own monitor backends.

    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=ds_config, ...)
    hook = DeepSpeedStabilityHook(engine, MonitorConfig(), run_dir="runs/ds")
    for batch in batches:
        decision = hook.train_step(batch, loss_of=lambda engine, batch: ...)
    hook.close()

`train_step` runs forward, `engine.backward`, the monitor check and `engine.step()`. When the
decision says `skip_step`, `engine.step()` runs with the optimizer's `step` replaced by a no-op
for that call, so DeepSpeed's counters, gradient zeroing and LR scheduler advance as usual while
no parameter or optimizer state moves (tested at ZeRO stage 0, where the engine holds the
torch optimizer; with ZeRO 1/2 DeepSpeed's partitioned optimizer is skipped the same way, which
is not tested here). Events and statistics go to the monitor's sinks
and, when DeepSpeed's monitor is enabled (`tensorboard`, `wandb`, `csv_monitor`, `comet` in the
DeepSpeed config), to DeepSpeed's backends as `stability/...` events.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megatron_gate.monitor import schema
from megatron_gate.monitor.actions import Decision
from megatron_gate.monitor.config import MonitorConfig
from megatron_gate.monitor.monitor import StabilityMonitor
from megatron_gate.monitor.sinks.base import Sink


class DeepSpeedMonitorSink(Sink):
    """Writes step values and events with `engine.monitor.write_events([(tag, value, step)])`."""

    name = "deepspeed"

    def __init__(self, deepspeed_monitor: Any) -> None:
        self.deepspeed_monitor = deepspeed_monitor

    def write(self, record: dict[str, Any]) -> None:
        """Translate one record into DeepSpeed monitor events."""
        step = record.get("step")
        events: list[tuple[str, float, int]] = []
        if record["kind"] == "step":
            for name, value in record["scalars"].items():
                if value is not None:
                    events.append((schema.tensorboard_tag(name), float(value), step))
            for name, values in (record.get("layers") or {}).items():
                for index, value in enumerate(values):
                    if value is not None:
                        events.append((schema.tensorboard_tag(name, index + 1), float(value), step))
        elif record["kind"] == "event":
            tag = schema.tensorboard_tag(f"events/{record['detector']}")
            events.append((tag, float(record["value"]), step))
        if events:
            self.deepspeed_monitor.write_events(events)


class DeepSpeedStabilityHook:
    """A `StabilityMonitor` attached to a DeepSpeed engine (`engine.module`, its optimizer)."""

    def __init__(
        self,
        engine: Any,
        config: MonitorConfig,
        *,
        run_dir: str | Path,
        run_name: str | None = None,
        **monitor_kwargs: Any,
    ) -> None:
        self.engine = engine
        extra = list(monitor_kwargs.pop("extra_sinks", ()))
        deepspeed_monitor = getattr(engine, "monitor", None)
        if getattr(deepspeed_monitor, "enabled", False):
            extra.append(DeepSpeedMonitorSink(deepspeed_monitor))
        self.monitor = StabilityMonitor(
            config,
            models=[engine.module],
            run_dir=run_dir,
            run_name=run_name,
            optimizer=engine.optimizer,
            extra_sinks=extra,
            **monitor_kwargs,
        )

    def train_step(
        self,
        batch: Any,
        *,
        loss_of: Callable[[Any, Any], torch.Tensor],
        tokens: int | None = None,
    ) -> Decision:
        """Forward (`loss_of(engine, batch)`), backward, check, step; returns the decision."""
        engine = self.engine
        step = engine.global_steps
        self.monitor.start_step(step)
        loss = loss_of(engine, batch)
        engine.backward(loss)
        grad_norm = (
            engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        )
        loss_scale = getattr(engine.optimizer, "cur_scale", None)
        decision = self.monitor.end_step(
            step,
            loss=loss.detach(),
            grad_norm=grad_norm,
            loss_scale=loss_scale,
            tokens=tokens,
        )
        if decision.skip_step:
            self._step_without_update()
        else:
            engine.step()
        return decision

    def _step_without_update(self) -> None:
        """`engine.step()` with the optimizer's own `step` a no-op for this call.

        DeepSpeed still clips, zeroes the gradients, advances `global_steps` and its LR
        scheduler, so its bookkeeping stays consistent; no parameter or optimizer state moves.
        """
        optimizer = self.engine.optimizer
        optimizer.step = lambda *args, **kwargs: None  # instance attribute shadows the method
        try:
            self.engine.step()
        finally:
            del optimizer.step

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, for `engine.save_checkpoint(client_state=...)`."""
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `client_state` of `engine.load_checkpoint`."""
        self.monitor.load_state_dict(state)

    def close(self, status: str = "completed") -> None:
        """Close the monitor."""
        self.monitor.close(status)
