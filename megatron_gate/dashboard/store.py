"""One run's monitor records as growing columns, and the downsampled view the page asks for.

Every value that leaves the store is strict JSON: numbers go through `rounded` or `_finite`
(non-finite -> null), text fields through `_text`, so a bad record can cost its own chart
points but never the page.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_gate.dashboard.downsample import bucket_max, minmax_series, rounded
from megatron_gate.dashboard.episodes import episode_rows
from megatron_gate.dashboard.reader import JsonlTail
from megatron_gate.monitor.schema import JSONL_NAME, SCALARS

# Per-layer metrics kept at full resolution for the heatmaps (the others stay in the JSONL:
# 128 layers x 100,000 steps x 4 bytes = 51 MB per metric).
HEATMAP_METRICS: tuple[str, ...] = (
    "max_abs_residual",
    "first_token_attention_share",
    "gate_sparsity",
)
# Scalars an event marker is drawn on, at the event's step.
MARKED_SCALARS: tuple[str, ...] = ("loss", "grad_norm", "update_norm")
MAX_EVENTS = 2000  # the newest events sent to the page; the count says how many there are
MAX_STORED_EVENTS = 100_000  # the newest events kept in memory
MAX_LAYERS = 4096  # a larger layer count in a record is treated as corrupt
STALE_MIN_SECONDS = 60.0  # a running run is stale after max(this, STALE_INTERVALS x its pace)
STALE_INTERVALS = 10
# Event fields the table has columns for; any other field is shown under "details".
EVENT_FIELDS = ("step", "time", "detector", "severity", "metric", "value", "threshold", "layer")
_MAX_TEXT_CHARS = 500
MAX_SIGNALS = 16
MAX_RAW_CHARS = 4000  # an event's raw record as the table shows it on a click


class _Column:
    """An append-only array that grows by doubling; `values` is a view of the filled part."""

    def __init__(self, dtype: np.dtype | type, width: int | None = None) -> None:
        self._shape_tail = () if width is None else (width,)
        self._data = np.empty((1024, *self._shape_tail), dtype=dtype)
        self._size = 0

    @property
    def values(self) -> np.ndarray:
        return self._data[: self._size]

    def extend(self, rows: np.ndarray) -> None:
        need = self._size + len(rows)
        if need > len(self._data):
            grown = np.empty((max(need, 2 * len(self._data)), *self._shape_tail), self._data.dtype)
            grown[: self._size] = self.values
            self._data = grown
        self._data[self._size : need] = rows
        self._size = need

    def truncate(self, size: int) -> None:
        self._size = min(self._size, size)


@dataclass
class _Batch:
    """Records of one poll, sorted into columns before they touch numpy."""

    steps: list[int] = field(default_factory=list)
    scalars: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in SCALARS})
    layer_steps: list[int] = field(default_factory=list)
    layers: dict[str, list[list[float]]] = field(
        default_factory=lambda: {m: [] for m in HEATMAP_METRICS}
    )

    def clear(self) -> None:
        for column in (self.steps, self.layer_steps, *self.scalars.values(), *self.layers.values()):
            column.clear()


def _float(value: Any) -> float:
    """A number from a record, NaN for anything else (strings, lists, ints beyond float)."""
    if not isinstance(value, (int, float)):
        return float("nan")
    try:
        return float(value)
    except OverflowError:
        return float("nan")


def _finite(value: Any) -> float | None:
    number = _float(value)
    return number if math.isfinite(number) else None


def _model(run_start: dict[str, Any]) -> dict[str, Any]:
    """The `model` part of a run_start record, with `num_layers` an int (0 when unusable)."""
    model = run_start.get("model")
    model = dict(model) if isinstance(model, dict) else {}
    layers = model.get("num_layers")
    model["num_layers"] = layers if isinstance(layers, int) and 0 < layers <= MAX_LAYERS else 0
    return model


def _layer_row(values: Any, num_layers: int) -> list[float]:
    """A per-layer list (null for layers without the metric) as exactly `num_layers` floats."""
    row = [_float(v) for v in values[:num_layers]] if isinstance(values, list) else []
    return row + [float("nan")] * (num_layers - len(row))


class RunStore:
    """Everything the page shows about one run directory, updated by `refresh()`."""

    def __init__(
        self,
        run_dir: Path | str,
        *,
        name: str | None = None,
        stale_after: float = STALE_MIN_SECONDS,
    ) -> None:
        """`stale_after`: seconds without a record before a running run is marked stale (at
        least; a slow run gets STALE_INTERVALS times its own pace)."""
        self.run_dir = Path(run_dir)
        self.stale_min_seconds = stale_after
        self.name = name or self.run_dir.name
        self.tail = JsonlTail(self.run_dir / JSONL_NAME)
        self.start: dict[str, Any] = {}
        self.end: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.events_total = 0
        self.version = 0  # bumped whenever records arrive; the page refetches when it changes
        self.num_layers = 0
        self._lock = threading.Lock()
        self._steps = _Column(np.int64)
        self._scalars = {m: _Column(np.float64) for m in SCALARS}
        self._layer_steps = _Column(np.int64)
        self._layers: dict[str, _Column] = {}
        self._first_time: float | None = None  # of the records read; the run's pace and age
        self._last_time: float | None = None
        self._timed_records = 0

    def refresh(self, *, final: bool = False) -> int:
        """Read the JSONL's new lines (in chunks); returns how many records arrived."""
        arrived = 0
        while True:
            records = self.tail.poll(final=final)
            if records:
                with self._lock:
                    self._ingest(records)
                    self.version += 1
                arrived += len(records)
            if self.tail.caught_up:
                break
        return arrived

    def _ingest(self, records: Iterable[dict[str, Any]]) -> None:
        batch = _Batch()
        for record in records:
            self._note_time(record.get("time"))
            kind = record["kind"]
            if kind == "step":
                self._add_step(batch, record)
            elif kind == "run_start":
                self.start = record
                self.end = None
                self.num_layers = self.num_layers or _model(record).get("num_layers", 0)
            elif kind == "run_end":
                self.end = record
            else:  # "event", and any kind a newer monitor adds: shown as an event
                self.events.append(record)
                self.events_total += 1
        if len(self.events) > MAX_STORED_EVENTS:
            del self.events[: len(self.events) - MAX_STORED_EVENTS]
        self._flush(batch)

    def _note_time(self, value: Any) -> None:
        when = _finite(value)
        if when is None:
            return
        self._first_time = when if self._first_time is None else min(self._first_time, when)
        self._last_time = when if self._last_time is None else max(self._last_time, when)
        self._timed_records += 1

    def _add_step(self, batch: _Batch, record: dict[str, Any]) -> None:
        step = record["step"]
        scalars = record.get("scalars")
        scalars = scalars if isinstance(scalars, dict) else {}
        layers = record.get("layers")
        layers = layers if isinstance(layers, dict) else {}
        if layers and not self.num_layers:
            widths = (len(v) for v in layers.values() if isinstance(v, list))
            self.num_layers = min(max(widths, default=0), MAX_LAYERS)
        last = batch.steps[-1] if batch.steps else self._last_step()
        if last is not None and step <= last:
            # The run went back (a rollback or a restart from a checkpoint): the new records
            # replace the old ones from this step on.
            self._flush(batch)
            self._truncate_from(step)
            batch.clear()
        batch.steps.append(step)
        for metric in SCALARS:
            batch.scalars[metric].append(_float(scalars.get(metric)))
        if layers and self.num_layers:
            batch.layer_steps.append(step)
            for metric in HEATMAP_METRICS:
                batch.layers[metric].append(_layer_row(layers.get(metric), self.num_layers))

    def _flush(self, batch: _Batch) -> None:
        if batch.steps:
            self._steps.extend(np.asarray(batch.steps, dtype=np.int64))
            for metric, values in batch.scalars.items():
                self._scalars[metric].extend(np.asarray(values, dtype=np.float64))
        if batch.layer_steps:
            self._layer_steps.extend(np.asarray(batch.layer_steps, dtype=np.int64))
            for metric, rows in batch.layers.items():
                column = self._layers.setdefault(metric, _Column(np.float32, self.num_layers))
                column.extend(np.asarray(rows, dtype=np.float32).reshape(-1, self.num_layers))

    def _last_step(self) -> int | None:
        steps = self._steps.values
        return int(steps[-1]) if len(steps) else None

    def _truncate_from(self, step: int) -> None:
        keep = int(np.searchsorted(self._steps.values, step, side="left"))
        for column in (self._steps, *self._scalars.values()):
            column.truncate(keep)
        keep = int(np.searchsorted(self._layer_steps.values, step, side="left"))
        for column in (self._layer_steps, *self._layers.values()):
            column.truncate(keep)

    def summary(self, *, now: float | None = None) -> dict[str, Any]:
        """Small per-run facts for the status poll and the page's header (ages are to `now`)."""
        now = time.time() if now is None else now
        with self._lock:
            steps = self._steps.values
            model = _model(self.start)
            status = (self.end or {}).get("status", "running" if self.start else "waiting")
            age = None if self._last_time is None else max(0.0, now - self._last_time)
            return {
                "name": self.name,
                "version": self.version,
                "num_layers": self.num_layers,
                "gated_layers": _layer_numbers(model.get("gated_layers")),
                "granularity": _text(model.get("granularity")),
                "first_step": int(steps[0]) if len(steps) else None,
                "last_step": int(steps[-1]) if len(steps) else None,
                "steps_logged": len(steps),
                "events": self.events_total,
                "status": status if isinstance(status, str) else "unknown",
                "last_record_age": age,
                "stale_after": self._stale_after(),
                "stale": status == "running" and age is not None and age > self._stale_after(),
                "latest": {m: self._latest(m) for m in ("loss", "grad_norm")},
                "skipped_lines": self.tail.skipped_total,
                "skipped_reasons": dict(self.tail.skipped),
            }

    def _stale_after(self) -> float:
        """Seconds without a record after which a running run counts as stale."""
        if self._timed_records < 2 or self._first_time is None or self._last_time is None:
            return self.stale_min_seconds
        pace = (self._last_time - self._first_time) / (self._timed_records - 1)
        return max(self.stale_min_seconds, STALE_INTERVALS * pace)

    def _latest(self, metric: str) -> float | None:
        """The last logged (non-NaN) value of a scalar."""
        values = self._scalars[metric].values
        logged = np.flatnonzero(~np.isnan(values))
        return rounded(values[logged[-1:]])[0] if len(logged) else None

    def view(
        self,
        *,
        start: float | None = None,
        end: float | None = None,
        points: int = 1000,
        heatmap_buckets: int = 400,
    ) -> dict[str, Any]:
        """Steps in [start, end], downsampled to about `points` line points and `heatmap_buckets` columns."""
        with self._lock:
            lo, hi = _index_range(self._steps.values, start, end)
            steps = self._steps.values[lo:hi]
            scalars = {}
            for metric in SCALARS:
                values = self._scalars[metric].values[lo:hi]
                logged = ~np.isnan(values)  # e.g. update norms exist on per-layer steps only
                if not logged.any():
                    continue
                x, y = minmax_series(steps[logged], values[logged], points)
                scalars[metric] = {"x": x.tolist(), "y": rounded(y)}
            lo, hi = _index_range(self._layer_steps.values, start, end)
            heatmaps = {}
            for metric, column in self._layers.items():
                matrix = column.values[lo:hi]
                if not len(matrix) or np.isnan(matrix).all():
                    continue
                x, z = bucket_max(self._layer_steps.values[lo:hi], matrix, heatmap_buckets)
                heatmaps[metric] = {
                    "x": x.tolist(),
                    "z": [rounded(row, digits=4) for row in z.T],  # [layers][buckets]
                }
            in_range = [e for e in self.events if _within(e["step"], start, end)]
            shown = in_range[-MAX_EVENTS:]
            events = [_event_view(e, self._steps.values, self._scalars) for e in shown]
        return {
            "name": self.name,
            "scalars": scalars,
            "heatmaps": heatmaps,
            "events": events,
            "episodes": episode_rows(events, [_raw_text(e) for e in shown]),
            "events_in_range": len(in_range),
        }

    def recent_events(self, count: int) -> list[dict[str, Any]]:
        """The newest `count` events, newest last, as the page's table shows them."""
        with self._lock:
            return [_event_view(e, self._steps.values, self._scalars) for e in self.events[-count:]]


def _index_range(steps: np.ndarray, start: float | None, end: float | None) -> tuple[int, int]:
    lo = 0 if start is None else int(np.searchsorted(steps, start, side="left"))
    hi = len(steps) if end is None else int(np.searchsorted(steps, end, side="right"))
    return lo, hi


def _within(step: int, start: float | None, end: float | None) -> bool:
    return (start is None or step >= start) and (end is None or step <= end)


def _event_view(
    event: dict[str, Any], steps: np.ndarray, scalars: dict[str, _Column]
) -> dict[str, Any]:
    """An event's fields plus the marked scalars' values at its step (where its marker sits)."""
    view = {k: _text(event.get(k)) for k in ("detector", "severity", "metric")} | {
        "step": event["step"],
        "time": _finite(event.get("time")),
        "value": _finite(event.get("value")),
        "threshold": _finite(event.get("threshold")),
        "layer": _layer_number(event.get("layer")),
        "action": _text(event.get("action", "log")),
        "message": _text(event.get("message", "")),
        "details": _details(event),
    }
    if event.get("kind") != "event":
        view["kind"] = _text(event.get("kind"))
    index = int(np.searchsorted(steps, event["step"], side="right")) - 1
    view["at"] = {
        metric: (rounded(scalars[metric].values[index : index + 1])[0] if index >= 0 else None)
        for metric in MARKED_SCALARS
    }
    for key in ("value", "threshold"):
        if view[key] is not None:
            view[key] = rounded(np.array([view[key]]))[0]
    return view


def _raw_text(event: dict[str, Any]) -> str:
    """The record as written (indented JSON, cut at MAX_RAW_CHARS): one click away on the page.
    Non-finite numbers become null, as the monitor's JSONL sink writes them."""
    strict = json.loads(json.dumps(event, default=str), parse_constant=lambda _constant: None)
    text = json.dumps(strict, indent=1)
    return text if len(text) <= MAX_RAW_CHARS else text[: MAX_RAW_CHARS - 3] + "..."


def _text(value: Any) -> str | None:
    """A text field as the page shows it: strings (shortened), anything else as compact JSON."""
    if value is None:
        return None
    if not isinstance(value, str):
        value = json.dumps(value, separators=(",", ":"))  # NaN/Infinity only inside a string
    return value if len(value) <= _MAX_TEXT_CHARS else value[: _MAX_TEXT_CHARS - 3] + "..."


def _layer_number(value: Any) -> int | None:
    """A 1-based layer number, or None when the value is not one."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_LAYERS
    return value if ok else None


def _layer_numbers(values: Any) -> list[int] | None:
    if not isinstance(values, list):
        return None
    return [n for n in map(_layer_number, values[:MAX_LAYERS]) if n is not None]


def _details(event: dict[str, Any]) -> dict[str, Any]:
    """The event's fields beyond the table's columns: its episode's fields (kind, phase,
    start_step, end_step, peak, duration, delay, signals), flattened, and a newer monitor's
    extras."""
    known = {*EVENT_FIELDS, "schema", "kind", "action", "message", "episode"}
    fields = {key: value for key, value in event.items() if key not in known}
    episode = event.get("episode")
    if isinstance(episode, dict):
        fields.update(episode)
    details: dict[str, Any] = {}
    for key, value in fields.items():
        if key == "signals" and isinstance(value, list):
            details["signals"] = [_text(signal) for signal in value[:MAX_SIGNALS]]
            continue
        if isinstance(value, float):
            value = rounded(np.array([value]))[0]
        elif not isinstance(value, (int, bool)) and value is not None:
            value = _text(value)
        details[_text(key)] = value
    return details


def load_run(run_dir: Path | str, *, name: str | None = None, **options: Any) -> RunStore:
    """A store holding everything written so far (a last unterminated line counts as truncated)."""
    store = RunStore(run_dir, name=name, **options)
    store.refresh(final=True)
    return store


def find_run_dirs(paths: Iterable[Path | str]) -> list[Path]:
    """Run directories from the command line: each path itself, or its sub-directories holding runs.

    A path that holds no JSONL itself but has sub-directories that do (e.g. a demo's output with
    `baseline/` and `gated/`) stands for those. A path without any JSONL yet is kept: the run may
    not have started writing.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        children = sorted(p.parent for p in path.glob(f"*/{JSONL_NAME}"))
        if not (path / JSONL_NAME).exists() and children:
            found.extend(children)
        else:
            found.append(path)
    return found
