"""The stability monitor on a DeepSpeed engine (ZeRO 0/1/2 and the pipeline engine).

    engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)
    monitor = monitor_engine(engine, ds_config, run_dir="runs/exp1")   # or config="monitor.yaml"
    for batch in batches:                       # ZeRO engine: the usual loop, unchanged
        loss = engine(batch); engine.backward(loss); engine.step()
    # pipeline engine: engine.train_batch(data_iter), unchanged
    monitor.close()

Hooks on the engine instance (nothing of DeepSpeed is changed for other engines):

    forward / train_batch   -> monitor.start_step(n)       n = engine.global_steps + 1
    backward                -> this rank's loss (summed over micro-batches)
    _take_model_step        -> monitor.end_step(n, ...) before the optimizer step (the guard runs
                               there, every step); a skipped step takes DeepSpeed's own overflow
                               path (gradients cleared, the step counted in
                               `engine.skipped_steps`, no scheduler step)

The guard's verdict reaches DeepSpeed without a host read of ours: ZeRO 1/2 read their gradient
norm on the host every step to find overflows (fp32 and fp16; bf16 with `check_grad_overflow`), so
the norm they read is replaced by inf where the guard rejects (`torch.where`), and DeepSpeed's
own check takes the overflow path. Where DeepSpeed reads nothing (ZeRO 0's torch optimizer, ZeRO
with bf16 without the overflow check) the basic optimizer steps through `bucketed_step`, which
keeps the old weights and state on the device; DeepSpeed then counts the step as applied and
steps its scheduler.

The configuration comes from a `"stability_monitor"` block of the DeepSpeed config or from our
YAML; the monitor also writes through DeepSpeed's own monitor backends (TensorBoard, W&B, CSV
configured in the DeepSpeed config) with the monitor's `DeepSpeedMonitorSink`.
`save_checkpoint` / `load_checkpoint` keep the monitor's state in DeepSpeed checkpoints
(`client_state`). This is the one DeepSpeed entry point: it hooks an unchanged loop, the
pipeline engine's `train_batch` included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_gate.megatron_lm.patching import wrap
from megatron_gate.monitor import Decision, MonitorConfig, RollbackRequest, StabilityMonitor, schema
from megatron_gate.monitor.guarded_step import guarded_inner_step
from megatron_gate.monitor.sinks.base import Sink

logger = logging.getLogger(__name__)

DS_CONFIG_KEY = "stability_monitor"
"""Key of the monitor's block in a DeepSpeed config (and of its state in `client_state`)."""


def monitor_config_from(
    source: MonitorConfig | dict[str, Any] | str | Path | None,
) -> MonitorConfig:
    """A `MonitorConfig` from a DeepSpeed config dict (its `stability_monitor` block), a YAML path,
    a plain monitor dict, or the defaults."""
    if source is None:
        return MonitorConfig()
    if isinstance(source, MonitorConfig):
        return source
    if isinstance(source, (str, Path)):
        return MonitorConfig.from_yaml(source)
    if (
        "train_batch_size" in source
        or "train_micro_batch_size_per_gpu" in source
        or (DS_CONFIG_KEY in source)
    ):
        return MonitorConfig.from_dict(source.get(DS_CONFIG_KEY) or {})
    return MonitorConfig.from_dict(source)


class DeepSpeedMonitorSink(Sink):
    """Writes step values and events with `engine.monitor.write_events([(tag, value, step)])`
    (DeepSpeed's own backends: TensorBoard, W&B, CSV, Comet of the DeepSpeed config)."""

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


def _reads_overflow(optimizer: Any) -> bool:
    """Whether a ZeRO 1/2 optimizer reads its gradient norm on the host to find overflows."""
    return (
        callable(getattr(optimizer, "scaled_global_norm", None))
        and bool(getattr(optimizer, "compute_grad_norm", False))
        and (
            getattr(optimizer, "dtype", None) != torch.bfloat16
            or bool(getattr(optimizer, "check_grad_overflow", False))
        )
    )


@contextlib.contextmanager
def _guarded_update(optimizer: Any, accept: torch.Tensor | None) -> Iterator[None]:
    """Apply the guard's verdict to the engine's next optimizer step (see the module doc)."""
    if accept is None:
        yield
        return
    if _reads_overflow(optimizer):
        norm = optimizer.scaled_global_norm

        def rejected_is_overflow(*args: Any, **kwargs: Any) -> torch.Tensor:
            value = torch.as_tensor(norm(*args, **kwargs), device=accept.device)
            return torch.where(accept, value, torch.full_like(value, float("inf")))

        optimizer.scaled_global_norm = rejected_is_overflow
        try:
            yield
        finally:
            del optimizer.scaled_global_norm
        return
    basic = optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer
    with guarded_inner_step(basic, accept=accept):
        yield


@contextlib.contextmanager
def _skipped_update(optimizer: Any) -> Iterator[None]:
    """Make the engine's next optimizer step a skipped one.

    ZeRO 1/2 optimizers: report a gradient overflow, so that DeepSpeed clears the gradients and
    counts the step in `skipped_steps` itself. Other optimizers: their `step` does nothing.
    """
    if hasattr(optimizer, "check_overflow") and hasattr(optimizer, "check_grad_overflow"):
        checks = optimizer.check_grad_overflow

        def overflow(*_args: Any, **_kwargs: Any) -> bool:
            optimizer.overflow = True
            return True

        optimizer.check_grad_overflow = True
        optimizer.check_overflow = overflow
        try:
            yield
        finally:
            del optimizer.check_overflow
            optimizer.check_grad_overflow = checks
        return
    optimizer.step = lambda *_args, **_kwargs: None
    try:
        yield
    finally:
        del optimizer.step


class DeepSpeedStabilityMonitor:
    """A `StabilityMonitor` attached to one DeepSpeed engine."""

    def __init__(
        self,
        engine: Any,
        config: MonitorConfig,
        *,
        run_dir: str | Path,
        checkpoint_dir: str | Path | None = None,
        sequence_length: int = 1,
    ) -> None:
        self.engine = engine
        self.sequence_length = sequence_length
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        ds_monitor = getattr(engine, "monitor", None)
        extra = [DeepSpeedMonitorSink(ds_monitor)] if getattr(ds_monitor, "enabled", False) else []
        self.monitor = StabilityMonitor(
            config,
            models=[engine.module],
            run_dir=run_dir,
            optimizer=engine.optimizer,
            on_rollback=self.rollback,
            on_abort=self.save_before_abort,
            extra_sinks=extra,
        )
        self.step: int | None = None
        self.loss_sum: torch.Tensor | None = None
        self.micro_batches = 0
        self.decision: Decision | None = None
        self._install()

    # ------------------------------------------------------------------ per step
    def _begin(self) -> None:
        step = self.engine.global_steps + 1
        if self.step == step:
            return
        self.step, self.loss_sum, self.micro_batches, self.decision = step, None, 0, None
        self.monitor.start_step(step)

    def _record_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.micro_batches += 1

    def _step_loss(self) -> torch.Tensor | None:
        pipeline_loss = getattr(self.engine, "total_loss", None)  # last pipeline stage only
        if isinstance(pipeline_loss, torch.Tensor):
            return pipeline_loss.detach().float() / self.engine.gradient_accumulation_steps()
        if self.loss_sum is None:
            return None
        return self.loss_sum / max(self.micro_batches, 1)

    def _end(self) -> Decision:
        self._begin()  # a no-op when forward already began this step
        optimizer = self.engine.optimizer
        self.decision = self.monitor.end_step(
            self.step,
            loss=self._step_loss(),
            loss_scale=getattr(optimizer, "loss_scale", None),
            tokens=self.engine.train_batch_size() * self.sequence_length,
        )
        return self.decision

    # ------------------------------------------------------------------ hooks
    def _install(self) -> None:
        engine = self.engine

        def starting(original: Any) -> Any:
            def begin_then_run(*args: Any, **kwargs: Any) -> Any:
                self._begin()
                return original(*args, **kwargs)

            return begin_then_run

        def recording(original: Any) -> Any:
            def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                self._record_loss(loss)
                return original(loss, *args, **kwargs)

            return backward

        def deciding(original: Any) -> Any:
            def take_model_step(*args: Any, **kwargs: Any) -> Any:
                decision = self._end()
                if decision.skip_step or decision.rollback is not None:
                    logger.warning("megatron-gate: the stability monitor skips the update of "
                                   "step %d (%s).", decision.step, decision.action)  # fmt: skip
                    with _skipped_update(engine.optimizer):
                        return original(*args, **kwargs)
                with _guarded_update(engine.optimizer, decision.accept):
                    return original(*args, **kwargs)

            return take_model_step

        if hasattr(engine, "train_batch"):  # PipelineEngine: one call per step
            wrap([engine], "train_batch", starting)
        else:
            wrap([engine], "forward", starting)
            wrap([engine], "backward", recording)
        wrap([engine], "_take_model_step", deciding)

    # ------------------------------------------------------------------ actions
    def rollback(self, request: RollbackRequest) -> None:
        """Reload the newest DeepSpeed checkpoint of `checkpoint_dir` (data is not replayed)."""
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            logger.warning("megatron-gate: rollback asked (%s) without a checkpoint; the step is "
                           "skipped instead.", request.reason)  # fmt: skip
            return
        self.engine.load_checkpoint(str(self.checkpoint_dir))
        logger.warning("megatron-gate: rolled back after a spike at step %d (%s).",
                       request.spike_step, request.reason)  # fmt: skip

    def save_before_abort(self, reason: str) -> None:
        if self.checkpoint_dir is not None:
            save_checkpoint(self, self.checkpoint_dir)

    def close(self, status: str = "completed") -> None:
        self.monitor.close(status)


def monitor_engine(
    engine: Any,
    config: MonitorConfig | dict[str, Any] | str | Path | None = None,
    *,
    run_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    sequence_length: int = 1,
) -> DeepSpeedStabilityMonitor:
    """Attach the stability monitor to a DeepSpeed engine.

    `config`: the DeepSpeed config dict (its `stability_monitor` block), a monitor YAML path, a
    `MonitorConfig`, or None for the defaults. `sequence_length` turns samples into tokens for
    the tokens/s metric.
    """
    return DeepSpeedStabilityMonitor(
        engine,
        monitor_config_from(config),
        run_dir=run_dir,
        checkpoint_dir=checkpoint_dir,
        sequence_length=sequence_length,
    )


def save_checkpoint(
    monitor: DeepSpeedStabilityMonitor, save_dir: str | Path, **kwargs: Any
) -> None:
    """`engine.save_checkpoint` with the monitor's state in `client_state`."""
    client_state = {**kwargs.pop("client_state", {}), DS_CONFIG_KEY: monitor.monitor.state_dict()}
    monitor.engine.save_checkpoint(str(save_dir), client_state=client_state, **kwargs)


def load_checkpoint(monitor: DeepSpeedStabilityMonitor, load_dir: str | Path, **kwargs: Any) -> Any:
    """`engine.load_checkpoint`, restoring the monitor's state; returns DeepSpeed's result."""
    path, client_state = monitor.engine.load_checkpoint(str(load_dir), **kwargs)
    if client_state and DS_CONFIG_KEY in client_state:
        monitor.monitor.load_state_dict(client_state[DS_CONFIG_KEY])
    return path, client_state
