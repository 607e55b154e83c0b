"""Tail a growing JSONL file: complete lines only, bad lines skipped and counted.

A writer may be in the middle of a line when we read, so a line without its trailing newline is
held back until the next poll (or, with `final=True`, counted as truncated). A line that is not a
JSON object with a known `kind` is skipped; a warning names the file, line and reason, and the
per-reason counts are kept for the page to show.

Limits keep memory bounded by the input's good part: a line longer than MAX_LINE_BYTES is
skipped without being held in memory, nesting deeper than Python's recursion limit is a bad
line, steps must be integers in [0, 2**53) (exact in the page's JavaScript numbers, and in
int64), and the literals `NaN` and `Infinity` (which Python's json accepts) are read as null.
Numbers that overflow to infinity (`1e999`) stay floats: the store sanitises every value it
sends on (a per-float parse hook would cost 40% more parse time on a large run).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_gate.monitor.schema import RECORD_KINDS, SCHEMA

log = logging.getLogger(__name__)

_SCHEMA_FAMILY = SCHEMA.rsplit("/", 1)[0] + "/"  # "megatron-gate.stability/"
_MAX_WARNINGS = 20  # per file: a corrupt file must not flood the console
CHUNK_BYTES = 16 << 20  # read a large file in pieces: its parsed records cost ~3x its size
MAX_LINE_BYTES = 4 << 20  # a step record of 1,000 layers with histograms is ~0.5 MB
MAX_STEP = 2**53 - 1  # the largest integer a JavaScript number holds exactly


class JsonlTail:
    """Incremental reader of one JSONL file; `poll()` returns the records added since the last call."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.skipped: Counter[str] = Counter()
        self.records_read = 0
        self._offset = 0
        self._line_number = 0
        self._pending = b""  # bytes of a line whose newline has not been written yet
        self._discarding = False  # inside an over-long line: drop bytes up to its newline
        self._file_id: tuple[int, int] | None = None
        self.caught_up = True  # False while a poll stopped at CHUNK_BYTES before the end

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def poll(self, *, final: bool = False) -> list[dict[str, Any]]:
        """Records appended since the last poll, at most ~CHUNK_BYTES of them (see `caught_up`).

        `final=True`: the run is over, so a last line without its newline counts as truncated.
        """
        lines = self._split(self._read_new_bytes())
        if final and self.caught_up and self._pending.strip():
            lines.append(self._pending)
            self._pending = b""
        records = list(self._parse(lines))
        self.records_read += len(records)
        return records

    def _split(self, data: bytes) -> list[bytes]:
        """Complete lines of `data` after what was pending; over-long lines are dropped."""
        if self._discarding:
            newline = data.find(b"\n")
            if newline < 0:
                return []
            data, self._discarding = data[newline + 1 :], False
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # b"" when the data ended with a newline
        if len(self._pending) > MAX_LINE_BYTES:
            self._pending, self._discarding = b"", True
            self._line_number += 1
            self._skip(f"line longer than {MAX_LINE_BYTES} bytes")
        return lines

    def _read_new_bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())
                file_id = (stat.st_dev, stat.st_ino)
                if file_id != self._file_id or stat.st_size < self._offset:
                    # A new file under the same name (rotated, or the run restarted): start over.
                    # Records already read stay; the store deduplicates steps.
                    if self._file_id is not None:
                        log.warning(
                            "%s was replaced or truncated; reading it from the start", self.path
                        )
                    self._file_id, self._offset, self._pending = file_id, 0, b""
                    self._discarding = False
                f.seek(self._offset)
                data = f.read(CHUNK_BYTES)
                self.caught_up = self._offset + len(data) >= stat.st_size
        except FileNotFoundError:
            self.caught_up = True
            return b""
        self._offset += len(data)
        return data

    def _parse(self, lines: list[bytes]) -> Iterator[dict[str, Any]]:
        for raw in lines:
            self._line_number += 1
            if not raw.strip():
                continue
            if len(raw) > MAX_LINE_BYTES:
                record, reason = None, f"line longer than {MAX_LINE_BYTES} bytes"
            else:
                record, reason = parse_record(raw)
            if record is None:
                self._skip(reason)
                continue
            yield record

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        total = self.skipped_total
        if total <= _MAX_WARNINGS:
            log.warning("%s line %d skipped: %s", self.path, self._line_number, reason)
        if total == _MAX_WARNINGS:
            log.warning("%s: further skipped lines are only counted", self.path)


def loads(raw: bytes | str) -> Any:
    """`json.loads`, with the non-standard literals NaN, Infinity and -Infinity read as None."""
    return json.loads(raw, parse_constant=lambda _name: None)


def parse_record(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """One JSONL line -> (record, "") or (None, reason it was skipped)."""
    try:
        record = loads(raw)
    except RecursionError:
        return None, "nested too deeply"
    except (ValueError, UnicodeDecodeError):
        return None, "not valid JSON (truncated or corrupt line)"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    schema = record.get("schema")
    if not isinstance(schema, str) or not schema.startswith(_SCHEMA_FAMILY):
        return None, f"unknown schema {_short(schema)} (expected {SCHEMA})"
    if record.get("kind") not in RECORD_KINDS:
        return None, f"unknown kind {_short(record.get('kind'))} (expected one of {RECORD_KINDS})"
    step = record.get("step")
    if record["kind"] != "run_start" and not _is_step(step):
        return None, f"{record['kind']} record without an integer 'step' in [0, {MAX_STEP}]"
    return record, ""


def _is_step(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_STEP


def _short(value: Any) -> str:
    """A value for a skip reason: reasons are counted by text, so they must stay few and short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
