"""Prometheus exporter (optional): a tiny stdlib HTTP server serving the latest gauges.

`GET /metrics` returns the text exposition format: one gauge per scalar
(`megatron_gate_loss`), per-layer gauges with a `layer` label
(`megatron_gate_max_abs_residual{layer="3"}`), `megatron_gate_step`, and the counter
`megatron_gate_events_total{detector=...,severity=...}`. Binds 127.0.0.1 by default.
"""

from __future__ import annotations

import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink


class MetricsRegistry:
    """Gauges and counters keyed by (name, labels); rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set a gauge."""
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = value

    def increment(self, name: str, **labels: str) -> None:
        """Add one to a counter."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + 1.0

    def render(self) -> str:
        """The text exposition format."""
        lines: list[str] = []
        with self._lock:
            for kind, table in (("gauge", self._gauges), ("counter", self._counters)):
                for name in sorted({name for name, _ in table}):
                    lines.append(f"# TYPE {name} {kind}")
                    for (metric, labels), value in sorted(table.items()):
                        if metric == name:
                            lines.append(f"{name}{_labels(labels)} {_number(value)}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    body = ",".join(f'{key}="{value}"' for key, value in labels)
    return "{" + body + "}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class PrometheusSink(Sink):
    """Keeps the latest values in a registry served on http://host:port/metrics."""

    name = "prometheus"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 9400) -> None:
        self.registry = MetricsRegistry()
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = registry.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:  # keep scrapes out of training logs
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The scrape address."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def write(self, record: dict[str, Any]) -> None:
        """Update gauges from a step record, count events."""
        kind = record["kind"]
        if kind == "step":
            self.registry.set(schema.PROMETHEUS_LAST_STEP, float(record["step"]))
            for name, value in record["scalars"].items():
                if value is not None:
                    self.registry.set(schema.prometheus_name(name), float(value))
            for name, values in (record.get("layers") or {}).items():
                for index, value in enumerate(values):
                    if value is not None:
                        self.registry.set(
                            schema.prometheus_name(name), float(value), layer=str(index + 1)
                        )
        elif kind == "event" and schema.opens_episode(record):
            self.registry.increment(
                schema.PROMETHEUS_EVENTS_TOTAL,
                detector=record["detector"],
                severity=record["severity"],
            )

    def close(self) -> None:
        """Stop the server."""
        self.server.shutdown()
        self.server.server_close()
