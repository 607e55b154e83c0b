"""`--export report.html`: the dashboard as one self-contained file (no server, no network)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from megatron_gate.dashboard.page import render_page
from megatron_gate.dashboard.server import Dashboard
from megatron_gate.dashboard.store import RunStore

EXPORT_POINTS = 2000  # line points per series; the export cannot ask the server for more on zoom
EXPORT_HEATMAP_BUCKETS = 600


def export_html(stores: Sequence[RunStore], path: Path | str) -> Path:
    """Write the page with every run's downsampled data inlined; returns the path written."""
    dashboard = Dashboard(stores)
    data = dashboard.view(points=EXPORT_POINTS, heatmap_buckets=EXPORT_HEATMAP_BUCKETS)
    html = render_page(data=data)
    path = Path(path)
    # Write beside the target and rename, so a failed export never leaves half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
