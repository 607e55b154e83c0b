"""TensorBoard sink: scalars under `stability/` (the writer Megatron-LM uses, or our own)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink


class TensorBoardSink(Sink):
    """Writes `step` records as scalars and `event` records as `stability/events/<detector>`."""

    name = "tensorboard"

    def __init__(self, *, log_dir: str | Path | None = None, writer: Any = None) -> None:
        if writer is None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
            self._owned = True
        else:
            self._owned = False
        self.writer = writer

    def write(self, record: dict[str, Any]) -> None:
        """Scalars of steps and events."""
        kind, step = record["kind"], record.get("step")
        if kind == "step":
            for name, value in record["scalars"].items():
                if value is not None:
                    self.writer.add_scalar(schema.tensorboard_tag(name), value, step)
            for name, values in (record.get("layers") or {}).items():
                for index, value in enumerate(values):
                    if value is not None:
                        self.writer.add_scalar(schema.tensorboard_tag(name, index + 1), value, step)
        elif kind == "event":
            tag = schema.tensorboard_tag(f"events/{record['detector']}")
            self.writer.add_scalar(tag, record["value"], step)

    def flush(self) -> None:
        """Flush the writer."""
        self.writer.flush()

    def close(self) -> None:
        """Close the writer when the sink created it."""
        if self._owned:
            self.writer.close()
        else:
            self.writer.flush()
