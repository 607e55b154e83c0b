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
from prometheus_client.parser import text_string_to_metric_families

from megatron_gate import safe_yaml
from megatron_gate.dashboard.synthetic import SyntheticRun
from megatron_gate.monitor.config import DetectorsConfig
from megatron_gate.monitor.detectors import DetectorSuite
from megatron_gate.monitor.schema import SEVERITIES
from megatron_gate.monitor.sinks.prometheus import PrometheusSink
from megatron_gate.monitor.sinks.tensorboard import TensorBoardSink

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
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
def exposition(exposition_text: str) -> dict[str, list[dict[str, str]]]:
    """The exporter's /metrics after those records: metric name -> label sets of its series."""
    records = _records_with_every_detector()
    detectors = {r["detector"] for r in records if r["kind"] == "event"}
    assert detectors == {
        "loss_spike", "grad_norm_spike", "update_norm_spike", "nan_or_inf",
        "massive_activation", "attention_sink", "attention_logit_growth",
    }  # fmt: skip
    text = exposition_text
    return _series(text)


def _series(text: str) -> dict[str, list[dict[str, str]]]:
    """Exposition text -> metric name -> label sets of its series (parsed by prometheus-client)."""
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


@pytest.fixture(scope="module")
def exposition_text() -> str:
    """The exporter's /metrics text after a run in which every detector fired."""
    sink = PrometheusSink(host="127.0.0.1", port=0)
    try:
        for record in _records_with_every_detector():
            sink.write(record)
        with urllib.request.urlopen(sink.url, timeout=10) as response:
            return response.read().decode()
    finally:
        sink.close()


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
    rules = safe_yaml.load((MONITORING / "prometheus_alerts.yml").read_text())
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


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        subprocess.run([str(ROOT / "scripts" / "ensure_prometheus.sh")], capture_output=True,
                       timeout=600, check=False)  # fmt: skip
        promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/ensure_prometheus.sh could not install it)")
    return promtool


def test_alert_rules_with_promtool() -> None:
    promtool = _promtool()
    for command in ("check", "test"):
        target = "prometheus_alerts.yml" if command == "check" else "prometheus_alerts_test.yml"
        result = subprocess.run([promtool, command, "rules", target], cwd=MONITORING,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr


def _input_series(text: str) -> list[dict[str, str]]:
    """promtool input series: the exporter's samples as scraped once a minute for 30 minutes.

    Counters read 0 on the first scrape and their value after it, so `increase()` sees the events.
    """
    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("megatron_gate_") or sample.name.endswith("_created"):
                continue
            labels = {"job": "train", "instance": "run", **sample.labels}
            body = ",".join(f'{k}="{v}"' for k, v in labels.items() if v != "")
            value = sample.value
            if value != value:  # NaN: not a value promtool's series notation takes
                continue
            value_text = "Inf" if value == float("inf") else repr(value)
            values = f"0 {value_text}x29" if family.type == "counter" else f"{value_text}x30"
            series.append({"series": f"{sample.name}{{{body}}}", "values": values})
    return series


_THRESHOLD = re.compile(r"\s*(>|<|==|!=|>=|<=)\s*[-+0-9.e]+\s*$")


def _as_promql(expr: str) -> str:
    """An expression with Grafana's variables filled in as "every run" and its final threshold
    comparison dropped (the thresholds are promtool-tested by prometheus_alerts_test.yml; here
    what matters is that the real series reach every aggregation)."""
    expr = expr.strip().replace("$instance", ".*").replace("$__rate_interval", "5m")
    return _THRESHOLD.sub("", expr)


def test_every_query_answers_in_prometheus(exposition_text: str, tmp_path: Path) -> None:
    """Prometheus' own engine (promtool) evaluates every Grafana query and alert expression over
    what the real exporter serves: each must return at least one series."""
    promtool = _promtool()
    dashboard = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    rules = safe_yaml.load((MONITORING / "prometheus_alerts.yml").read_text())
    exprs = [e for e in _grafana_expressions(dashboard) if not e.startswith("label_values")]
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    tests = [
        {"expr": f"count({_as_promql(expr)}) > bool 0", "eval_time": "2m",
         "exp_samples": [{"labels": "{}", "value": 1}]}
        for expr in exprs
    ]  # fmt: skip
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": _input_series(exposition_text),
             "promql_expr_test": tests}
        ],
    }  # fmt: skip
    (tmp_path / "queries_test.yml").write_text(yaml.safe_dump(spec))
    result = subprocess.run([promtool, "test", "rules", "queries_test.yml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lint = subprocess.run([promtool, "check", "metrics"], input=exposition_text,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert lint.returncode == 0, lint.stdout + lint.stderr


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


# Datasource-specific keys Grafana reads but the SDK's generic models do not carry.
_DATASOURCE_KEYS = {"definition", "titleFormat", "step"}
_PANEL_TYPES = {"timeseries", "stat", "bargauge", "gauge", "table", "heatmap", "text"}


def _lost_keys(written: Any, kept: Any, path: str = "") -> list[str]:
    """Keys of `written` that the SDK's round trip dropped (unknown to Grafana's schema)."""
    if isinstance(written, dict) and isinstance(kept, dict):
        lost = [f"{path}/{k}" for k in written if k not in kept]
        return lost + [
            p for k in written if k in kept for p in _lost_keys(written[k], kept[k], f"{path}/{k}")
        ]
    if isinstance(written, list) and isinstance(kept, list) and len(written) == len(kept):
        pairs = enumerate(zip(written, kept, strict=True))
        return [p for i, (a, b) in pairs for p in _lost_keys(a, b, f"{path}[{i}]")]
    return []


def test_grafana_dashboard_is_what_grafana_accepts() -> None:
    """Structure checked against Grafana's own dashboard schema (grafana-foundation-sdk's
    generated models), plus the layout rules the import would break on."""
    sdk = pytest.importorskip("grafana_foundation_sdk.models.dashboard")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    written = json.loads((MONITORING / "grafana_dashboard.json").read_text())
    kept = json.loads(JSONEncoder().encode(sdk.Dashboard.from_json(written)))
    lost = [p for p in _lost_keys(written, kept) if p.rsplit("/", 1)[-1] not in _DATASOURCE_KEYS]
    assert lost == [], f"keys outside Grafana's dashboard schema: {lost}"
    occupied: set[tuple[int, int]] = set()
    for panel in written["panels"]:
        assert panel["type"] in _PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}  # fmt: skip
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        assert panel["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in written["templating"]["list"]}
    assert {"datasource", "instance"} <= names
