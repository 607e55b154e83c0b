"""The JSONL tail: complete lines only, bad lines skipped and counted, never an exception."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from megatron_gate.dashboard.reader import JsonlTail
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line
from megatron_gate.monitor.schema import SCHEMA


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_half_written_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "stability.jsonl"
    run = SyntheticRun(num_layers=2)
    line = to_line(run.step(1)[0])
    tail = JsonlTail(path)
    assert tail.poll() == []  # no file yet: nothing, no error
    _append(path, to_line(run.run_start()) + line[:25])
    first = tail.poll()
    assert [r["kind"] for r in first] == ["run_start"]
    _append(path, line[25:])
    second = tail.poll()
    assert [r["step"] for r in second] == [1]
    assert second[0] == json.loads(line)
    assert tail.skipped_total == 0


def test_bad_lines_are_skipped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "stability.jsonl"
    good = [to_line(r) for r in SyntheticRun(num_layers=2).records(1, 3)]
    bad = [
        '{"schema": "megatron-gate.stability/1", "kind": "step", "ste\n',  # truncated
        "[1, 2, 3]\n",  # not an object
        json.dumps({"schema": "someone-else/1", "kind": "step", "step": 1}) + "\n",
        json.dumps({"schema": SCHEMA, "kind": "mystery", "step": 1}) + "\n",
        json.dumps({"schema": SCHEMA, "kind": "step", "step": "7"}) + "\n",
        "\xff\xfe garbage\n",
    ]
    path.write_text(good[0] + "".join(bad) + "".join(good[1:]) + '{"trunc')
    tail = JsonlTail(path)
    with caplog.at_level(logging.WARNING):
        records = tail.poll()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert tail.skipped_total == len(bad)
    assert "line 2 skipped" in caplog.text
    # The unterminated last line is held back while the writer may still finish it ...
    assert tail.poll() == []
    assert tail.skipped_total == len(bad)
    # ... and counted as truncated once the run is read for good.
    assert tail.poll(final=True) == []
    assert tail.skipped_total == len(bad) + 1
    assert tail.skipped["not valid JSON (truncated or corrupt line)"] == 3


def test_replaced_file_is_read_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "stability.jsonl"
    run = SyntheticRun(num_layers=2)
    path.write_text("".join(to_line(r) for r in run.records(1, 5)))
    tail = JsonlTail(path)
    assert len(tail.poll()) == 5
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(to_line(run.step(6)[0]))
    os.replace(replacement, path)  # a new inode under the same name
    assert [r["step"] for r in tail.poll()] == [6]


def test_large_file_is_read_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_gate.dashboard import reader
    from megatron_gate.dashboard.store import load_run

    run = SyntheticRun(name="r", num_layers=3, spike_steps=[7])
    path = tmp_path / "r" / "stability.jsonl"
    path.parent.mkdir()
    lines = [to_line(run.run_start())] + [to_line(r) for r in run.records(1, 30)]
    path.write_text("".join(lines) + '{"torn')
    monkeypatch.setattr(reader, "CHUNK_BYTES", 700)  # smaller than one step line
    tail = JsonlTail(path)
    assert len(tail.poll()) <= 1 and not tail.caught_up
    store = load_run(path.parent)
    assert store.summary()["last_step"] == 30 and store.summary()["events"] == 1
    assert store.tail.skipped_total == 1  # the torn last line, counted once the end is reached
    assert store.view()["scalars"]["loss"]["x"] == list(range(1, 31))
