"""The dashboard on real monitor output: a tiny gated Megatron GPT trained with StabilityMonitor."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_gate.dashboard.downsample import rounded
from megatron_gate.dashboard.server import Dashboard
from megatron_gate.dashboard.store import load_run
from megatron_gate.monitor.sinks.jsonl import read_records


def test_dashboard_reads_what_the_monitor_writes(real_run: Path) -> None:
    records = read_records(real_run)
    steps = [r for r in records if r["kind"] == "step"]
    layer_steps = [r for r in steps if r.get("layers")]
    events = [r for r in records if r["kind"] == "event"]
    assert steps and layer_steps and events

    store = load_run(real_run)
    summary = store.summary()
    assert summary["skipped_lines"] == 0 and summary["status"] == "completed"
    assert summary["num_layers"] == 2 and summary["last_step"] == steps[-1]["step"]
    assert summary["latest"]["loss"] == rounded(np.array([steps[-1]["scalars"]["loss"]]))[0]
    assert not summary["stale"]  # completed runs are never stale
    view = Dashboard([store]).view(points=1000, heatmap_buckets=1000)["runs"][0]
    loss = view["scalars"]["loss"]
    assert loss["x"] == [r["step"] for r in steps]
    assert loss["y"] == rounded(np.array([r["scalars"]["loss"] for r in steps], dtype=float))
    for metric in ("max_abs_residual", "first_token_attention_share", "gate_sparsity"):
        heatmap = view["heatmaps"][metric]
        assert heatmap["x"] == [r["step"] for r in layer_steps]
        expected = [[r["layers"][metric][layer] for r in layer_steps] for layer in range(2)]
        expected = [rounded(np.array(row, dtype=np.float32), digits=4) for row in expected]
        assert heatmap["z"] == expected
    assert [(e["step"], e["layer"], e["detector"]) for e in view["events"]] == [
        (e["step"], e["layer"], e["detector"]) for e in events
    ]
