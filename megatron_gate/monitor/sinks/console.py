"""Console sink: a compact per-layer table at steps with per-layer statistics, and events."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from megatron_gate.monitor.sinks.base import Sink

COLUMNS: tuple[tuple[str, str], ...] = (
    ("max_abs_residual", "max|h|"),
    ("rms_residual", "rms h"),
    ("max_abs_attention_output", "max|attn|"),
    ("max_abs_mlp_output", "max|mlp|"),
    ("gate_mean", "gate"),
    ("gate_sparsity", "sparse"),
    ("first_token_attention_share", "sink"),
    ("max_attention_logit", "logit"),
    ("grad_norm", "grad"),
    ("update_norm", "update"),
)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_table(record: dict[str, Any]) -> str:
    """The table of one `step` record with per-layer values."""
    scalars = record["scalars"]
    head = "  ".join(
        f"{name}={_cell(scalars.get(name))}"
        for name in ("loss", "grad_norm", "update_norm", "learning_rate", "tokens_per_second")
    )
    layers = record.get("layers") or {}
    count = max((len(values) for values in layers.values()), default=0)
    widths = [max(9, len(title)) for _, title in COLUMNS]
    lines = [f"[stability] step {record['step']}  {head}"]
    lines.append("layer " + " ".join(t.rjust(w) for (_, t), w in zip(COLUMNS, widths, strict=True)))
    for index in range(count):
        cells = [
            _cell((layers.get(metric) or [None] * count)[index]).rjust(width)
            for (metric, _), width in zip(COLUMNS, widths, strict=True)
        ]
        lines.append(f"{index + 1:>5} " + " ".join(cells))
    return "\n".join(lines)


class ConsoleSink(Sink):
    """Prints tables at per-layer steps and one line per event (not per-step scalars)."""

    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream

    def write(self, record: dict[str, Any]) -> None:
        """Print tables and events."""
        stream = self.stream or sys.stdout
        if record["kind"] == "step" and record.get("layers"):
            print(format_table(record), file=stream, flush=True)
        elif record["kind"] == "event":
            print(
                f"[stability] step {record['step']} {record['severity'].upper()} "
                f"{record['detector']} -> {record['action']}: {record['message']}",
                file=stream,
                flush=True,
            )
