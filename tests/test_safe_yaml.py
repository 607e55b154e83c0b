"""The shared YAML loader refuses a key given twice, naming the key and both lines; every YAML
file the project ships or reads goes through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from error_checks import assert_one_error_line, listing

from megatron_gate import safe_yaml
from megatron_gate.cli import main
from megatron_gate.monitor.config import MonitorConfig, MonitorConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        ("log_interval: 10\nlayer_interval: 5\nlog_interval: 1\n", "log_interval", (1, 3)),
        ("detectors:\n  loss_spike:\n    action: alert\n    action: skip_step\n", "action", (3, 4)),
        ("sinks: {console: true, console: false}\n", "console", (1, 1)),
        ("1: a\n1.0: b\n", 1, (1, 2)),  # equal once constructed, written differently
    ],
)
def test_a_key_given_twice_names_the_key_and_both_lines(
    text: str, key: object, lines: tuple[int, int]
) -> None:
    with pytest.raises(safe_yaml.DuplicateKeyError) as caught:
        safe_yaml.load(text)
    assert (caught.value.key, caught.value.first_line, caught.value.second_line) == (key, *lines)
    assert f"lines {lines[0]} and {lines[1]}" in str(caught.value)


def test_what_safe_load_accepts_is_read_the_same() -> None:
    text = "a: 1\nb: {c: [1, 2], d: null}\nsame_level:\n  a: 2\n"  # `a` in two mappings: fine
    assert safe_yaml.load(text) == yaml.safe_load(text)
    merged = "base: &b {x: 1, y: 2}\nrun:\n  <<: *b\n  x: 3\n"  # a merge key may be overridden
    assert safe_yaml.load(merged)["run"] == {"x": 3, "y": 2}
    with pytest.raises(yaml.YAMLError):  # still safe: no Python objects from a file
        safe_yaml.load("!!python/object/apply:os.system ['true']")
    with pytest.raises(yaml.YAMLError):  # an unhashable key is SafeLoader's own error
        safe_yaml.load("? [a, b]\n: 1\n")


def test_monitor_config_file_with_a_repeated_key(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text("log_interval: 10\nsinks:\n  console: false\nlog_interval: 1\n")
    with pytest.raises(
        MonitorConfigError, match=r"'log_interval' is given twice, on lines 1 and 4"
    ):
        MonitorConfig.from_yaml(path)


def test_demo_refuses_a_repeated_key_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "monitor.yaml"
    config.write_text("log_interval: 10\nlog_interval: 1\n")
    before = listing(tmp_path)
    code = main(["demo", "--out", str(tmp_path / "out"), "--monitor-config", str(config)])
    assert code == 2
    assert_one_error_line(
        capsys.readouterr().err, "demo", "'log_interval'", "lines 1 and 2", str(config),
        "keep one of them",
    )  # fmt: skip
    assert listing(tmp_path) == before


def test_a_monitor_set_value_with_a_repeated_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--out", str(tmp_path / "out"),
                 "--monitor-set", "detectors.loss_spike={action: alert, action: abort}"])  # fmt: skip
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "demo", "'action'", "--monitor-set")
    assert listing(tmp_path) == []


SHIPPED = sorted([*ROOT.glob("examples/*.yaml"), *ROOT.glob("monitoring/*.yml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yaml_has_no_repeated_key(path: Path) -> None:
    assert safe_yaml.load(path.read_text()) is not None
