"""Weights & Biases sink (optional): logs `stability/...` keys into the active or a new run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink


class WandbSink(Sink):
    """Logs step scalars, per-layer values and events; starts a run when none is active."""

    name = "wandb"

    def __init__(self, *, project: str, run_name: str, run_dir: str | Path) -> None:
        import wandb  # optional dependency: ImportError says what is missing

        self.wandb = wandb
        self._owned = wandb.run is None
        if self._owned:
            wandb.init(project=project, name=run_name, dir=str(run_dir))

    def write(self, record: dict[str, Any]) -> None:
        """Log a step's values or an event."""
        kind, step = record["kind"], record.get("step")
        data: dict[str, Any] = {}
        if kind == "step":
            for name, value in record["scalars"].items():
                if value is not None:
                    data[schema.tensorboard_tag(name)] = value
            for name, values in (record.get("layers") or {}).items():
                for index, value in enumerate(values):
                    if value is not None:
                        data[schema.tensorboard_tag(name, index + 1)] = value
        elif kind == "event":
            data[schema.tensorboard_tag(f"events/{record['detector']}")] = record["value"]
            if record["action"] in ("alert", "abort", "rollback") and self.wandb.run is not None:
                self.wandb.run.alert(title=record["detector"], text=record["message"])
        if data:
            self.wandb.log(data, step=step)

    def close(self) -> None:
        """Finish the run when the sink started it."""
        if self._owned:
            self.wandb.finish()
