"""`--export report.html`: the dashboard as one self-contained file (no server, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_gate.dashboard.page import render_page
from megatron_gate.dashboard.server import Dashboard
from megatron_gate.dashboard.store import RunStore
from megatron_gate.output_files import atomic_write_text

EXPORT_POINTS = 2000  # line points per series; the export cannot ask the server for more on zoom
EXPORT_HEATMAP_BUCKETS = 600


def export_html(stores: Sequence[RunStore], path: Path | str) -> Path:
    """Write the page with every run's downsampled data inlined; returns the path written."""
    dashboard = Dashboard(stores)
    data = dashboard.view(points=EXPORT_POINTS, heatmap_buckets=EXPORT_HEATMAP_BUCKETS)
    # Whole or not at all: a failed export never leaves half a file or harms an earlier one.
    return atomic_write_text(path, render_page(data=data))
