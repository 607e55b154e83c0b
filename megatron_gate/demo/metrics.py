"""The demo's own stability logging, written in the monitor's schema (`megatron_gate.monitor.schema`).

    recorder = StabilityRecorder(model, run_dir=..., run_name="gated", model_info={...})
    with recorder.observe(step):          # hooks on only for logged steps
        loss = forward_backward(...)
    recorder.record_step(step, scalars={"loss": ..., "grad_norm": ...})
    recorder.close("completed")

Per-layer metrics come from forward hooks: the residual stream after each `TransformerLayer`
(max |h|, rms), the attention probabilities (`attention_dropout` input: first-token share) and
scores (`scale_mask_softmax` input: max logit) of Megatron's local `DotProductAttention`, and the
gate logits via `GatedSelfAttention.gate_observers`. Values are reduced over the tensor-parallel
group (heads are sharded); only the first rank writes. Fused TE attention exposes no probabilities:
those metrics are then null.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gate.monitor import schema


class SpikeDetector:
    """A value above `factor` x the median of the last `window` values is a spike."""

    def __init__(self, *, metric: str, factor: float, window: int = 20) -> None:
        self.metric = metric
        self.factor = factor
        self.history: deque[float] = deque(maxlen=window)

    def check(self, value: float) -> float | None:
        """The threshold that `value` exceeded, or None; `value` then joins the history."""
        threshold = None
        if len(self.history) == self.history.maxlen:
            threshold = self.factor * statistics.median(self.history)
        if not torch.isfinite(torch.tensor(value)):
            return threshold if threshold is not None else float("inf")
        self.history.append(value)
        return threshold if threshold is not None and value > threshold else None


class _LayerProbe:
    """Per-layer accumulators filled by forward hooks on one logged step."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.values: dict[str, list[list[float]]] = {
            name: [[] for _ in range(self.num_layers)] for name in schema.LAYER_METRICS
        }

    def add(self, metric: str, layer: int, value: torch.Tensor | float) -> None:
        self.values[metric][layer].append(float(value))


def _layer_index(module: torch.nn.Module) -> int:
    return int(module.layer_number) - 1


class StabilityRecorder:
    """Collects loss, grad norm and per-layer metrics; writes JSONL and TensorBoard in the schema."""

    # Reduction across TP ranks (and across the accumulated micro-batches) per metric.
    _REDUCE_MAX = ("max_abs_residual", "max_attention_logit")
    _REDUCE_MEAN = (
        "rms_residual",
        "gate_mean",
        "gate_sparsity",
        "first_token_attention_share",
    )

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        run_dir: Path,
        run_name: str,
        model_info: dict[str, Any],
        config: dict[str, Any],
        log_interval: int = 10,
        tp_group: Any = None,
        write: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.log_interval = log_interval
        self.tp_group = tp_group
        self.write = write
        layers = list(model.decoder.layers)
        self.num_layers = len(layers)
        self.probe = _LayerProbe(self.num_layers)
        self._active = False
        self._hooks = self._install_hooks(layers)
        self.detectors = (
            SpikeDetector(metric="loss", factor=1.15),
            SpikeDetector(metric="grad_norm", factor=4.0),
        )
        self.spikes: dict[str, int] = {d.metric: 0 for d in self.detectors}
        self._jsonl = None
        self._tensorboard = None
        if write:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / schema.JSONL_NAME, "a", encoding="utf-8")  # noqa: SIM115
            self._tensorboard = _tensorboard_writer(self.run_dir / "tensorboard")
            self._emit(
                {"kind": "run_start", "run": run_name, "config": config, "model": model_info}
            )

    # ------------------------------------------------------------------ hooks
    def _install_hooks(self, layers: list[torch.nn.Module]) -> list[Any]:
        hooks = []
        for layer in layers:
            index = _layer_index(layer)
            hooks.append(layer.register_forward_hook(self._residual_hook(index)))
            attention = layer.self_attention
            core = attention.core_attention
            if hasattr(core, "attention_dropout"):
                hooks.append(core.attention_dropout.register_forward_hook(self._probs_hook(index)))
            if hasattr(core, "scale_mask_softmax"):
                hooks.append(
                    core.scale_mask_softmax.register_forward_hook(self._scores_hook(index))
                )
            if hasattr(attention, "gate_observers"):
                attention.gate_observers.append(self._gate_observer(index))
        return hooks

    def _residual_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            if self._active:
                hidden = (output[0] if isinstance(output, tuple) else output).detach().float()
                self.probe.add("max_abs_residual", index, hidden.abs().max())
                self.probe.add("rms_residual", index, hidden.pow(2).mean().sqrt())

        return hook

    def _probs_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, inputs: Any, _output: Any) -> None:
            if self._active:
                # [b, np, sq, sk]: share of each query's attention on key 0; query 0 can only
                # attend to itself, so it is left out.
                probs = inputs[0].detach().float()
                self.probe.add("first_token_attention_share", index, probs[:, :, 1:, 0].mean())

        return hook

    def _scores_hook(self, index: int) -> Any:
        def hook(_module: torch.nn.Module, inputs: Any, _output: Any) -> None:
            if self._active:
                # [b, np, sq, sk] scaled scores; masked (future) keys do not count.
                scores, mask = inputs[0].detach().float(), inputs[1]
                if mask is not None:
                    scores = scores.masked_fill(mask.bool(), float("-inf"))
                self.probe.add("max_attention_logit", index, scores.max())

        return hook

    def _gate_observer(self, index: int) -> Any:
        def observe(_module: torch.nn.Module, gate_logits: torch.Tensor) -> None:
            if self._active:
                gate = torch.sigmoid(gate_logits.float())
                self.probe.add("gate_mean", index, gate.mean())
                sparse = (gate < schema.GATE_SPARSITY_THRESHOLD).float().mean()
                self.probe.add("gate_sparsity", index, sparse)

        return observe

    # ------------------------------------------------------------------ steps
    def is_logged(self, step: int) -> bool:
        return step == 1 or step % self.log_interval == 0

    @contextlib.contextmanager
    def observe(self, step: int) -> Iterator[None]:
        """Turn the hooks on for this step's forward passes when `step` is a logged step."""
        self._active = self.is_logged(step)
        self.probe.reset()
        try:
            yield
        finally:
            self._active = False

    def _reduced_layers(self) -> dict[str, list[float | None]] | None:
        layers: dict[str, list[float | None]] = {}
        for metric, per_layer in self.probe.values.items():
            if not any(per_layer):
                continue
            reduce_max = metric in self._REDUCE_MAX
            local = [
                (max(v) if reduce_max else sum(v) / len(v)) if v else float("nan")
                for v in per_layer
            ]
            values = torch.tensor(local, dtype=torch.float64)
            if self.tp_group is not None and dist.get_world_size(self.tp_group) > 1:
                op = dist.ReduceOp.MAX if reduce_max else dist.ReduceOp.SUM
                dist.all_reduce(values, op=op, group=self.tp_group)
                if not reduce_max:
                    values /= dist.get_world_size(self.tp_group)
            layers[metric] = [None if v != v else float(v) for v in values.tolist()]
        return layers or None

    def record_step(self, step: int, *, scalars: dict[str, float]) -> list[dict[str, Any]]:
        """Write the step record (per-layer metrics on logged steps) and any spike events."""
        layers = self._reduced_layers() if self.is_logged(step) else None
        events = []
        for detector in self.detectors:
            value = scalars.get(detector.metric)
            if value is None:
                continue
            threshold = detector.check(value)
            if threshold is not None:
                self.spikes[detector.metric] += 1
                events.append(
                    {
                        "kind": "event",
                        "step": step,
                        "detector": f"{detector.metric}_spike",
                        "severity": "warning",
                        "metric": detector.metric,
                        "value": value,
                        "threshold": threshold,
                        "layer": None,
                        "action": "log",
                        "message": f"{detector.metric} {value:.4g} > {threshold:.4g} "
                        f"({detector.factor}x the median of the last {len(detector.history)})",
                    }
                )
        record: dict[str, Any] = {"kind": "step", "step": step, "scalars": scalars}
        if layers is not None:
            record["layers"] = layers
        self._emit(record)
        for event in events:
            self._emit(event)
        self._write_tensorboard(step, scalars, layers)
        return events

    def record_validation(self, step: int, loss: float) -> None:
        """Validation loss: a step record whose only scalar is `validation_loss`."""
        self._emit({"kind": "step", "step": step, "scalars": {"validation_loss": loss}})
        if self._tensorboard is not None:
            self._tensorboard.add_scalar(schema.tensorboard_tag("validation_loss"), loss, step)

    def _write_tensorboard(
        self, step: int, scalars: dict[str, float], layers: dict[str, list[float | None]] | None
    ) -> None:
        if self._tensorboard is None:
            return
        for name, value in scalars.items():
            self._tensorboard.add_scalar(schema.tensorboard_tag(name), value, step)
        for metric, values in (layers or {}).items():
            for index, value in enumerate(values):
                if value is not None:
                    tag = schema.tensorboard_tag(metric, layer=index + 1)
                    self._tensorboard.add_scalar(tag, value, step)

    def _emit(self, record: dict[str, Any]) -> None:
        if self._jsonl is None:
            return
        line = {"schema": schema.SCHEMA, **record, "time": time.time()}
        self._jsonl.write(json.dumps(line, allow_nan=True) + "\n")
        # One flushed line per record: an interrupted run leaves whole lines only.
        self._jsonl.flush()

    def close(self, status: str, *, step: int) -> None:
        """Write `run_end`, flush everything and remove the hooks (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._jsonl is not None:
            self._emit({"kind": "run_end", "step": step, "status": status})
            self._jsonl.close()
            self._jsonl = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None


def _tensorboard_writer(path: Path) -> Any:
    """A TensorBoard `SummaryWriter`, or None when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional; the JSONL holds everything
        return None
    os.makedirs(path, exist_ok=True)
    return SummaryWriter(log_dir=str(path), flush_secs=10)
