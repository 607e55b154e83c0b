"""monitoring/: the Grafana dashboard and alert rules query what the monitor's exporter really
serves, and the TensorBoard layout's charts match the tags the TensorBoard sink really writes."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from megatron_gate.dashboard.synthetic import SyntheticRun
from megatron_gate.monitor.config import DetectorsConfig
from megatron_gate.monitor.detectors import DetectorSuite
from megatron_gate.monitor.schema import SEVERITIES
from megatron_gate.monitor.sinks.prometheus import PrometheusSink
from megatron_gate.monitor.sinks.tensorboard import TensorBoardSink

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
SELECTOR = re.compile(r"\b(megatron_gate_[a-z0-9_]+)\b(\{[^}]*\})?")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
SCRAPE_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("monitoring_generate", MONITORING / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _records_with_every_detector() -> list[dict[str, Any]]:
    """Step records of a synthetic run, plus the events the monitor's real detectors raise on it."""
    run = SyntheticRun(name="exporter", num_layers=4, gated_layers=[2, 4])
    suite = DetectorSuite(DetectorsConfig())
    records: list[dict[str, Any]] = []
    for step in range(1, 81):  # past the spike detectors' 64 steps of history
        (record,) = run.step(step)
        if step == 80:  # everything goes wrong at once
            record["scalars"].update(loss=80.0, grad_norm=500.0, update_norm=5.0, nan_or_inf=1.0)
            record["layers"]["max_abs_residual"][2] = 5.0e4
            record["layers"]["first_token_attention_share"][0] = 0.95
            record["layers"]["max_attention_logit"][1] = 4.0e3
        records.append(record)
        for event in suite.check(step, record["scalars"], record["layers"]):
            records.append({"kind": "event", "time": time.time(), **event.to_dict()})
    return records


@pytest.fixture(scope="module")
def exposition() -> dict[str, list[dict[str, str]]]:
    """The exporter's /metrics after those records: metric name -> label sets of its series."""
    records = _records_with_every_detector()
    detectors = {r["detector"] for r in records if r["kind"] == "event"}
    assert detectors == {
        "loss_spike", "grad_norm_spike", "update_norm_spike", "nan_or_inf",
        "massive_activation", "attention_sink", "attention_logit_growth",
    }  # fmt: skip
    sink = PrometheusSink(host="127.0.0.1", port=0)
    try:
        for record in records:
            sink.write(record)
        with urllib.request.urlopen(sink.url, timeout=10) as response:
            text = response.read().decode()
    finally:
        sink.close()
    series: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = (
            line.partition("{") if "{" in line.split(" ")[0] else (line.split(" ")[0], "", "")
        )
        labels = {k: v for k, _, v in MATCHER.findall(rest.partition("}")[0])}
        series.setdefault(name, []).append(labels)
    return series


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for key, op, value in matchers:
        if "$" in value or key in SCRAPE_LABELS:
            continue  # a Grafana variable or a scrape-time label: any value
        actual = labels.get(key, "")
        ok = {
            "=": actual == value,
            "!=": actual != value,
            "=~": re.fullmatch(value, actual) is not None,
            "!~": re.fullmatch(value, actual) is None,
        }[op]
        if not ok:
            return False
    return True


def _check_expression(expr: str, exposition: dict[str, list[dict[str, str]]]) -> None:
    selectors = SELECTOR.findall(expr)
    assert selectors, f"no megatron_gate_ metric in {expr!r}"
    used_labels: set[str] = set()
    for name, body in selectors:
        assert name in exposition, (
            f"{name} (in {expr!r}) is not exported; exported: {sorted(exposition)}"
        )
        matchers = MATCHER.findall(body)
        assert any(_matches(labels, matchers) for labels in exposition[name]), (
            f"{name}{body} (in {expr!r}) selects no series the exporter serves"
        )
        used_labels |= {key for labels in exposition[name] for key in labels}
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (part.strip() for part in group.split(",")):
            assert label in used_labels | SCRAPE_LABELS, (
                f"label {label!r} in {expr!r} is not exported"
            )


def _grafana_expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_committed_files_are_what_the_generator_writes() -> None:
    for path, text in _generator().render().items():
        assert path.read_text() == text, f"{path.name} is stale: run python monitoring/generate.py"


def test_grafana_dashboard_queries_exported_metrics(exposition) -> None:
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    for panel in dashboard["panels"]:
        assert panel["targets"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
    exprs = _grafana_expressions(dashboard)
    for expr in exprs:
        _check_expression(expr, exposition)
    shown = {name for expr in exprs for name, _ in SELECTOR.findall(expr)}
    for needed in (
        "loss",
        "grad_norm",
        "update_norm",
        "nan_or_inf",
        "max_abs_residual",
        "first_token_attention_share",
        "gate_sparsity",
        "events_total",
    ):
        assert f"megatron_gate_{needed}" in shown  # fmt: skip


def test_alert_rules_query_exported_metrics(exposition) -> None:
    rules = yaml.safe_load((MONITORING / "prometheus_alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for alert in alerts:
        assert alert["labels"]["severity"] in SEVERITIES
        assert alert["annotations"]["summary"]
        _check_expression(alert["expr"], exposition)
    covered = " ".join(a["expr"] for a in alerts)
    for detector in ("loss_spike", "nan_or_inf", "massive_activation", "update_norm_spike"):
        assert detector in covered
    assert "megatron_gate_first_token_attention_share" in covered  # attention sink


def test_alert_rules_with_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not installed (apt-get install prometheus); rules checked by the test above"
        )
    for command in ("check", "test"):
        target = "prometheus_alerts.yml" if command == "check" else "prometheus_alerts_test.yml"
        result = subprocess.run([promtool, command, "rules", target], cwd=MONITORING,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def test_tensorboard_layout_matches_written_tags(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    sink = TensorBoardSink(log_dir=tmp_path)
    for record in _records_with_every_detector():
        sink.write(record)
    sink.close()
    _generator().write_tensorboard_layout(tmp_path)
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()["scalars"] or events.Tags()["tensors"]
    tags = [t for t in tags if t != metadata.CONFIG_SUMMARY_TAG]
    (config,) = events.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    charts = [chart for category in layout.category for chart in category.chart]
    assert len(charts) == sum(len(c) for c in _generator().tensorboard_layout().values())
    for chart in charts:
        for pattern in chart.multiline.tag:
            assert any(re.search(pattern, tag) for tag in tags), (
                f"{chart.title}: {pattern} matches no tag"
            )
    charted = {
        tag for tag in tags for chart in charts for p in chart.multiline.tag if re.search(p, tag)
    }
    assert charted == set(tags), f"tags in no chart: {sorted(set(tags) - charted)[:5]}"
