"""Prometheus exporter (optional), on the standard `prometheus-client` library.

`GET /metrics` serves one gauge per scalar (`megatron_gate_loss`), per-layer gauges with a
`layer` label (`megatron_gate_max_abs_residual{layer="3"}`), `megatron_gate_step`, the counter
`megatron_gate_events_total{detector,severity}`, the counter
`megatron_gate_attributed_steps_total{attribution}` (rejected steps recomputed: transient or
reproducible, both present from the start at 0), and prometheus-client's process, platform and
GC collectors. A name that is both a scalar and a per-layer metric (`grad_norm`) carries the
whole-model value under `layer=""`, which Prometheus stores as "no layer label": the Grafana
queries and alert rules select it with `layer=""`. Binds 127.0.0.1 by default.

Multi-process: with `PROMETHEUS_MULTIPROC_DIR` set (prometheus-client's convention), the values
go to that directory's files instead (gauges keep the most recent value written by any
process, event counters add up), and the served registry collects them all - so a launcher,
or a second process started with `port=None`, can serve what the training processes write.
"""

from __future__ import annotations

import os
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.base import Sink

_PER_LAYER = set(schema.LAYER_METRICS)
_WHOLE_MODEL = set(schema.SCALARS)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def serving_registry() -> Any:
    """The registry /metrics exposes: this process' metrics plus the default collectors, or
    (multi-process mode) every process' files."""
    from prometheus_client import CollectorRegistry, multiprocess
    from prometheus_client.gc_collector import GCCollector
    from prometheus_client.platform_collector import PlatformCollector
    from prometheus_client.process_collector import ProcessCollector

    registry = CollectorRegistry()
    if _multiprocess():
        multiprocess.MultiProcessCollector(registry)
    else:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


class PrometheusSink(Sink):
    """Keeps the latest values in prometheus-client metrics served on http://host:port/metrics.

    `port=None` serves nothing (multi-process mode: another process serves the files).
    """

    name = "prometheus"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = 9400) -> None:
        import prometheus_client  # optional dependency: ImportError says what is missing

        self._client = prometheus_client
        self.registry = serving_registry()
        # Multi-process metrics live in files, not in a registry.
        self._metrics_registry = None if _multiprocess() else self.registry
        self._gauges: dict[str, Any] = {}
        self.step = self._gauge(schema.PROMETHEUS_LAST_STEP, "last logged training step", ())
        self.events = prometheus_client.Counter(
            schema.PROMETHEUS_EVENTS_TOTAL.removesuffix("_total"),
            "stability detector events",
            ("detector", "severity"),
            registry=self._metrics_registry,
        )
        self.attributed = prometheus_client.Counter(
            schema.PROMETHEUS_ATTRIBUTED_TOTAL.removesuffix("_total"),
            "rejected steps recomputed on the same batch, by attribution",
            ("attribution",),
            registry=self._metrics_registry,
        )
        for attribution in schema.ATTRIBUTIONS:  # both series exist (at 0) before any fault
            self.attributed.labels(attribution=attribution)
        self.server = self.thread = None
        if port is not None:
            self.server, self.thread = prometheus_client.start_http_server(
                port, addr=host, registry=self.registry
            )

    def _gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Any:
        return self._client.Gauge(
            name,
            documentation,
            labels,
            registry=self._metrics_registry,
            multiprocess_mode="mostrecent",
        )

    def _metric_gauge(self, metric: str) -> Any:
        """The gauge of a schema metric, made on its first value (no gauge reads 0 before)."""
        gauge = self._gauges.get(metric)
        if gauge is None:
            labels = ("layer",) if metric in _PER_LAYER else ()
            where = "per layer" if metric in _PER_LAYER else "whole model"
            gauge = self._gauge(
                schema.prometheus_name(metric), f"stability {metric} ({where})", labels
            )
            self._gauges[metric] = gauge
        return gauge

    @property
    def url(self) -> str:
        """The scrape address."""
        if self.server is None:
            raise RuntimeError("this PrometheusSink serves nothing (port=None)")
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/metrics"

    def write(self, record: dict[str, Any]) -> None:
        """Update gauges from a step record, count events."""
        kind = record["kind"]
        if kind == "step":
            self.step.set(float(record["step"]))
            self._write_scalars(record.get("scalars") or {})
            self._write_layers(record.get("layers") or {})
        elif kind == "event" and schema.opens_episode(record):
            self.events.labels(detector=record["detector"], severity=record["severity"]).inc()
            if record.get("attribution") in schema.ATTRIBUTIONS:
                self.attributed.labels(attribution=record["attribution"]).inc()

    def _write_scalars(self, scalars: dict[str, Any]) -> None:
        for metric, value in scalars.items():
            if value is None or metric not in _WHOLE_MODEL:
                continue
            gauge = self._metric_gauge(metric)
            (gauge.labels(layer="") if metric in _PER_LAYER else gauge).set(float(value))

    def _write_layers(self, layers: dict[str, Any]) -> None:
        for metric, values in layers.items():
            if metric not in _PER_LAYER:
                continue
            for index, value in enumerate(values):
                if value is not None:
                    self._metric_gauge(metric).labels(layer=str(index + 1)).set(float(value))

    def close(self) -> None:
        """Stop the server."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.server = None
