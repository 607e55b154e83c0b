"""`StabilityMonitor`: the one object a training loop talks to.

    monitor.start_step(step)                       # arms layer hooks on per-layer steps
    loss = forward_backward(...)
    decision = monitor.end_step(step, loss=loss, grad_norm=..., tokens=...)
    monitor.step_optimizer(optimizer, decision)    # the guard's verdict applied on the device

A loop that can run a step again on the same batch passes `recompute=True`; a step the guard
rejects then comes back with `decision.recompute`, and the loop reports the recompute with
`end_recompute` (attribution.py: transient fault or reproducible).

Per step, `end_step` writes the scalars into a device buffer and runs the guard (`guard.py`:
finiteness and spike tests on the device, one small all_reduce; no host read). Every
`log_interval` steps it packs the buffered scalars and, on per-layer steps, every layer
statistic into one tensor, gathers it with ONE collective, and every rank runs the same pure
detectors on the same numbers, so all ranks take the same decision. The writer rank feeds the
sinks. The monitor's own errors are logged once and never stop training; only an `abort`
action does (`StabilityAbort`, exit code 3).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gate.monitor import schema
from megatron_gate.monitor.actions import (
    ActionPolicy,
    Decision,
    LearningRateBackoff,
    RollbackRequest,
    StabilityAbort,
)
from megatron_gate.monitor.attribution import (
    REPRODUCIBLE,
    Attribution,
    GuardSnapshot,
    attributed_event,
    outcome,
)
from megatron_gate.monitor.collectors import (
    ACTIVATIONS,
    LayerCollector,
    ParameterCollector,
    ScalarBuffer,
    find_layers,
    rank_position,
    total_layers,
)
from megatron_gate.monitor.config import MonitorConfig
from megatron_gate.monitor.detectors import DetectorSuite, Event
from megatron_gate.monitor.guard import (
    RECORD_COLUMNS,
    GuardVerdict,
    StepGuard,
    _host_number,
    skip_event,
)
from megatron_gate.monitor.guarded_step import bucketed_step
from megatron_gate.monitor.reduction import PackLayout, reduce_packed
from megatron_gate.monitor.sink_detectors import SinkDetectors
from megatron_gate.monitor.sinks import (
    ConsoleSink,
    JsonlSink,
    PrometheusSink,
    Sink,
    SinkGroup,
    TensorBoardSink,
    WandbSink,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class StabilityMonitor:
    """Collect, reduce, detect, act and write for one training run.

    Args:
        config: the `MonitorConfig`.
        models: the model chunks on this rank (Megatron: the list `get_model` returns).
        run_dir: directory of `stability.jsonl` (and TensorBoard files when the monitor owns
            the writer).
        run_name: name in the `run_start` record (default: the run_dir's name).
        writer_rank: the global rank that writes sinks.
        process_group: group of the one collective (default: the default group, i.e. TP, PP,
            DP and CP together).
        optimizer: anything with `param_groups`; `lr_backoff` scales its learning rates and the
            learning rate is read from it when not passed to `end_step`.
        on_rollback: called with a `RollbackRequest` (every rank) to reload the last good
            checkpoint; without it the request is only returned in the `Decision`.
        on_abort: called with the reason (every rank) before `StabilityAbort` is raised, to save.
        tensorboard_writer: an existing `SummaryWriter` (Megatron-LM's) to write into.
        extra_sinks: more `Sink`s for the writer rank (e.g. DeepSpeed's monitor).
        data_parallel_rank: this rank's replica index when Megatron's parallel state is not
            initialised (plain DDP/DeepSpeed: default the global rank).
        model_info: extra fields for the `run_start` record's `model`.
    """

    def __init__(
        self,
        config: MonitorConfig,
        *,
        models: Sequence[torch.nn.Module] | torch.nn.Module,
        run_dir: str | Path,
        run_name: str | None = None,
        writer_rank: int = 0,
        process_group: dist.ProcessGroup | None = None,
        optimizer: Any = None,
        on_rollback: Callable[[RollbackRequest], None] | None = None,
        on_abort: Callable[[str], None] | None = None,
        tensorboard_writer: Any = None,
        extra_sinks: Sequence[Sink] = (),
        data_parallel_rank: int | None = None,
        model_info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self.models = [models] if isinstance(models, torch.nn.Module) else list(models)
        self.run_dir = Path(run_dir)
        self.run_name = run_name or self.run_dir.name
        self.process_group = process_group
        self.optimizer = optimizer
        self.on_rollback = on_rollback
        self.on_abort = on_abort
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.is_writer = self.rank == writer_rank
        self.step: int | None = None
        self._warned: set[str] = set()
        self._closed = False
        self.last_records: list[dict[str, Any]] = []
        """The `step` records of the latest log step (every rank; for loops that log them)."""
        if not self.enabled:
            return
        self.device = _model_device(self.models)
        self._build_collectors(data_parallel_rank)
        self.guard = self._build_guard()
        self.skipped_steps = 0
        """Steps the guard skipped so far (read at log steps)."""
        self._lr_base: float | None = None
        self.layout = self._build_layout()
        self._build_decisions()
        self._layer_step: int | None = None
        self._grad_sumsq: torch.Tensor | None = None
        self._last_end: float | None = None
        self.sinks = SinkGroup(
            self._build_sinks(tensorboard_writer, extra_sinks) if self.is_writer else [],
            background=True,
        )
        self._write(
            {
                "kind": "run_start",
                "run": self.run_name,
                "time": time.time(),
                "config": config.to_dict(),
                "model": self._model_info(model_info),
            }
        )

    # ------------------------------------------------------------------ set-up
    def _build_collectors(self, data_parallel_rank: int | None) -> None:
        """The layer, parameter and scalar collectors and the update norm of this rank."""
        config = self.config
        self.position = rank_position(data_parallel_rank=data_parallel_rank)
        self.layers = find_layers(self.models)
        self.num_layers = total_layers(self.models, self.layers)
        self.layer_collector = LayerCollector(
            self.layers,
            num_layers=self.num_layers,
            probe_queries=config.probe_queries,
            position=self.position,
            keep_registered=config.layer_interval == 1,
        )
        self.parameters = ParameterCollector(
            self.models, self.layers, num_layers=self.num_layers, position=self.position
        )
        self.buffer = ScalarBuffer(
            config.log_interval,
            self.device,
            read_on_host=config.guard.reads_on_host(self.device.type),
        )
        self._rows = 0
        self.update_norm = self.parameters.update_norm(self.device)

    def _build_decisions(self) -> None:
        """The detectors, the action policy and the learning-rate back-off."""
        config = self.config
        self.detectors = DetectorSuite(config.detectors)
        self.sink_detectors = SinkDetectors(config.detectors)
        self.policy = ActionPolicy(
            rollback_skip_batches=config.rollback_skip_batches,
            max_rollbacks=config.max_rollbacks,
        )
        self.backoff = LearningRateBackoff(
            factor=config.lr_backoff_factor, steps=config.lr_backoff_steps
        )

    def _build_guard(self) -> StepGuard | None:
        self._pending: _PendingStep | None = None
        """A rejected step waiting for its recompute (`end_recompute`)."""
        self._attributions: dict[int, Attribution] = {}
        """What the recomputes found, by step, until the log step writes their events."""
        self._guard_rows = torch.full(
            (self.config.log_interval, len(RECORD_COLUMNS)), -math.inf,
            dtype=torch.float64, device=self.device,
        )  # fmt: skip
        if not self.config.guard.enabled:
            return None
        parameters, device = self.parameters, self.device

        def gradient_norm() -> torch.Tensor:
            # This rank's share of the gradients (each parameter counted on one rank): the
            # ranks' flags are combined by max, so every gradient is checked somewhere.
            return parameters.grad_sumsq(device).sum().sqrt()

        return StepGuard(
            self.config.guard,
            device=self.device,
            process_group=self.process_group,
            gradient_norm=gradient_norm,
        )

    def _build_layout(self) -> PackLayout:
        layout = PackLayout()
        scalars = len(schema.SCALARS)
        layout.add("scalars/sum", self.config.log_interval * scalars, "sum")
        layout.add("scalars/count", self.config.log_interval * scalars, "sum")
        layout.add("scalars/non_finite", self.config.log_interval, "max")
        self.layer_collector.add_slots(layout)
        layout.add("grad/sumsq", self.num_layers + 1, "sum")
        layout.add("update/sumsq", self.num_layers + 1, "sum")
        layout.add("update/present", 1, "max")
        layout.add("layers/present", 1, "max")
        layout.add("guard/rows", self.config.log_interval * len(RECORD_COLUMNS), "max")
        return layout

    def _build_sinks(self, tensorboard_writer: Any, extra: Sequence[Sink]) -> list[Sink]:
        sinks: list[Sink] = [JsonlSink(self.run_dir)]
        options = self.config.sinks
        builders: list[tuple[bool, str, Callable[[], Sink]]] = [
            (
                options.tensorboard,
                "tensorboard",
                lambda: TensorBoardSink(
                    log_dir=self.run_dir / "tensorboard", writer=tensorboard_writer
                ),
            ),
            (
                options.wandb,
                "wandb",
                lambda: WandbSink(
                    project=options.wandb_project, run_name=self.run_name, run_dir=self.run_dir
                ),
            ),
            (
                options.prometheus,
                "prometheus",
                lambda: PrometheusSink(host=options.prometheus_host, port=options.prometheus_port),
            ),
            (options.console, "console", ConsoleSink),
        ]
        for wanted, name, build in builders:
            if not wanted:
                continue
            try:
                sinks.append(build())
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                logger.warning(
                    "stability monitor: sink %r could not start (%s: %s); it is disabled.",
                    name,
                    type(error).__name__,
                    error,
                )
        return sinks + list(extra)

    def _model_info(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        gated = [
            number
            for number, layer in self.layers.items()
            if isinstance(getattr(layer.self_attention, "gate_observers", None), list)
        ]
        gate_config = next((self.layers[n].self_attention.gate_config for n in gated), None)
        info: dict[str, Any] = {
            "num_layers": self.num_layers,
            "gated_layers": gated,
            "granularity": getattr(gate_config, "granularity", None),
            "backend": getattr(gate_config, "backend", None),
            "parallel": _parallel_sizes(),
        }
        return {**info, **(extra or {})}

    # ------------------------------------------------------------------ cadence
    def is_log_step(self, step: int) -> bool:
        """Whether `end_step(step)` reads statistics to the host (one collective)."""
        return step % self.config.log_interval == 0

    def is_layer_step(self, step: int) -> bool:
        """Whether `step` collects per-layer statistics (hooks armed)."""
        return step % self.config.layer_interval == 0

    # ------------------------------------------------------------------ loop API
    def start_step(self, step: int, *, query_flags: torch.Tensor | None = None) -> bool:
        """Begin `step`: arm layer hooks on per-layer steps. Returns whether they are armed.

        `query_flags` `[b, s]` bool marks the queries of a type the data defines (the triggers
        of Bigram-Backcopy): the first-token share is then also reported for them and for the
        others (`first_token_share_flagged`, `..._unflagged`).
        """
        if not self.enabled:
            return False
        self.step = step
        try:
            if self.is_layer_step(step):
                self.layer_collector.query_flags = query_flags
                self.layer_collector.arm()
                self._layer_step = step
                return True
        except Exception as error:  # noqa: BLE001 - the monitor never stops training
            self._warn_once("start_step", error)
        return False

    def end_step(
        self,
        step: int,
        *,
        loss: torch.Tensor | float | None,
        grad_norm: torch.Tensor | float | None = None,
        learning_rate: float | None = None,
        loss_scale: torch.Tensor | float | None = None,
        tokens: int | None = None,
        recompute: bool = False,
    ) -> Decision:
        """Record `step` (after backward, before the optimizer step); decide on log steps.

        `loss` is this rank's loss (None on pipeline stages without one), `grad_norm` the
        global gradient norm when the loop has it, `tokens` the tokens the whole job
        processed in this step. Apply the returned decision with `step_optimizer` (it skips the
        update when `decision.skip_step` and applies the guard's `decision.accept` on the
        device); reload when `decision.rollback` (unless `on_rollback` did).

        `recompute=True` (a loop that can recompute the step and reads the guard's decision on
        the host anyway, see `decides_on_host`): a step the guard rejects is held open and
        returned with `decision.recompute`; report the recompute with `end_recompute`.
        """
        if not self.enabled:
            return Decision(step=step)
        self.step = step
        row = min(self._rows, self.buffer.rows - 1)
        offered = recompute and self.guard is not None and self.config.guard.recompute_rejected
        before = GuardSnapshot.take(self.guard) if offered else None
        verdict = self._guard_step(row, loss, grad_norm)
        inputs = _StepInputs(loss, grad_norm, learning_rate, loss_scale, tokens)
        if before is not None and verdict is not None and not bool(verdict.accept):
            self._hold(step, row, before, inputs)
            return Decision(step=step, recompute=True, accept=verdict.accept)
        return self._finish_step(step, verdict, inputs)

    def end_recompute(
        self,
        step: int,
        *,
        loss: torch.Tensor | float | None,
        grad_norm: torch.Tensor | float | None = None,
        samples: Sequence[int] | None = None,
    ) -> Decision:
        """Finish a step held by `end_step` with its recompute on the same batch.

        The guard tests the recompute against its statistics from before the step (every rank,
        one all_reduce): accepted, the fault was transient and `decision.accept` applies the
        recomputed update; rejected again, it is reproducible and the step is skipped. The
        guard's event says which, with the batch's `samples` where given."""
        if not self.enabled:
            return Decision(step=step)
        pending, self._pending = self._pending, None
        if pending is None or pending.step != step:
            self._warn_once("end_recompute", RuntimeError(f"step {step} was not held"))
            return self.end_step(step, loss=loss, grad_norm=grad_norm)
        pending.before.restore(self.guard)
        first = self._guard_rows[pending.row].clone()
        verdict = self._guard_step(pending.row, loss, grad_norm)
        if verdict is None:
            return self._finish_step(step, verdict, pending.inputs)
        accepted = bool(verdict.accept)
        read = verdict.read or (_host_number(loss), _host_number(grad_norm))
        samples_ = tuple(int(s) for s in samples) if samples is not None else None
        self._attributions[step] = Attribution(step, outcome(accepted), read, samples_)
        if accepted:  # the event shows the fault's values; the update is the recompute's
            self._guard_rows[pending.row] = first
        inputs = replace(pending.inputs, loss=loss, grad_norm=grad_norm)
        return self._finish_step(step, verdict, inputs)

    def decides_on_host(self) -> bool:
        """Whether `step_optimizer` reads the guard's decision on the host (CPU runs and
        `guard.skip_mode: host`): there a recompute of a rejected step adds no synchronisation."""
        return self.enabled and self.guard is not None and self.guard.on_host

    def _hold(self, step: int, row: int, before: GuardSnapshot, inputs: _StepInputs) -> None:
        """Keep a rejected step open for its recompute (the layer hooks record it afresh)."""
        self._pending = _PendingStep(step=step, row=row, before=before, inputs=inputs)
        if self._layer_step == step:
            self.layer_collector.disarm()
            self.layer_collector.arm()

    def _finish_step(
        self, step: int, verdict: GuardVerdict | None, inputs: _StepInputs
    ) -> Decision:
        """Record the step, decide on log steps, apply the back-off; the guard's verdict."""
        loss, grad_norm = inputs.loss, inputs.grad_norm
        learning_rate, loss_scale, tokens = inputs.learning_rate, inputs.loss_scale, inputs.tokens
        if verdict is not None and verdict.read is not None:  # read once: keep the numbers
            loss = verdict.read[0]
            grad_norm = verdict.read[1] if grad_norm is not None else None
        try:
            self._record(step, loss, grad_norm, learning_rate, loss_scale, tokens)
        except Exception as error:  # noqa: BLE001
            self._warn_once("record", error)
        decision = Decision(step=step)
        if self.is_log_step(step) or self._rows >= self.config.log_interval:
            decision = self._flush(step)
        try:
            self.backoff.apply(self.optimizer)
            decision = _with_scale(decision, self.backoff.scale)
            self.backoff.advance()
        except Exception as error:  # noqa: BLE001
            self._warn_once("after_step", error)
        if verdict is not None:
            decision = replace(decision, accept=verdict.accept)
        self._act(decision)
        return decision

    def step_optimizer(self, optimizer: Any, decision: Decision) -> bool:
        """Apply `decision` to a torch optimizer's step; returns whether the step ran.

        Host-known skips (`decision.skip_step`, a rollback) do not step at all; otherwise the
        step runs through `bucketed_step`, which keeps the old weights and optimizer state where
        the guard's `decision.accept` is False (on the device, no host read), and measures the
        update norm on the step before a per-layer step. With `guard.skip_mode` "host" (and
        "auto" for CPU tensors, where reading waits for nothing) the flag is read instead and a
        rejected step is not taken at all: no copies.
        """
        if decision.skip_step or decision.rollback is not None:
            return False
        if not self.enabled:
            optimizer.step()
            return True
        measuring = self.measures_update(decision.step)
        accept = decision.accept
        if accept is not None and self._skips_on_host(accept):
            if not bool(accept):
                if measuring:  # nothing was applied: the step's update is zero
                    self.update_norm.begin()
                    self.update_norm.finish(accept)
                return False
            accept = None
        if measuring:
            self.update_norm.begin()
        bucketed_step(
            optimizer,
            accept=accept,
            on_bucket=self.update_norm.add if measuring else None,
            bucket_bytes=self.config.guard.bucket_bytes,
        )
        if measuring:
            self.update_norm.finish(decision.accept)
        return True

    def _skips_on_host(self, accept: torch.Tensor) -> bool:
        return self.config.guard.reads_on_host(accept.device.type)

    def measures_update(self, step: int) -> bool:
        """Whether the update of `step` is measured (it is reported at the next layer step)."""
        return self.enabled and self.config.update_norm and self.is_layer_step(step + 1)

    def close(self, status: str = "completed") -> None:
        """Flush buffered steps (on `completed`), write `run_end`, close sinks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        try:
            self.layer_collector.remove()
            if status == "completed" and self._rows and self.step is not None:
                self._flush(self.step, act=False)
        except Exception as error:  # noqa: BLE001
            self._warn_once("close", error)
        self._write({"kind": "run_end", "step": self.step, "time": time.time(), "status": status})
        self.sinks.close()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Detector windows, counters, LR back-off (plain Python values; checkpoint it)."""
        if not self.enabled:
            return {"version": STATE_VERSION}
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "detectors": self.detectors.state_dict(),
            "sink_detectors": self.sink_detectors.state_dict(),
            "policy": self.policy.state_dict(),
            "lr_backoff": self.backoff.state_dict(),
            "guard": self.guard.state_dict() if self.guard is not None else {},
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (a resumed run keeps its history)."""
        if not self.enabled or not state:
            return
        if state.get("version") != STATE_VERSION:
            self._warn_once("load_state_dict", ValueError(f"state version {state.get('version')}"))
            return
        self.detectors.load_state_dict(state.get("detectors", {}))
        self.sink_detectors.load_state_dict(state.get("sink_detectors", {}))
        self.policy.load_state_dict(state.get("policy", {}))
        self.backoff.load_state_dict(state.get("lr_backoff", {}))
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    # ------------------------------------------------------------------ internals
    def _record(
        self,
        step: int,
        loss: Any,
        grad_norm: Any,
        learning_rate: float | None,
        loss_scale: Any,
        tokens: int | None,
    ) -> None:
        now = time.perf_counter()
        tokens_per_second = None
        if tokens is not None and self._last_end is not None and now > self._last_end:
            tokens_per_second = tokens / (now - self._last_end)
        self._last_end = now
        if learning_rate is None and self.optimizer is not None:
            groups = getattr(self.optimizer, "param_groups", None)
            if groups:
                learning_rate = self.backoff.base_of(float(groups[0]["lr"]))
        # The rate in force for this step's update: the scheduler's, times the back-off.
        self._lr_base = learning_rate
        if learning_rate is not None:
            learning_rate = learning_rate * self.backoff.scale
        if self._layer_step == step:
            self.layer_collector.disarm()
            self._grad_sumsq = self.parameters.grad_sumsq(self.device)
        scalars = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": learning_rate,
            "loss_scale": loss_scale,
            "tokens_per_second": tokens_per_second,
        }
        self.buffer.record(min(self._rows, self.buffer.rows - 1), step, scalars)
        self._rows = min(self._rows + 1, self.buffer.rows)

    def _guard_step(self, row: int, loss: Any, grad_norm: Any) -> GuardVerdict | None:
        """Run the guard (every rank, every step) and keep its verdict in the step buffer."""
        if self.guard is None:
            return None
        try:
            verdict = self.guard.check(loss=loss, grad_norm=grad_norm)
            self._guard_rows[row] = verdict.record
            return verdict
        except Exception as error:  # noqa: BLE001 - the monitor never stops training
            self._warn_once("guard", error)
            return None

    def _packed_row(self) -> torch.Tensor:
        values_, present, non_finite = self.buffer.merged()
        values: dict[str, torch.Tensor] = {
            "scalars/sum": values_,
            "scalars/count": present,
            "scalars/non_finite": non_finite,
            "guard/rows": self._guard_rows,
        }
        if self._layer_step is not None and self._layer_step == self.step:
            values.update(self.layer_collector.packed_values(self.device))
            values["layers/present"] = torch.ones(1)
            if self._grad_sumsq is not None:
                values["grad/sumsq"] = self._grad_sumsq
            if self.update_norm.update_sumsq is not None:
                values["update/sumsq"] = self.update_norm.update_sumsq
                values["update/present"] = torch.ones(1)
        return self.layout.pack(values, device=self.device)

    def _flush(self, step: int, *, act: bool = True) -> Decision:
        """Reduce the buffered steps (one collective), detect, decide, write."""
        try:
            row = self._packed_row()
        except Exception as error:  # noqa: BLE001 - still join the collective
            self._warn_once("pack", error)
            row = torch.full(
                (self.layout.width,), math.nan, dtype=torch.float64, device=self.device
            )
        reduced = reduce_packed(self.layout, row, self.process_group).tolist()
        decision = Decision(step=step)
        try:
            unpacked = self.layout.unpack(reduced)
            guard_events = self._guard_events(unpacked["guard/rows"])
            records = self._records(unpacked)
            self.last_records = records
            events: list[Event] = []
            for record in records:
                events += self.detectors.check(
                    record["step"], record["scalars"], record.get("layers")
                )
                events += self.sink_detectors.check(
                    record["step"], record.get("layers"), record.get("heads")
                )
            if act:
                skipped = frozenset(e.step for e in guard_events if e.action == "skip_step")
                decision, events = self.policy.decide(step, events, guard_skipped=skipped)
                if any(event.action == "lr_backoff" for event in events):
                    self.backoff.trigger()
                    self._record_backoff(records, step)
            events = guard_events + events
            now = time.time()
            self._write_many(
                [{**record, "time": now} for record in records]
                + [{"kind": "event", "time": now, **event.to_dict()} for event in events]
            )
        except Exception as error:  # noqa: BLE001
            self._warn_once("flush", error)
        finally:
            self.buffer.clear()
            self._guard_rows.fill_(-math.inf)
            self._rows = 0
            self._grad_sumsq = None
            self.update_norm.update_sumsq = None
        return decision

    def _guard_events(self, flat: list[float]) -> list[Event]:
        """One `guard` event per step the guard skipped, at its own step, with its values."""
        width = len(RECORD_COLUMNS)
        events = []
        for row, step in enumerate(self.buffer.steps):
            values = dict(zip(RECORD_COLUMNS, flat[row * width : (row + 1) * width], strict=True))
            if step is None or values["accepted"] != 0.0:
                continue  # accepted, or no verdict (-inf)
            event = skip_event(step, values, self.config.guard)
            attribution = self._attributions.pop(step, None)
            if attribution is not None:
                event = attributed_event(event, attribution)
            if attribution is None or attribution.outcome == REPRODUCIBLE:
                self.skipped_steps += 1
            events.append(event)
        return events

    def _record_backoff(self, records: list[dict[str, Any]], step: int) -> None:
        """The back-off triggered at `step` applies to `step`'s own update: record its rate."""
        if self._lr_base is None:
            return
        for record in records:
            if record["step"] == step:
                record["scalars"]["learning_rate"] = self._lr_base * self.backoff.scale

    def _records(self, values: dict[str, list[float]]) -> list[dict[str, Any]]:
        """`step` records of the buffered steps from the reduced values."""
        values = {**values, **self.layer_collector.unpack(values)}
        names = schema.SCALARS
        sums, counts = values["scalars/sum"], values["scalars/count"]
        records = []
        for row, step in enumerate(self.buffer.steps):
            if step is None:
                continue
            scalars: dict[str, float | None] = {}
            for column, name in enumerate(names):
                index = row * len(names) + column
                scalars[name] = sums[index] / counts[index] if counts[index] > 0 else None
            scalars["nan_or_inf"] = values["scalars/non_finite"][row]
            scalars["skipped_steps"] = float(self.skipped_steps)
            record: dict[str, Any] = {"kind": "step", "step": step, "scalars": scalars}
            if values["layers/present"][0] > 0 and step == self._layer_step:
                layers, histogram = self._layer_values(values)
                sink_layers, heads = self.layer_collector.sink_metrics(values)
                record["layers"] = {**layers, **sink_layers}
                record["heads"] = heads
                record["gate_histogram"] = histogram
                update = values["update/sumsq"]
                if values["update/present"][0] > 0:
                    scalars["update_norm"] = math.sqrt(sum(update))
                if scalars["grad_norm"] is None:
                    scalars["grad_norm"] = math.sqrt(sum(values["grad/sumsq"]))
            records.append(record)
        return records

    def _layer_values(
        self, values: dict[str, list[float]]
    ) -> tuple[dict[str, list[float | None]], list[list[float] | None]]:
        count = self.num_layers
        present = [values["residual/count"][i] > 0 for i in range(count)]

        def ratio(top: str, bottom: str, *, root: bool = False) -> list[float | None]:
            result: list[float | None] = []
            for numerator, denominator in zip(values[top], values[bottom], strict=True):
                value = numerator / denominator if denominator > 0 else None
                result.append(math.sqrt(value) if root and value is not None else value)
            return result

        def maximum(name: str) -> list[float | None]:
            return [v if v != -math.inf else None for v in values[name]]

        layers: dict[str, list[float | None]] = {}
        for kind in ACTIVATIONS:
            layers[f"max_abs_{kind}"] = maximum(f"{kind}/max")
            layers[f"rms_{kind}"] = ratio(f"{kind}/sumsq", f"{kind}/count", root=True)
        layers["gate_mean"] = ratio("gate/sum", "gate/count")
        layers["gate_sparsity"] = ratio("gate/below", "gate/count")
        layers["first_token_attention_share"] = ratio("probe/share_sum", "probe/share_count")
        layers["max_attention_logit"] = maximum("probe/max_logit")
        layers["grad_norm"] = [
            math.sqrt(v) if present[i] else None for i, v in enumerate(values["grad/sumsq"][:count])
        ]
        has_update = values["update/present"][0] > 0
        layers["update_norm"] = [
            math.sqrt(v) if has_update and present[i] else None
            for i, v in enumerate(values["update/sumsq"][:count])
        ]
        bins = schema.GATE_HISTOGRAM_BINS
        flat = values["gate/histogram"]
        histogram = [
            flat[i * bins : (i + 1) * bins] if values["gate/count"][i] > 0 else None
            for i in range(count)
        ]
        return {name: layers[name] for name in schema.LAYER_METRICS}, histogram

    def _act(self, decision: Decision) -> None:
        """Run the rollback and abort callbacks (every rank) for a decision."""
        if decision.abort:
            try:
                if self.on_abort is not None:
                    self.on_abort(decision.abort)
            finally:
                self.close("aborted")
            raise StabilityAbort(decision.abort)
        if decision.rollback is not None:
            # The parameters are about to be reloaded: a measured update is void.
            self.update_norm.discard()
            if self.on_rollback is not None:
                self.on_rollback(decision.rollback)

    def _write(self, record: dict[str, Any]) -> None:
        self._write_many([record])

    def _write_many(self, records: list[dict[str, Any]]) -> None:
        if self.enabled and self.is_writer:
            self.sinks.write_many(records)

    def _warn_once(self, where: str, error: BaseException) -> None:
        if where in self._warned:
            return
        self._warned.add(where)
        logger.warning(
            "stability monitor: %s failed (%s: %s); training continues, the monitor skips it.",
            where,
            type(error).__name__,
            error,
            exc_info=True,
        )


@dataclass(frozen=True)
class _StepInputs:
    """What the loop handed to `end_step` (kept while a rejected step is recomputed)."""

    loss: Any
    grad_norm: Any
    learning_rate: float | None
    loss_scale: Any
    tokens: int | None


@dataclass(frozen=True)
class _PendingStep:
    step: int
    row: int
    before: GuardSnapshot
    inputs: _StepInputs


def _with_scale(decision: Decision, scale: float) -> Decision:
    return decision if scale == decision.lr_scale else replace(decision, lr_scale=scale)


def _model_device(models: Sequence[torch.nn.Module]) -> torch.device:
    for model in models:
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def _parallel_sizes() -> dict[str, int]:
    sizes = {"world": dist.get_world_size() if dist.is_initialized() else 1}
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            sizes.update(
                tensor=ps.get_tensor_model_parallel_world_size(),
                pipeline=ps.get_pipeline_model_parallel_world_size(),
                data=ps.get_data_parallel_world_size(),
                context=ps.get_context_parallel_world_size(),
            )
    except ImportError:
        pass
    return sizes
