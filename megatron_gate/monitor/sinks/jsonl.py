"""JSONL sink: `<run_dir>/stability.jsonl`, one schema record per line.

The lines of one log step are written with a single `os.write` on an `O_APPEND` descriptor, so
a crash leaves whole lines only (readers skip at most a torn last line, see `read_records`). A
write the machine refuses (a full disk, a read-only folder) raises `OutputError` naming the file
and the cause, after cutting a short write back to the last whole line
(`output_files.append_whole`); the monitor then disables the sink with one warning.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink
from megatron_gate.output_files import append_whole, open_for_append


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null (and keep the `nan_or_inf` flag for meaning)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def encode(record: dict[str, Any]) -> bytes:
    """One record as a JSON line carrying the schema version.

    Records are nearly always finite: one `dumps`, and the walk that writes NaN/Inf as null
    only when the text shows one (`NaN`/`Infinity` can appear nowhere else unquoted)."""
    text = json.dumps({"schema": schema.SCHEMA, **record})
    if "NaN" in text or "Infinity" in text:
        text = json.dumps({"schema": schema.SCHEMA, **_clean(record)}, allow_nan=False)
    return (text + "\n").encode()


class JsonlSink(Sink):
    """Appends records to `<run_dir>/stability.jsonl`."""

    name = "jsonl"
    inline = True  # one os.write per record: cheap, and never lost in a queue on a crash

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / schema.JSONL_NAME
        self._fd: int | None = open_for_append(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line (a single write)."""
        self.write_many([record])

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Append the lines of one log step with a single write."""
        if self._fd is not None:
            append_whole(self._fd, b"".join(encode(record) for record in records), path=self.path)

    def close(self) -> None:
        """fsync and close."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a stability JSONL file (a torn last line is skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / schema.JSONL_NAME
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
