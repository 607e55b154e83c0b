"""The sink interface and the fan-out that disables a failing sink after one warning."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


class Sink:
    """Does nothing; subclasses override `write` (one schema record) and `close`."""

    name = "sink"
    inline = False
    """Write on the caller's thread even in a background `SinkGroup` (cheap, must not be lost)."""

    def write(self, record: dict[str, Any]) -> None:
        """Take one record (`record["kind"]` is one of `schema.RECORD_KINDS`)."""

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Take the records of one log step, in order (override to write them at once)."""
        for record in records:
            self.write(record)

    def flush(self) -> None:
        """Push buffered output out (writers flush on their own schedule and at close)."""

    def close(self) -> None:
        """Release files, threads and connections."""


class SinkGroup(Sink):
    """Fans records out to several sinks; the first error of a sink warns and disables it.

    With `background=True` the sinks run on one daemon thread fed by a queue, so that slow
    writers (TensorBoard's protobufs, a W&B upload) never hold the training step; `close()`
    drains the queue first. Sinks marked `inline` (JSONL: one `os.write` per record) are
    still written on the caller's thread, so a crash cannot lose queued records there.
    """

    name = "group"

    def __init__(self, sinks: Iterable[Sink], *, background: bool = False) -> None:
        self.sinks = list(sinks)
        self.disabled: dict[str, str] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if background and any(not sink.inline for sink in self.sinks):
            self._queue = queue.Queue()
            self._thread = threading.Thread(
                target=self._drain, name="stability-monitor-sinks", daemon=True
            )
            self._thread.start()

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            method, args = self._queue.get()
            try:
                self._call_now(method, *args, inline=False)
            finally:
                self._queue.task_done()
            if method == "close":
                return

    def wait(self) -> None:
        """Block until the background thread has written everything queued so far."""
        if self._queue is not None:
            self._queue.join()

    def _call(self, method: str, *args: Any) -> None:
        if self._queue is not None:
            self._call_now(method, *args, inline=True)
            self._queue.put((method, args))
            if method == "close" and self._thread is not None:
                self._thread.join()
                self._queue = None
                self._thread = None
            return
        self._call_now(method, *args)

    def _call_now(self, method: str, *args: Any, inline: bool | None = None) -> None:
        """Call `method` on the live sinks (only those with `sink.inline == inline` if given)."""
        with self._lock:
            sinks = [s for s in self.sinks if inline is None or s.inline == inline]
        for sink in sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as error:  # noqa: BLE001 - a sink must never stop training
                with self._lock:
                    if sink in self.sinks:
                        self.sinks.remove(sink)
                    self.disabled[sink.name] = f"{type(error).__name__}: {error}"
                logger.warning(
                    "stability monitor: sink %r failed in %s (%s: %s); it is disabled for the "
                    "rest of the run.",
                    sink.name,
                    method,
                    type(error).__name__,
                    error,
                )

    def write(self, record: dict[str, Any]) -> None:
        """Send a record to every live sink."""
        self._call("write", record)

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Send the records of one log step to every live sink (one queue item)."""
        if records:
            self._call("write_many", records)

    def flush(self) -> None:
        """Flush every live sink."""
        self._call("flush")

    def close(self) -> None:
        """Close every live sink."""
        self._call("close")
