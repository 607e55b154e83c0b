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
    _take_model_step        -> monitor.end_step(n, ...) before the optimizer step; a skipped
                               step takes DeepSpeed's own overflow path (gradients cleared, the
                               step counted in `engine.skipped_steps`, no scheduler step)

The configuration comes from a `"stability_monitor"` block of the DeepSpeed config or from our
YAML; the monitor also writes through DeepSpeed's own monitor backends (TensorBoard, W&B, CSV
configured in the DeepSpeed config) with the monitor's `DeepSpeedMonitorSink`.
`save_checkpoint` / `load_checkpoint` keep the monitor's state in DeepSpeed checkpoints
(`client_state`). `megatron_gate.monitor.deepspeed.DeepSpeedStabilityHook` is the variant for
loops that hand each step to the monitor; this module hooks an unchanged loop, the pipeline
engine's `train_batch` included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_gate.megatron_lm.patching import wrap
from megatron_gate.monitor import Decision, MonitorConfig, RollbackRequest, StabilityMonitor
from megatron_gate.monitor.deepspeed import DeepSpeedMonitorSink

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
        if self.step is None:
            self._begin()
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
