"""The run store: what the page receives equals what the monitor wrote (below downsampling sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_gate.dashboard.downsample import rounded
from megatron_gate.dashboard.store import HEATMAP_METRICS, RunStore, find_run_dirs, load_run
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line, write_run
from megatron_gate.monitor.schema import JSONL_NAME, SCALARS


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_view_equals_the_records(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=5, gated_layers=[2, 4], spike_steps=[40])
    path = write_run(tmp_path / "r", steps=60, run=run)
    steps = [r for r in _records(path) if r["kind"] == "step"]
    store = load_run(tmp_path / "r")
    view = store.view(points=1000, heatmap_buckets=1000)
    for metric in SCALARS:
        assert view["scalars"][metric]["x"] == [r["step"] for r in steps]
        assert view["scalars"][metric]["y"] == rounded(
            np.array([r["scalars"][metric] for r in steps])
        )
    for metric in HEATMAP_METRICS:
        z = view["heatmaps"][metric]["z"]  # [layers][steps]
        expected = [[r["layers"][metric][layer] for r in steps] for layer in range(5)]
        expected = [
            [None if v is None else rounded(np.float32([v]), digits=4)[0] for v in row]
            for row in expected
        ]
        assert z == expected
    assert view["heatmaps"]["gate_sparsity"]["z"][0] == [None] * 60  # layer 1 is not gated
    (event,) = view["events"]
    assert event["step"] == 40 and event["action"] == "lr_backoff"
    assert event["at"]["loss"] == view["scalars"]["loss"]["y"][39]
    summary = store.summary()
    assert summary["status"] == "completed" and summary["last_step"] == 60
    assert summary["gated_layers"] == [2, 4] and summary["num_layers"] == 5


def test_window_and_downsampling_bound_the_answer(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=3, spike_steps=[1234])
    write_run(tmp_path / "r", steps=5000, run=run)
    store = load_run(tmp_path / "r")
    full = store.view(points=200, heatmap_buckets=50)
    assert len(full["scalars"]["loss"]["x"]) <= 200
    assert len(full["heatmaps"]["max_abs_residual"]["x"]) <= 50
    assert (
        max(full["scalars"]["loss"]["y"]) == full["events"][0]["at"]["loss"]
    )  # the spike survives
    window = store.view(start=1000, end=1100, points=200, heatmap_buckets=50)
    assert window["scalars"]["loss"]["x"] == list(range(1000, 1101))  # full detail when zoomed in
    assert window["events"] == []


def test_a_run_that_goes_back_replaces_the_old_steps(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=2)
    path = tmp_path / "r" / JSONL_NAME
    path.parent.mkdir()
    lines = [to_line(run.run_start())] + [to_line(r) for r in run.records(1, 10)]
    # A rollback to step 6: the run logs steps 6.. again.
    lines += [to_line(r) for r in run.records(6, 8)]
    path.write_text("".join(lines))
    store = RunStore(tmp_path / "r")
    store.refresh()
    view = store.view()
    assert view["scalars"]["loss"]["x"] == list(range(1, 9))
    assert view["heatmaps"]["max_abs_residual"]["x"] == list(range(1, 9))


def test_growing_file_bumps_the_version(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=2)
    path = tmp_path / "r" / JSONL_NAME
    path.parent.mkdir()
    path.write_text(to_line(run.run_start()))
    store = RunStore(tmp_path / "r")
    assert store.refresh() == 1 and store.summary()["status"] == "running"
    version = store.version
    assert store.refresh() == 0 and store.version == version
    with open(path, "a") as f:
        f.write("".join(to_line(r) for r in run.records(1, 3)))
    assert store.refresh() == 3 and store.version == version + 1
    assert store.summary()["last_step"] == 3


def test_a_directory_of_runs_stands_for_its_runs(tmp_path: Path, two_runs: list[Path]) -> None:
    assert find_run_dirs([tmp_path / "runs"]) == two_runs
    empty = tmp_path / "not-started"
    empty.mkdir()
    assert find_run_dirs([empty, two_runs[0]]) == [empty, two_runs[0]]


def test_sparse_scalars_draw_only_their_logged_steps(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=2)
    path = tmp_path / "r" / JSONL_NAME
    path.parent.mkdir()
    lines = [to_line(run.run_start())]
    for step in range(1, 21):
        (record,) = run.step(step, with_layers=step % 5 == 0)
        if step % 5:
            record["scalars"]["update_norm"] = None  # the monitor measures it on layer steps only
        lines.append(to_line(record))
    path.write_text("".join(lines))
    view = load_run(tmp_path / "r").view()
    assert view["scalars"]["update_norm"]["x"] == [5, 10, 15, 20]
    assert None not in view["scalars"]["update_norm"]["y"]
    assert view["scalars"]["loss"]["x"] == list(range(1, 21))
    assert view["heatmaps"]["max_abs_residual"]["x"] == [5, 10, 15, 20]


def test_records_with_odd_field_types_do_not_break_the_store(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=2)
    path = tmp_path / "r" / JSONL_NAME
    path.parent.mkdir()
    start = run.run_start() | {"model": {"num_layers": "two"}}
    odd_steps = [
        {"schema": start["schema"], "kind": "step", "step": 1, "scalars": [1, 2]},
        {
            "schema": start["schema"],
            "kind": "step",
            "step": 2,
            "scalars": {"loss": "x"},
            "layers": [],
        },
        {"schema": start["schema"], "kind": "step", "step": 3, "layers": {"max_abs_residual": 5}},
    ]
    path.write_text("".join(to_line(r) for r in [start, *odd_steps, *run.records(4, 6)]))
    store = load_run(tmp_path / "r")
    view = store.view()
    assert view["scalars"]["loss"]["x"] == [4, 5, 6]  # steps 1-3 carry no usable loss
    assert store.summary()["num_layers"] == 2 and store.summary()["last_step"] == 6
    assert len(view["heatmaps"]["max_abs_residual"]["z"]) == 2


def test_attributed_events_carry_their_attribution(tmp_path: Path) -> None:
    run = SyntheticRun(name="r", num_layers=2)
    path = tmp_path / "r" / JSONL_NAME
    path.parent.mkdir()
    guard = {"schema": run.run_start()["schema"], "kind": "event", "detector": "guard",
             "severity": "critical", "metric": "loss", "value": None, "threshold": None,
             "layer": None, "message": "m"}  # fmt: skip
    events = [
        guard | {"step": 2, "action": "log", "attribution": "transient", "samples": [2]},
        guard | {"step": 3, "action": "skip_step", "attribution": "reproducible"},
        guard | {"step": 4, "action": "skip_step"},
        guard | {"step": 5, "action": "skip_step", "attribution": "<script>"},
    ]
    path.write_text("".join(to_line(r) for r in [run.run_start(), *run.records(1, 6), *events]))
    view = load_run(tmp_path / "r").view()
    marked = [(e["step"], e["attribution"]) for e in view["events"] if e["detector"] == "guard"]
    assert marked == [(2, "transient"), (3, "reproducible"), (4, None), (5, None)]
