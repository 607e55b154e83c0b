"""The stability monitor on Megatron-LM's training loop (provisional: config and sinks only)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any


def _sinks(args: argparse.Namespace | None) -> list[str]:
    if args is None:
        return []
    from megatron_gate.monitor.config import MonitorConfig

    config = MonitorConfig.from_cli_args(args)
    if not config.enabled:
        return []
    names = ["jsonl"]
    names += [
        name
        for name in ("tensorboard", "wandb", "prometheus", "console")
        if getattr(config.sinks, name)
    ]
    return names


def attach(args: argparse.Namespace | None, model: Any, optimizer: Any, report: Any) -> list[str]:
    return _sinks(args)


@contextlib.contextmanager
def closing_monitor() -> Iterator[None]:
    yield


def install(training: Any) -> None:
    return None
