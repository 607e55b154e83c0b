"""Property-based fuzzing of the monitor-config parser: no input raises anything but
`MonitorConfigError` (YAML text, nested values, `--monitor-set` items)."""

from __future__ import annotations

import argparse
import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_gate.monitor.config import MonitorConfig, MonitorConfigError, load_yaml

KEYS = ["log_interval", "layer_interval", "probe_queries", "lr_backoff_factor", "detectors",
        "sinks", "loss_spike", "window", "z_threshold", "threshold", "ratio", "action",
        "prometheus_port", "enabled", "monitor", "min_history"]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=4
        ),
    ),
    max_leaves=20,
)
YAML_TOKENS = st.sampled_from(
    [*KEYS, ":", " ", "\n", "  ", "- ", "[", "]", "{", "}", ",", "&a", "*a", "!!python/name:os.system",
     ".nan", ".inf", "-1", "1e400", "0x1F", "'", '"', "#", "?", "|", ">", "\t", "---", "...", "~"]
)  # fmt: skip


def _parse_yaml(text: str) -> None:
    with contextlib.suppress(MonitorConfigError):
        data = load_yaml(text, source="fuzz")
        MonitorConfig.from_dict(data if isinstance(data, dict) else {"x": data})


@settings(max_examples=300, deadline=None)
@given(st.lists(YAML_TOKENS, max_size=40).map("".join))
def test_yaml_made_of_config_tokens(text: str) -> None:
    _parse_yaml(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text(text: str) -> None:
    _parse_yaml(text)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_nested_values(data: dict) -> None:
    with contextlib.suppress(MonitorConfigError):  # anything else fails the test
        MonitorConfig.from_dict(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), YAML_TOKENS,
                          st.text(max_size=10)), max_size=3))  # fmt: skip
def test_monitor_set_items(items: list) -> None:
    flags = [".".join(path) + "=" + token + tail for path, token, tail in items]
    with contextlib.suppress(MonitorConfigError):
        MonitorConfig.from_cli_args(argparse.Namespace(monitor_set=flags))
