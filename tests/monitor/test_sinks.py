"""Sinks: JSONL lines, TensorBoard tags, the console table (Prometheus, W&B: their own files)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks import (
    ConsoleSink,
    JsonlSink,
    SinkGroup,
    TensorBoardSink,
    read_records,
)

STEP = {
    "kind": "step",
    "step": 7,
    "time": 1.0,
    "scalars": {"loss": 2.5, "grad_norm": float("inf"), "learning_rate": 1e-3},
    "layers": {"max_abs_residual": [3.0, None], "gate_mean": [0.4, 0.6]},
}
EVENT = {
    "kind": "event",
    "step": 7,
    "time": 1.0,
    "detector": "loss_spike",
    "severity": "warning",
    "metric": "loss",
    "value": 2.5,
    "threshold": 1.0,
    "layer": None,
    "action": "alert",
    "message": "loss 2.5 jumped",
}


def test_jsonl_whole_lines_and_torn_tail(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.write(STEP)
    sink.write(EVENT)
    sink.close()
    with open(tmp_path / schema.JSONL_NAME, "a") as handle:
        handle.write('{"kind": "step", "ste')  # a crash in the middle of someone else's write
    lines = (tmp_path / schema.JSONL_NAME).read_text().splitlines()
    assert json.loads(lines[0])["scalars"]["grad_norm"] is None  # inf -> null, valid JSON
    records = read_records(tmp_path)
    assert [r["kind"] for r in records] == ["step", "event"]
    assert records[0]["schema"] == schema.SCHEMA


def test_tensorboard_tags(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(log_dir=tmp_path)
    sink.write(STEP)
    sink.write(EVENT)
    sink.close()
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {
        "stability/loss",
        "stability/learning_rate",
        "stability/layer_01/max_abs_residual",
        "stability/layer_02/gate_mean",
        "stability/events/loss_spike",
    } <= tags
    assert "stability/layer_02/max_abs_residual" not in tags  # None is not written
    assert accumulator.Scalars("stability/loss")[0].step == 7


def test_fast_tensorboard_checksum_equals_tensorboards(tmp_path: Path) -> None:
    """The `crc32c` checksum gives TensorBoard's own bytes: its reader verifies every record."""
    import os

    pytest.importorskip("crc32c")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.summary.writer import record_writer

    from megatron_gate.monitor.sinks.tensorboard import use_fast_checksum

    assert use_fast_checksum() and use_fast_checksum()  # applies once, idempotent
    fast = record_writer.masked_crc32c
    pure = fast.__wrapped__
    for size in (0, 1, 7, 8, 9, 1000, 5000):
        data = os.urandom(size)
        assert fast(data) == pure(data), size
    sink = TensorBoardSink(log_dir=tmp_path)
    sink.write(STEP)
    sink.close()
    (events,) = tmp_path.glob("events.out.tfevents.*")
    # the loader recomputes each record's checksum with the pure-Python function
    loaded = list(EventFileLoader(str(events)).Load())
    assert any(value.tag == "stability/loss" for event in loaded for value in event.summary.value)


def test_console_table_and_group() -> None:
    stream = io.StringIO()
    group = SinkGroup([ConsoleSink(stream)])
    group.write(STEP)
    group.write(EVENT)
    text = stream.getvalue()
    assert "step 7" in text and "loss=2.5" in text
    assert "    1 " in text and "    2 " in text  # one row per layer
    assert "WARNING loss_spike -> alert: loss 2.5 jumped" in text


def test_background_group_keeps_jsonl_inline(tmp_path: Path) -> None:
    import threading

    from megatron_gate.monitor.sinks import Sink

    release = threading.Event()

    class SlowSink(Sink):
        name = "slow"

        def __init__(self) -> None:
            self.records: list[dict] = []

        def write(self, record: dict) -> None:
            release.wait(timeout=10)
            self.records.append(record)

    class FailingSink(Sink):
        name = "failing"

        def write(self, record: dict) -> None:
            raise RuntimeError("boom")

    slow = SlowSink()
    group = SinkGroup([JsonlSink(tmp_path), slow, FailingSink()], background=True)
    group.write(STEP)
    group.write(EVENT)
    # The slow sink still holds the thread, the JSONL lines are already on disk.
    assert [r["kind"] for r in read_records(tmp_path)] == ["step", "event"]
    assert slow.records == []
    release.set()
    group.wait()
    assert [r["kind"] for r in slow.records] == ["step", "event"]
    assert set(group.disabled) == {"failing"}
    group.close()


def test_tensorboard_counts_attributed_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guard = {**EVENT, "detector": "guard", "action": "log"}
    sink = TensorBoardSink(log_dir=tmp_path)
    sink.write({**guard, "step": 3, "attribution": "transient"})
    sink.write({**guard, "step": 5, "attribution": "reproducible", "action": "skip_step"})
    sink.write({**guard, "step": 9, "attribution": "transient"})
    sink.write({**guard, "step": 11})  # a guard skip without a recompute: not counted
    sink.close()
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    transient = accumulator.Scalars(schema.attribution_tag("transient"))
    reproducible = accumulator.Scalars(schema.attribution_tag("reproducible"))
    assert [(s.step, s.value) for s in transient] == [(3, 1.0), (9, 2.0)]
    assert [(s.step, s.value) for s in reproducible] == [(5, 1.0)]
