"""The events table's rows: one per episode (open/update/close records folded), most severe
first, raw records kept; on hand-written records and on a real monitor's output."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_gate.dashboard.store import load_run
from megatron_gate.dashboard.synthetic import to_line
from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.jsonl import read_records


def _event(step: int, phase: str, **fields: object) -> dict:
    episode = {"kind": "spike", "phase": phase, "start_step": 10, "end_step": None, "peak": 5.0,
               "duration": 1, "delay": 0, "signals": ["loss"]}  # fmt: skip
    episode.update({k: fields.pop(k) for k in list(fields) if k in episode})
    return {"schema": schema.SCHEMA, "kind": "event", "step": step, "time": 0.0,
            "detector": "loss_spike", "severity": "warning", "metric": "loss", "value": 5.0,
            "threshold": 2.0, "layer": None, "action": "alert", "message": f"{phase} {step}",
            "episode": episode, **fields}  # fmt: skip


def _store(tmp_path: Path, records: list[dict]):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start = {"schema": schema.SCHEMA, "kind": "run_start", "run": "r", "time": 0.0,
             "model": {"num_layers": 2}}  # fmt: skip
    step = {"schema": schema.SCHEMA, "kind": "step", "step": 30, "time": 0.0,
            "scalars": {"loss": 1.0}}  # fmt: skip
    (run_dir / schema.JSONL_NAME).write_text("".join(map(to_line, [start, step, *records])))
    return load_run(run_dir)


def test_an_episode_is_one_row_in_words(tmp_path: Path) -> None:
    records = [
        _event(10, "open"),
        _event(
            11,
            "update",
            action="skip_step",
            severity="critical",
            peak=9.0,
            duration=2,
            signals=["loss", "grad_norm"],
        ),  # fmt: skip
        _event(13, "close", action="log", kind="bump", peak=9.0, duration=3, end_step=12),
        _event(
            20,
            "open",
            start_step=19,
            detector="guard",
            action="skip_step",
            kind="non_finite",
            peak=None,
            end_step=19,
        ),  # fmt: skip
        _event(25, "open", start_step=25, severity="info", peak=3.0),  # still open
    ]
    episodes = _store(tmp_path, records).view()["episodes"]
    # most severe first: critical, warning (the guard), info
    assert [(e["detector"], e["start_step"]) for e in episodes] == [
        ("loss_spike", 10), ("guard", 19), ("loss_spike", 25)]  # fmt: skip
    bump = episodes[0]
    assert bump["severity"] == "critical"  # the most severe of its records
    assert (bump["kind"], bump["duration"], bump["finished"], bump["end_step"]) == ("bump", 3,
                                                                                   True, 12)  # fmt: skip
    assert (bump["peak"], bump["threshold"]) == (9.0, 2.0)
    assert bump["actions"] == ["alert", "skip_step"]  # the close record's "log" is no action
    assert bump["signals"] == ["loss", "grad_norm"]
    assert [json.loads(raw)["step"] for raw in bump["records"]] == [10, 11, 13]
    assert episodes[2]["finished"] is False
    guard = episodes[1]
    assert (guard["kind"], guard["peak"], guard["finished"]) == (
        "non_finite",
        None,
        True,
    )  # shown as NaN/Inf


def test_real_monitor_output_has_one_row_per_opened_episode(real_run: Path) -> None:
    events = [r for r in read_records(real_run) if r["kind"] == "event"]
    episodes = load_run(real_run).view()["episodes"]
    assert len(episodes) == sum(map(schema.opens_episode, events)) > 0
    assert sum(len(e["records"]) for e in episodes) == len(events)
    ranks = [schema.SEVERITIES.index(e["severity"]) for e in episodes]
    assert ranks == sorted(ranks, reverse=True)  # most severe first
    for episode in episodes:
        kinds = {json.loads(raw)["episode"]["kind"] for raw in episode["records"]}
        assert episode["kind"] in kinds
