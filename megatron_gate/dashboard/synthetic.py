"""Synthetic monitor output that follows `megatron_gate.monitor.schema` exactly.

For the dashboard's tests and scale benchmark, and to try the page without training anything:
a loss that falls with noise and spikes at chosen steps (each spike logged as an event with an
action), per-layer residual maxima that grow with depth, first-token attention shares, and gate
statistics on the gated layers only (null elsewhere, as the monitor writes them).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_gate.monitor.schema import (
    GATE_HISTOGRAM_BINS,
    JSONL_NAME,
    LAYER_METRICS,
    SCHEMA,
)

_GATE_METRICS = ("gate_mean", "gate_sparsity")


class SyntheticRun:
    """Generates the records of one run, step by step (`records(first, last)`)."""

    def __init__(
        self,
        *,
        name: str = "synthetic",
        num_layers: int = 4,
        gated_layers: Sequence[int] | None = None,
        spike_steps: Sequence[int] = (),
        seed: int = 0,
        digits: int = 4,
        layer_events: bool = False,
    ) -> None:
        """`layer_events`: a spike also raises a massive-activation event at the deepest layer."""
        self.name = name
        self.num_layers = num_layers
        self.gated_layers = (
            list(range(1, num_layers + 1)) if gated_layers is None else list(gated_layers)
        )
        self.spike_steps = set(spike_steps)
        self.digits = digits
        self.layer_events = layer_events
        self._rng = np.random.default_rng(seed)
        depth = np.arange(1, num_layers + 1) / num_layers
        self._residual_scale = 5.0 + 40.0 * depth**2  # deeper layers carry larger activations
        self._gated = np.isin(np.arange(1, num_layers + 1), self.gated_layers)

    def run_start(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": "run_start",
            "run": self.name,
            "time": time.time(),
            "config": {"source": "megatron_gate.dashboard.synthetic"},
            "model": {
                "num_layers": self.num_layers,
                "gated_layers": self.gated_layers,
                "granularity": "headwise" if self.gated_layers else None,
                "backend": "local",
                "tensor_model_parallel_size": 1,
                "pipeline_model_parallel_size": 1,
            },
        }

    def run_end(self, step: int, status: str = "completed") -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": "run_end",
            "step": step,
            "time": time.time(),
            "status": status,
        }

    def step(self, step: int, *, with_layers: bool = True) -> list[dict[str, Any]]:
        """The `step` record for `step`, followed by its event when it is a spike step."""
        spike = step in self.spike_steps
        noise = self._rng.normal(0.0, 0.02, size=3)
        loss = 3.0 + 7.0 * math.exp(-step / 2000.0) + noise[0]
        grad_norm = 1.0 + 0.5 * math.exp(-step / 500.0) + abs(noise[1])
        update_norm = 0.01 * grad_norm * (1.0 + noise[2])
        if spike:
            loss, grad_norm, update_norm = loss * 3.0, grad_norm * 20.0, update_norm * 15.0
        scalars = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "learning_rate": 3e-3 * min(1.0, step / 100.0),
            "loss_scale": 1.0,
            "tokens_per_second": 12000.0 + 500.0 * noise[0],
            "nan_or_inf": 0.0,
            "skipped_steps": 0.0,
        }
        record: dict[str, Any] = {
            "schema": SCHEMA,
            "kind": "step",
            "step": step,
            "time": time.time(),
            "scalars": {k: self._round(v) for k, v in scalars.items()},
        }
        if with_layers:
            record["layers"], record["gate_histogram"] = self._layers(spike)
        records = [record]
        if spike:
            records.append(self._spike_event(step, loss))
            if self.layer_events and with_layers:
                records.append(self._layer_event(step, record["layers"]["max_abs_residual"]))
        return records

    def records(self, first: int, last: int) -> Iterator[dict[str, Any]]:
        for step in range(first, last + 1):
            yield from self.step(step)

    def _layers(self, spike: bool) -> tuple[dict[str, list[float | None]], list[list[int] | None]]:
        n = self.num_layers
        jitter = self._rng.random((len(LAYER_METRICS), n))
        residual = self._residual_scale * (1.0 + 0.2 * jitter[0]) * (8.0 if spike else 1.0)
        values = {
            "max_abs_residual": residual,
            "rms_residual": residual / 20.0,
            "max_abs_attention_output": 2.0 + jitter[1],
            "rms_attention_output": 0.3 + 0.1 * jitter[2],
            "max_abs_mlp_output": 3.0 + jitter[3],
            "rms_mlp_output": 0.4 + 0.1 * jitter[4],
            "gate_mean": 0.2 + 0.1 * jitter[5],
            "gate_sparsity": 0.5 + 0.3 * jitter[6],
            "first_token_attention_share": 0.2
            + 0.6 * (1 - self._gated) * jitter[7]
            + 0.05 * jitter[8],
            "max_attention_logit": 5.0 + 10.0 * jitter[9],
            "grad_norm": 0.1 + 0.1 * jitter[10],
            "update_norm": 0.001 + 0.001 * jitter[11],
        }
        layers = {}
        for metric in LAYER_METRICS:
            row = self._round_array(values[metric])
            if metric in _GATE_METRICS:
                row = [v if gated else None for v, gated in zip(row, self._gated, strict=True)]
            layers[metric] = row
        counts = self._rng.integers(0, 1000, size=(n, GATE_HISTOGRAM_BINS)).tolist()
        histogram = [c if gated else None for c, gated in zip(counts, self._gated, strict=True)]
        return layers, histogram

    def _spike_event(self, step: int, loss: float) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "kind": "event",
            "step": step,
            "time": time.time(),
            "detector": "loss_spike",
            "severity": "warning",
            "metric": "loss",
            "value": self._round(loss),
            "threshold": self._round(loss / 2.0),
            "layer": None,
            "action": "lr_backoff",
            "message": f"loss {loss:.3f} is a 6-sigma spike over the last 128 steps",
        }

    def _layer_event(self, step: int, residual: list[float]) -> dict[str, Any]:
        layer = self.num_layers
        return {
            "schema": SCHEMA,
            "kind": "event",
            "step": step,
            "time": time.time(),
            "detector": "massive_activation",
            "severity": "warning",
            "metric": "max_abs_residual",
            "value": residual[layer - 1],
            "threshold": 100.0,
            "layer": layer,
            "action": "log",
            "message": f"layer {layer} max |h| {residual[layer - 1]:.4g} is over 10x its median",
        }

    def _round(self, value: float) -> float:
        return float(f"{value:.{self.digits}g}")

    def _round_array(self, values: np.ndarray) -> list[float]:
        scale = 10.0 ** (self.digits - 1 - np.floor(np.log10(np.abs(values) + 1e-30)))
        return (np.round(values * scale) / scale).tolist()


def to_line(record: dict[str, Any]) -> str:
    """One JSONL line, newline included."""
    return json.dumps(record, separators=(",", ":")) + "\n"


def write_run(
    run_dir: Path | str,
    *,
    steps: int,
    run: SyntheticRun | None = None,
    finished: bool = True,
) -> Path:
    """Write a whole synthetic run (steps 1..`steps`) to `run_dir/stability.jsonl`; returns its path."""
    run = run or SyntheticRun(name=Path(run_dir).name)
    path = Path(run_dir) / JSONL_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(to_line(run.run_start()))
        for record in run.records(1, steps):
            f.write(to_line(record))
        if finished:
            f.write(to_line(run.run_end(steps)))
    return path
