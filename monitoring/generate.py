"""Regenerate the Grafana dashboard and the TensorBoard custom-scalars layout from the schema.

    python monitoring/generate.py          # rewrites the two JSON files beside this script

Both are derived from `megatron_gate.monitor.schema` so that their metric names and tags are
the ones the monitor writes; edit this script, not the JSON. The Prometheus alert rules
(`prometheus_alerts.yml`) are written by hand: they carry thresholds and prose.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from megatron_gate.monitor.schema import (
    PROMETHEUS_EVENTS_TOTAL,
    PROMETHEUS_LAST_STEP,
    TENSORBOARD_PREFIX,
    prometheus_name,
    tensorboard_tag,
)

HERE = Path(__file__).resolve().parent
GRAFANA_PATH = HERE / "grafana_dashboard.json"
TENSORBOARD_PATH = HERE / "tensorboard_layout.json"

_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
_RUN = 'instance=~"$instance"'
_SCALAR = f'{{{_RUN}, layer=""}}'  # scalar gauges; per-layer gauges of the same name carry `layer`
_PER_LAYER = f'{{{_RUN}, layer!=""}}'


def _target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": _DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref}


def _panel(
    title: str,
    targets: list[dict[str, Any]],
    *,
    grid: tuple[int, int, int, int],
    kind: str = "timeseries",
    log: bool = False,
    unit: str = "short",
    description: str = "",
    thresholds: list[tuple[float | None, str]] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    x, y, w, h = grid
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    custom: dict[str, Any] = {}
    if kind == "timeseries":
        custom = {"drawStyle": "line", "lineWidth": 1, "showPoints": "never", "spanNulls": True}
        if log:
            custom["scaleDistribution"] = {"type": "log", "log": 10}
        if thresholds:
            custom["thresholdsStyle"] = {"mode": "line"}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [{**t, "refId": chr(ord("A") + i)} for i, t in enumerate(targets)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": options or {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def _scalar(metric: str) -> str:
    return prometheus_name(metric) + _SCALAR


def _layers(metric: str) -> str:
    return prometheus_name(metric) + _PER_LAYER


_EVENTS = PROMETHEUS_EVENTS_TOTAL
_LAYER_LEGEND = "{{instance}} layer {{layer}}"


def _overview_panels() -> list[dict[str, Any]]:
    """The top row: step, pace, NaN/Inf, events; then loss, norms, lr, throughput."""
    events = _EVENTS
    return [
        _panel(
            "Step",
            [_target(f"{PROMETHEUS_LAST_STEP}{{{_RUN}}}", "{{instance}}")],
            grid=(0, 0, 4, 4),
            kind="stat",
        ),
        _panel(
            "Steps per second",
            [_target(f"rate({PROMETHEUS_LAST_STEP}{{{_RUN}}}[5m])", "{{instance}}")],
            grid=(4, 0, 4, 4),
            kind="stat",
            unit="none",
        ),
        _panel(
            "NaN / Inf",
            [_target(_scalar("nan_or_inf"), "{{instance}}")],
            grid=(8, 0, 4, 4),
            kind="stat",
            thresholds=[(None, "green"), (1, "red")],
            description="1 when the last logged step had a NaN or Inf loss or gradient.",
        ),
        _panel(
            "Events (last hour)",
            [_target(f"sum by (detector) (increase({events}{{{_RUN}}}[1h]))", "{{detector}}")],
            grid=(12, 0, 12, 4),
            kind="bargauge",
            options={"displayMode": "basic", "orientation": "horizontal"},
        ),
        _panel("Loss", [_target(_scalar("loss"), "{{instance}}")], grid=(0, 4, 12, 8)),
        _panel(
            "Gradient and update norm",
            [
                _target(_scalar("grad_norm"), "{{instance}} grad norm"),
                _target(_scalar("update_norm"), "{{instance}} update norm"),
            ],
            grid=(12, 4, 12, 8),
            log=True,
            description="Update-norm spikes tend to precede loss spikes.",
        ),
        _panel(
            "Detector events per 5 min",
            [
                _target(
                    f"sum by (detector, severity) (increase({events}{{{_RUN}}}[5m]))",
                    "{{detector}} ({{severity}})",
                )
            ],
            grid=(0, 12, 12, 8),
            kind="timeseries",
        ),
        _panel(
            "Learning rate and loss scale",
            [
                _target(_scalar("learning_rate"), "{{instance}} learning rate"),
                _target(_scalar("loss_scale"), "{{instance}} loss scale"),
            ],
            grid=(12, 12, 6, 8),
            log=True,
            description="An lr_backoff action shows as a step down and back up.",
        ),
        _panel(
            "Tokens per second",
            [_target(_scalar("tokens_per_second"), "{{instance}}")],
            grid=(18, 12, 6, 8),
        ),
    ]


def _layer_panels() -> list[dict[str, Any]]:
    """Per-layer activations, attention and gates (one series per layer)."""
    layer_legend = _LAYER_LEGEND
    return [
        _panel(
            "max |h| of the residual stream, per layer",
            [_target(_layers("max_abs_residual"), layer_legend)],
            grid=(0, 20, 12, 9),
            log=True,
            thresholds=[(None, "green"), (1e4, "red")],
            description="Massive activations: the monitor's default threshold is 1e4.",
        ),
        _panel(
            "max |h| by layer (latest)",
            [_target(f"max by (layer) ({_layers('max_abs_residual')})", "layer {{layer}}")],
            grid=(12, 20, 12, 9),
            kind="bargauge",
            thresholds=[(None, "green"), (1e3, "orange"), (1e4, "red")],
            options={"displayMode": "gradient", "orientation": "vertical"},
        ),
        _panel(
            "First-token attention share, per layer",
            [_target(_layers("first_token_attention_share"), layer_legend)],
            grid=(0, 29, 12, 9),
            unit="percentunit",
            thresholds=[(None, "green"), (0.8, "red")],
            description="Attention sinks: mean softmax mass on position 0 (threshold 0.8).",
        ),
        _panel(
            "Max attention logit, per layer",
            [_target(_layers("max_attention_logit"), layer_legend)],
            grid=(12, 29, 12, 9),
            log=True,
            thresholds=[(None, "green"), (1e3, "red")],
        ),
        _panel(
            "Gate sparsity (share of gates < 0.1), per gated layer",
            [_target(_layers("gate_sparsity"), layer_legend)],
            grid=(0, 38, 12, 9),
            unit="percentunit",
        ),
        _panel(
            "Mean gate value, per gated layer",
            [_target(_layers("gate_mean"), layer_legend)],
            grid=(12, 38, 12, 9),
        ),
    ]


def _variables() -> list[dict[str, Any]]:
    """The data-source picker and the run (`instance`) selector."""
    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        },
        {
            "name": "instance",
            "label": "run",
            "type": "query",
            "datasource": _DATASOURCE,
            "query": {
                "query": f"label_values({PROMETHEUS_LAST_STEP}, instance)",
                "refId": "instance",
            },
            "definition": f"label_values({PROMETHEUS_LAST_STEP}, instance)",
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "current": {},
            "hide": 0,
        },
    ]


def grafana_dashboard() -> dict[str, Any]:
    """The Grafana dashboard model (import it, then pick the Prometheus data source)."""
    panels = _overview_panels() + _layer_panels()
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
    return {
        "uid": "megatron-gate-stability",
        "title": "megatron-gate stability",
        "description": "What the megatron-gate stability monitor's Prometheus exporter serves.",
        "tags": ["megatron-gate", "training", "stability"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {
            "list": [
                {
                    "name": "Detector events",
                    "enable": True,
                    "iconColor": "red",
                    "datasource": _DATASOURCE,
                    "expr": f"sum by (detector) (increase({_EVENTS}{{{_RUN}}}[1m])) > 0",
                    "titleFormat": "{{detector}}",
                    "step": "60s",
                }
            ]
        },
        "panels": panels,
    }


def tensorboard_layout() -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout as `SummaryWriter.add_custom_scalars` takes it; tags are regexes."""

    def per_layer(metric: str) -> str:
        example = tensorboard_tag(metric, 1)  # stability/layer_01/<metric>
        return example.replace("layer_01", r"layer_\d+")

    def scalar(metric: str) -> str:
        return "^" + tensorboard_tag(metric) + "$"

    return {
        "stability: training": {
            "loss": ["Multiline", [scalar("loss")]],
            "grad and update norm": ["Multiline", [scalar("grad_norm"), scalar("update_norm")]],
            "learning rate": ["Multiline", [scalar("learning_rate")]],
            "loss scale and NaN/Inf": ["Multiline", [scalar("loss_scale"), scalar("nan_or_inf")]],
            "tokens per second": ["Multiline", [scalar("tokens_per_second")]],
            "steps skipped by the guard": ["Multiline", [scalar("skipped_steps")]],
            "events by detector": ["Multiline", [TENSORBOARD_PREFIX + "events/.*"]],
        },
        "stability: activations per layer": {
            "max |h| residual": ["Multiline", [per_layer("max_abs_residual")]],
            "rms residual": ["Multiline", [per_layer("rms_residual")]],
            "max |attention output|": ["Multiline", [per_layer("max_abs_attention_output")]],
            "rms attention output": ["Multiline", [per_layer("rms_attention_output")]],
            "max |MLP output|": ["Multiline", [per_layer("max_abs_mlp_output")]],
            "rms MLP output": ["Multiline", [per_layer("rms_mlp_output")]],
        },
        "stability: attention per layer": {
            "first-token attention share": [
                "Multiline",
                [per_layer("first_token_attention_share")],
            ],
            "max attention logit": ["Multiline", [per_layer("max_attention_logit")]],
        },
        "stability: gates per layer": {
            "gate sparsity": ["Multiline", [per_layer("gate_sparsity")]],
            "gate mean": ["Multiline", [per_layer("gate_mean")]],
        },
        "stability: optimizer per layer": {
            "grad norm": ["Multiline", [per_layer("grad_norm")]],
            "update norm": ["Multiline", [per_layer("update_norm")]],
        },
    }


def write_tensorboard_layout(log_dir: str | Path) -> None:
    """Add the layout to a TensorBoard log directory (the Custom Scalars tab then shows it)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(log_dir), filename_suffix=".stability_layout") as writer:
        writer.add_custom_scalars(tensorboard_layout())


def render() -> dict[Path, str]:
    """File contents, by path."""
    return {
        GRAFANA_PATH: json.dumps(grafana_dashboard(), indent=2) + "\n",
        TENSORBOARD_PATH: json.dumps(tensorboard_layout(), indent=2) + "\n",
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--tensorboard-logdir"] and len(argv) == 2:
        write_tensorboard_layout(argv[1])
        print(f"wrote the stability custom-scalars layout into {argv[1]}")
        return 0
    if argv:
        print("usage: python monitoring/generate.py [--tensorboard-logdir LOGDIR]", file=sys.stderr)
        return 2
    for path, text in render().items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
