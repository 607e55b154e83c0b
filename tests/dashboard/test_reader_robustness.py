"""The dashboard's reader on hostile input: nothing a JSONL line holds may drop a poll, blank the
page (strict JSON out) or crash `--export`; memory stays bounded by the documented limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_gate.cli import main
from megatron_gate.dashboard import reader
from megatron_gate.dashboard.reader import MAX_STEP, JsonlTail
from megatron_gate.dashboard.server import Dashboard
from megatron_gate.dashboard.store import RunStore, load_run
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line
from megatron_gate.monitor.schema import JSONL_NAME, SCHEMA

HEAD = f'{{"schema": "{SCHEMA}", '
HOSTILE_LINES = [
    HEAD + '"kind": "step", "step": 99999999999999999999999, "scalars": {"loss": 1}}',
    HEAD + '"kind": "step", "step": -3, "scalars": {}}',
    HEAD + '"kind": "step", "step": true, "scalars": {}}',
    HEAD + f'"kind": "step", "step": {MAX_STEP + 1}}}',
    "[" * 100_000,
    "{" * 50_000 + '"a":1',
    HEAD + '"kind": "event", "step": 5, "detector": NaN, "severity": Infinity, "value": NaN, '
    '"threshold": -Infinity, "layer": NaN, "message": NaN, "peak": NaN, "delay": 1e999}',
    HEAD + '"kind": "step", "step": 6, "scalars": {"loss": 1e999, "grad_norm": 1e400},'
    '"layers": {"max_abs_residual": [NaN, 1e999, "x", [1], {"a": 1}, 1e308]}}',
    HEAD + '"kind": "run_start", "model": {"num_layers": 1e999}, "time": NaN}',
    HEAD + '"kind": "step", "step": 7, "layers": {"max_abs_residual": [' + "0," * 9999 + "0]}}",
    HEAD + '"kind": "event", "step": 8, "detector": "x", "extra": {"deep": [[[1]]]}, '
    '"time": 10000000000000000000000000000000}',
]


def _good_run(path: Path) -> SyntheticRun:
    run = SyntheticRun(name="r", num_layers=3, spike_steps=[2])
    path.write_text(to_line(run.run_start()) + "".join(to_line(r) for r in run.records(1, 4)))
    return run


def test_hostile_lines_cost_only_themselves(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / JSONL_NAME
    run = _good_run(path)
    with open(path, "a") as f:
        f.write("\n".join(HOSTILE_LINES) + "\n")
        f.write("".join(to_line(r) for r in run.records(9, 12)))
    store = load_run(tmp_path / "r")
    summary = store.summary()
    assert summary["last_step"] == 12  # the good records after the bad ones arrived
    assert store.tail.skipped_total == 6  # 4 bad steps, 2 too deep; the rest are usable
    assert "nested too deeply" in store.tail.skipped
    view = Dashboard([store]).view()
    text = json.dumps(view, allow_nan=False)  # what /api/view sends: strict JSON
    assert "NaN" not in text and "Infinity" not in text
    (event,) = [e for e in view["runs"][0]["events"] if e["step"] == 5]
    assert event["value"] is None and event["details"]["peak"] is None
    assert view["runs"][0]["scalars"]["loss"]["x"][-1] == 12
    out = tmp_path / "report.html"
    assert main(["dashboard", str(tmp_path / "r"), "--export", str(out)]) == 0
    assert out.stat().st_size > 1_000_000


def test_an_over_long_line_is_skipped_without_being_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(reader, "CHUNK_BYTES", 700)
    path = tmp_path / JSONL_NAME
    run = _good_run(path)
    tail = JsonlTail(path)
    while not tail.poll() or not tail.caught_up:
        pass
    with open(path, "a") as f:
        f.write("x" * 5000)  # a runaway line, still being written
    for _ in range(10):
        tail.poll()
        assert len(tail._pending) <= 1000 + 700  # never held whole
    with open(path, "a") as f:
        f.write("x" * 3000 + "\n" + to_line(run.step(5)[0]))
    steps = []
    for _ in range(30):
        steps += [r["step"] for r in tail.poll()]
    assert steps == [5]
    assert tail.skipped == {"line longer than 1000 bytes": 1}


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["step", "time", "scalars", "layers", "model", "detector", "severity", "layer", "value",
     "message", "status", "kind", "gate_histogram"]
)  # fmt: skip
RECORDS = st.fixed_dictionaries(
    {"schema": st.just(SCHEMA), "kind": st.sampled_from(["run_start", "step", "event", "run_end"])},
    optional={"step": st.integers(min_value=-5, max_value=2**70) | JSON_VALUES},
).flatmap(
    lambda base: st.dictionaries(FIELDS, JSON_VALUES, max_size=5).map(lambda d: {**d, **base})
)


def _lines(records: list[dict], garbage: list[bytes]) -> bytes:
    out = b""
    for i, record in enumerate(records):
        out += json.dumps(record).encode() + b"\n"  # json.dumps writes NaN/Infinity literally
        if i < len(garbage):
            out += garbage[i] + b"\n"
    return out


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=st.lists(RECORDS, max_size=12), garbage=st.lists(st.binary(max_size=40), max_size=4))
def test_no_input_breaks_the_reader_or_the_page(tmp_path: Path, records, garbage) -> None:
    path = tmp_path / JSONL_NAME
    path.write_bytes(_lines(records, garbage))
    store = RunStore(tmp_path)
    store.refresh(final=True)
    view = Dashboard([store]).view(points=50, heatmap_buckets=20)
    json.dumps(view, allow_nan=False)  # strict JSON, whatever the records held
    usable = sum(1 for r in records if r["kind"] == "run_start" or (
        isinstance(r.get("step"), int) and not isinstance(r.get("step"), bool)
        and 0 <= r["step"] <= MAX_STEP))  # fmt: skip
    assert store.tail.records_read == usable
