"""The Prometheus exporter on prometheus-client: served values, and multi-process collection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks import PrometheusSink

STEP = {
    "kind": "step",
    "step": 7,
    "time": 1.0,
    "scalars": {"loss": 2.5, "grad_norm": float("inf"), "learning_rate": 1e-3, "unknown": 1.0},
    "layers": {"max_abs_residual": [3.0, None], "grad_norm": [0.5, 0.25]},
}
EVENT = {"kind": "event", "step": 7, "detector": "loss_spike", "severity": "warning"}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_exporter_serves_the_latest_values() -> None:
    sink = PrometheusSink(host="127.0.0.1", port=0)
    try:
        assert sink.url.startswith("http://127.0.0.1:")
        sink.write(STEP)
        sink.write(EVENT)
        sink.write(EVENT)
        sink.write({**STEP, "step": 8, "scalars": {"loss": 2.0}, "layers": {}})
        with urllib.request.urlopen(sink.url, timeout=5) as response:
            text = response.read().decode()
    finally:
        sink.close()
    samples = _samples(text)
    assert samples[(schema.prometheus_name("loss"), ())] == 2.0  # the latest step's value
    assert samples[(schema.PROMETHEUS_LAST_STEP, ())] == 8.0
    assert samples[(schema.prometheus_name("grad_norm"), (("layer", ""),))] == float("inf")
    assert samples[(schema.prometheus_name("grad_norm"), (("layer", "2"),))] == 0.25
    assert samples[(schema.prometheus_name("max_abs_residual"), (("layer", "1"),))] == 3.0
    assert (schema.prometheus_name("max_abs_residual"), (("layer", "2"),)) not in samples
    events = (schema.PROMETHEUS_EVENTS_TOTAL, (("detector", "loss_spike"), ("severity", "warning")))
    assert samples[events] == 2.0
    assert "megatron_gate_unknown" not in text  # only the schema's names are exported
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)  # default collectors
    assert "# TYPE megatron_gate_events_total counter" in text


_WRITER = """
import json, sys
from megatron_gate.monitor.sinks import PrometheusSink
sink = PrometheusSink(port=None)
step = int(sys.argv[1])
sink.write({"kind": "step", "step": step, "scalars": {"loss": float(step)}, "layers": {}})
sink.write({"kind": "event", "step": step, "detector": "loss_spike", "severity": "warning"})
sink.close()
"""
_READER = """
from prometheus_client import generate_latest
from megatron_gate.monitor.sinks.prometheus import serving_registry
print(generate_latest(serving_registry()).decode())
"""


def test_multiprocess_mode_collects_every_process(tmp_path: Path) -> None:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    for step in (3, 5):  # two training processes, one after the other
        subprocess.run([sys.executable, "-c", _WRITER, str(step)], env=env, check=True, timeout=60)
    served = subprocess.run(
        [sys.executable, "-c", _READER], env=env, check=True, timeout=60, capture_output=True
    ).stdout.decode()
    samples = _samples(served)
    events = (schema.PROMETHEUS_EVENTS_TOTAL, (("detector", "loss_spike"), ("severity", "warning")))
    assert samples[events] == 2.0, json.dumps(list(map(str, samples)))  # counters add up
    assert samples[(schema.PROMETHEUS_LAST_STEP, ())] == 5.0  # gauges: the most recent
    assert samples[(schema.prometheus_name("loss"), ())] == 5.0


def test_exporter_counts_attributed_steps_by_attribution() -> None:
    sink = PrometheusSink(host="127.0.0.1", port=0)
    try:
        with urllib.request.urlopen(sink.url, timeout=5) as response:
            before = _samples(response.read().decode())
        guard = {**EVENT, "detector": "guard", "severity": "critical"}
        for attribution in ("transient", "transient", "reproducible"):
            sink.write({**guard, "attribution": attribution})
        sink.write(guard)  # a skip without a recompute
        with urllib.request.urlopen(sink.url, timeout=5) as response:
            after = _samples(response.read().decode())
    finally:
        sink.close()
    name = schema.PROMETHEUS_ATTRIBUTED_TOTAL
    # both series are there from the start (a rate() over them needs no first fault)
    assert before[(name, (("attribution", "transient"),))] == 0.0
    assert before[(name, (("attribution", "reproducible"),))] == 0.0
    assert after[(name, (("attribution", "transient"),))] == 2.0
    assert after[(name, (("attribution", "reproducible"),))] == 1.0
    events = (schema.PROMETHEUS_EVENTS_TOTAL, (("detector", "guard"), ("severity", "critical")))
    assert after[events] == 4.0
