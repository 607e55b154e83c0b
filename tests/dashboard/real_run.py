"""Real monitor output for the dashboard's tests: a tiny gated Megatron GPT trained with the
StabilityMonitor on the CPU (gloo), its detectors tuned so that per-layer events fire."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megatron_gate.demo.tiny_gpt import build_gpt, causal_mask, position_ids, tiny_config
from megatron_gate.monitor import MonitorConfig, StabilityMonitor
from megatron_gate.monitor.loops import train_with_monitor
from megatron_gate.spec import gated_gpt_layer_spec

SEQ, BATCH, VOCAB = 16, 2, 128


def _world() -> None:
    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    if not dist.is_initialized():
        init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)


def _batch(index: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(index))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    labels = torch.roll(tokens, -1, dims=1)
    return model(tokens, position_ids(BATCH, SEQ), causal_mask(SEQ), labels=labels).float().mean()


def train_real_run(
    run_dir: Path, *, steps: int, num_layers: int = 2, monitor: dict[str, Any] | None = None
) -> Path:
    """Train `steps` steps with a monitor writing into `run_dir`; returns `run_dir`."""
    _world()
    torch.manual_seed(0)
    model = build_gpt(
        tiny_config(num_layers=num_layers),
        gated_gpt_layer_spec(granularity="headwise", backend="local"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    options = {"sinks": {"console": False, "tensorboard": False}, **(monitor or {})}
    stability = StabilityMonitor(
        MonitorConfig.from_dict(options), models=[model], run_dir=run_dir, optimizer=optimizer
    )
    train_with_monitor(
        model=model,
        optimizer=optimizer,
        monitor=stability,
        batch_at=_batch,
        loss_of=_loss,
        steps=steps,
    )
    stability.close("completed")
    return run_dir


# Thresholds under what a freshly initialised tiny model shows: its residual maxima and
# first-token shares are "massive activations" and "attention sinks" at every layer step.
EVENTFUL = {
    "log_interval": 1,
    "layer_interval": 2,
    "detectors": {
        "massive_activation": {"threshold": 0.5, "min_history": 1},
        "attention_sink": {"threshold": 0.01},
    },
}
