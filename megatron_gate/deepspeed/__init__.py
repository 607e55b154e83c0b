"""megatron-gate with DeepSpeed: gated attention in `PipelineModule`s, the monitor on engines."""

from megatron_gate.deepspeed.engine_monitor import (
    DeepSpeedStabilityMonitor,
    load_checkpoint,
    monitor_engine,
    save_checkpoint,
)
from megatron_gate.deepspeed.pipeline import GatedTransformerLayerPipe, gated_gpt_pipeline

__all__ = [
    "DeepSpeedStabilityMonitor",
    "GatedTransformerLayerPipe",
    "gated_gpt_pipeline",
    "load_checkpoint",
    "monitor_engine",
    "save_checkpoint",
]
