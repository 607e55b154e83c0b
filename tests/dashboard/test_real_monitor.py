"""The dashboard on real monitor output: a tiny gated Megatron GPT trained with StabilityMonitor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from megatron_gate.dashboard.downsample import rounded
from megatron_gate.dashboard.server import Dashboard
from megatron_gate.dashboard.store import load_run
from megatron_gate.monitor import MonitorConfig, StabilityMonitor
from megatron_gate.monitor.loops import train_with_monitor
from megatron_gate.monitor.sinks.jsonl import read_records
from megatron_gate.spec import gated_gpt_layer_spec
from megatron_gate.tiny_gpt import build_gpt, causal_mask, position_ids, tiny_config

SEQ, BATCH, VOCAB, STEPS = 16, 2, 128, 12


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


def test_dashboard_reads_what_the_monitor_writes(tmp_path: Path) -> None:
    _world()
    torch.manual_seed(0)
    model = build_gpt(
        tiny_config(num_layers=2),
        gated_gpt_layer_spec(granularity="headwise", backend="local"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = MonitorConfig.from_dict(
        {"log_interval": 2, "layer_interval": 4, "sinks": {"console": False, "tensorboard": False}}
    )
    run_dir = tmp_path / "real"
    monitor = StabilityMonitor(config, models=[model], run_dir=run_dir, optimizer=optimizer)
    train_with_monitor(
        model=model,
        optimizer=optimizer,
        monitor=monitor,
        batch_at=_batch,
        loss_of=_loss,
        steps=STEPS,
    )
    monitor.close("completed")

    records = read_records(run_dir)
    steps = [r for r in records if r["kind"] == "step"]
    layer_steps = [r for r in steps if r.get("layers")]
    assert steps and layer_steps

    store = load_run(run_dir)
    summary = store.summary()
    assert summary["skipped_lines"] == 0 and summary["status"] == "completed"
    assert summary["num_layers"] == 2 and summary["last_step"] == steps[-1]["step"]
    view = Dashboard([store]).view(points=1000, heatmap_buckets=1000)["runs"][0]
    loss = view["scalars"]["loss"]
    assert loss["x"] == [r["step"] for r in steps]
    assert loss["y"] == rounded(np.array([r["scalars"]["loss"] for r in steps], dtype=float))
    for metric in ("max_abs_residual", "first_token_attention_share", "gate_sparsity"):
        heatmap = view["heatmaps"][metric]
        assert heatmap["x"] == [r["step"] for r in layer_steps]
        expected = [[r["layers"][metric][layer] for r in layer_steps] for layer in range(2)]
        expected = [rounded(np.array(row, dtype=np.float32), digits=4) for row in expected]
        assert heatmap["z"] == expected
