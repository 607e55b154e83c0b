"""MonitorConfig: YAML, dict and CLI builders; every bad key or value gets a clear error."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from megatron_gate.monitor import MonitorConfig, MonitorConfigError


def test_yaml_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "monitor:\n"
        "  log_interval: 5\n"
        "  layer_interval: 20\n"
        "  detectors:\n"
        "    loss_spike: {action: lr_backoff, z_threshold: 4}\n"
        "  sinks: {prometheus: true, prometheus_port: 0}\n"
    )
    config = MonitorConfig.from_yaml(path)
    assert config.log_interval == 5 and config.layer_interval == 20
    assert config.detectors.loss_spike.action == "lr_backoff"
    assert config.detectors.loss_spike.z_threshold == 4.0
    assert config.detectors.grad_norm_spike == MonitorConfig().detectors.grad_norm_spike
    assert config.sinks.prometheus and config.sinks.prometheus_port == 0
    assert MonitorConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("log_intervall: 5\n", ["log_intervall", "log_interval"]),
        (
            "detectors:\n  loss_spike:\n    zscore: 3\n",
            ["detectors.loss_spike.zscore", "z_threshold"],
        ),
        ("detectors:\n  loss_spikes: {}\n", ["detectors.loss_spikes", "loss_spike"]),
        ("detectors:\n  nan_or_inf: {action: explode}\n", ["action", "rollback", "abort"]),
        ("detectors:\n  attention_sink: {severity: loud}\n", ["severity", "critical"]),
        ("log_interval: ten\n", ["log_interval", "int"]),
        ("log_interval: 3\nlayer_interval: 10\n", ["layer_interval", "multiple"]),
        ("sinks: {console: maybe}\n", ["sinks.console", "bool"]),
        ("lr_backoff_factor: 2\n", ["lr_backoff_factor", "(0, 1)"]),
        ("- a\n- b\n", ["mapping"]),
        ("log_interval: [1\n", ["not valid YAML"]),
    ],
)
def test_bad_yaml_names_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(MonitorConfigError) as error:
        MonitorConfig.from_yaml(path)
    for name in names:
        assert name in str(error.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MonitorConfigError, match="does not exist"):
        MonitorConfig.from_yaml(tmp_path / "nope.yaml")


def test_cli_flags(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text("log_interval: 2\nlayer_interval: 4\n")
    parser = MonitorConfig.add_cli_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            "--monitor-config",
            str(path),
            "--monitor-set",
            "detectors.loss_spike.action=abort",
            "--monitor-set",
            "sinks.console=false",
            "--monitor-set",
            "layer_interval=8",
        ]
    )
    config = MonitorConfig.from_cli_args(args)
    assert (config.log_interval, config.layer_interval) == (2, 8)
    assert config.detectors.loss_spike.action == "abort"
    assert config.sinks.console is False
    assert MonitorConfig.from_cli_args(parser.parse_args(["--no-monitor"])).enabled is False
    with pytest.raises(MonitorConfigError, match="detectors.loss_spike.bogus"):
        MonitorConfig.from_cli_args(
            parser.parse_args(["--monitor-set", "detectors.loss_spike.bogus=1"])
        )
    with pytest.raises(MonitorConfigError, match="KEY=VALUE"):
        MonitorConfig.from_cli_args(parser.parse_args(["--monitor-set", "log_interval"]))


def test_a_section_given_in_part_keeps_its_own_defaults(tmp_path: Path) -> None:
    # Each detector has defaults of its own (loss_spike: window 1024, min_history 64); a file that
    # sets only its action must not fall back to the generic DetectorConfig's (128, 16).
    path = tmp_path / "monitor.yaml"
    path.write_text(
        "detectors:\n"
        "  loss_spike: {action: alert}\n"
        "  attention_logit_growth: {action: log}\n"
        "guard: {z_threshold: 9.0}\n"
    )
    config, defaults = MonitorConfig.from_yaml(path), MonitorConfig()
    loss = config.detectors.loss_spike
    assert (loss.window, loss.min_history, loss.confirmed_action) == (1024, 64, "skip_step")
    logit = config.detectors.attention_logit_growth
    assert (
        logit.action == "log"
        and logit.threshold == defaults.detectors.attention_logit_growth.threshold
    )
    assert config.detectors.grad_norm_spike == defaults.detectors.grad_norm_spike
    assert config.guard.z_threshold == 9.0
    assert config.guard.grad_norm_min_relative_jump == defaults.guard.grad_norm_min_relative_jump
    shipped = MonitorConfig.from_yaml(Path(__file__).parents[2] / "examples" / "monitor.yaml")
    assert shipped.detectors.loss_spike.window == defaults.detectors.loss_spike.window
    assert shipped.detectors.massive_activation.ratio == defaults.detectors.massive_activation.ratio
