"""Sinks: write-only outputs of the monitor (JSONL always; TensorBoard, W&B, Prometheus, console).

Each sink takes schema records (`run_start`, `step`, `event`, `run_end`). `SinkGroup` fans out to
several; a sink that raises warns once and is disabled, it never stops training.
"""

from megatron_gate.monitor.sinks.base import Sink, SinkGroup
from megatron_gate.monitor.sinks.console import ConsoleSink
from megatron_gate.monitor.sinks.jsonl import JsonlSink, read_records
from megatron_gate.monitor.sinks.prometheus import PrometheusSink
from megatron_gate.monitor.sinks.tensorboard import TensorBoardSink
from megatron_gate.monitor.sinks.wandb import WandbSink

__all__ = [
    "ConsoleSink",
    "JsonlSink",
    "PrometheusSink",
    "Sink",
    "SinkGroup",
    "TensorBoardSink",
    "WandbSink",
    "read_records",
]
