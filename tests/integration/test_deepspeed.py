"""DeepSpeed on 2 gloo processes: ZeRO 1 with the monitor (skip action, DeepSpeed's own monitor
backend, state in checkpoints), a 2-stage PipelineModule of gated layers with the monitor, and
the guard on ZeRO 1 (a NaN and a spike on one rank each, at non-logged steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks import read_records

deepspeed = pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

SEQ, VOCAB, MICRO_BATCH = 16, 64, 2
MONITOR_BLOCK = {
    "log_interval": 1,
    "layer_interval": 2,
    "sinks": {"console": False, "tensorboard": False},
    "detectors": {"massive_activation": {"action": "skip_step", "threshold": 1.0e-9}},
}


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable sequence task: each token is the previous one plus one (mod vocab)."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    start = torch.randint(0, VOCAB, (MICRO_BATCH, 1), generator=generator)
    tokens = (start + torch.arange(SEQ + 1)) % VOCAB
    return tokens[:, :-1], tokens[:, 1:]


def _ds_config(tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 1},
        "csv_monitor": {"enabled": True, "output_path": str(tmp / "ds_csv"), "job_name": "run"},
        "stability_monitor": MONITOR_BLOCK,
        **extra,
    }


class _LanguageModel(torch.nn.Module):
    """A gated Megatron-Core GPTModel returning the mean token loss (DeepSpeed's engine calls it)."""

    def __init__(self) -> None:
        super().__init__()
        from megatron_gate.demo.tiny_gpt import build_gpt, tiny_config
        from megatron_gate.spec import gated_gpt_layer_spec

        self.gpt = build_gpt(
            tiny_config(), gated_gpt_layer_spec(granularity="headwise"), vocab_size=VOCAB
        )

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from megatron_gate.demo.tiny_gpt import causal_mask, position_ids

        batch, seq = tokens.shape
        losses = self.gpt(tokens, position_ids(batch, seq), causal_mask(seq), labels=labels)
        return losses.mean()


def _zero1(rank: int, tmp: Path) -> dict[str, Any]:
    from megatron_gate.deepspeed import load_checkpoint, monitor_engine, save_checkpoint

    torch.manual_seed(0)
    model = _LanguageModel()
    config = _ds_config(tmp)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    monitor = monitor_engine(engine, config, run_dir=tmp / "zero1", sequence_length=SEQ)
    losses = []
    for step in range(1, 7):
        tokens, labels = _batch(step, rank)
        loss = engine(tokens, labels)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if step == 4:
            save_checkpoint(monitor, tmp / "zero1_ckpt")
            saved_state = monitor.monitor.state_dict()
    load_checkpoint(monitor, tmp / "zero1_ckpt")
    restored = monitor.monitor.state_dict()["detectors"]
    monitor.close()
    return {
        "losses": losses,
        "skipped": engine.skipped_steps,
        # The detectors' history is back to step 4's (4 losses, not 6).
        "state_restored": restored == saved_state["detectors"]
        and len(restored["loss_spike"]["recent"]) == 4,
    }


def _pipeline(rank: int, tmp: Path) -> dict[str, Any]:
    from megatron_gate.attention import GatedSelfAttention
    from megatron_gate.config import GateConfig
    from megatron_gate.deepspeed import gated_gpt_pipeline, monitor_engine
    from megatron_gate.demo.tiny_gpt import tiny_config

    torch.manual_seed(0)
    module = gated_gpt_pipeline(
        tiny_config(), vocab_size=VOCAB, seq_length=SEQ, gate=GateConfig(granularity="headwise"),
        num_stages=2,
    )  # fmt: skip
    config = _ds_config(tmp, gradient_accumulation_steps=2, csv_monitor={"enabled": False})
    config["stability_monitor"] = {**MONITOR_BLOCK, "detectors": {}}
    engine, *_ = deepspeed.initialize(
        model=module, model_parameters=module.parameters(), config=config
    )
    monitor = monitor_engine(engine, config, run_dir=tmp / "pipeline", sequence_length=SEQ)
    gated = [m.layer_number for m in engine.module.modules() if isinstance(m, GatedSelfAttention)]
    losses = []
    for step in range(1, 7):
        batches = iter([_batch(10 * step + micro, 0) for micro in range(2)])
        losses.append(float(engine.train_batch(batches)))
    monitor.close()
    return {"losses": losses, "gated_layers": gated, "stage": engine.stage_id}


def _zero1_state(engine: Any) -> list[torch.Tensor]:
    """Weights, fp32 partitions and Adam state of a ZeRO 1 engine on this rank (copies)."""
    optimizer = engine.optimizer
    tensors = [p.detach().clone() for p in engine.module.parameters()]
    tensors += [t.detach().clone() for t in optimizer.single_partition_of_fp32_groups]
    for state in optimizer.optimizer.state.values():
        tensors += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def _zero1_guard(rank: int, tmp: Path) -> dict[str, Any]:
    """Rank 1 alone has a NaN loss at step 3, rank 0 alone a 1000x loss at step 9 (both not
    logged): the guard rejects both on every rank, through DeepSpeed's overflow path."""
    from megatron_gate.deepspeed import monitor_engine

    torch.manual_seed(0)
    model = _LanguageModel()
    config = _ds_config(tmp, csv_monitor={"enabled": False})
    config["stability_monitor"] = {**MONITOR_BLOCK, "log_interval": 5, "layer_interval": 10,
                                   "detectors": {}, "guard": {"min_history": 4}}  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    monitor = monitor_engine(engine, config, run_dir=tmp / "zero1_guard", sequence_length=SEQ)
    unchanged = []
    for step in range(1, 11):
        before = _zero1_state(engine)
        tokens, labels = _batch(step, rank)
        loss = engine(tokens, labels)
        if (rank, step) == (1, 3):
            loss = loss * float("nan")
        if (rank, step) == (0, 9):
            loss = loss * 1000.0
        engine.backward(loss)
        engine.step()
        after = _zero1_state(engine)
        unchanged.append(all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))
    monitor.close()
    return {"unchanged": unchanged, "skipped": engine.skipped_steps}


def _worker(rank: int, world_size: int, tmp: Path) -> dict[str, Any]:
    init_model_parallel(tp=1)  # Megatron-Core layers read the tensor-parallel group
    # the ZeRO runs first: the pipeline engine leaves DeepSpeed's global model-parallel state set
    return {
        "zero1": _zero1(rank, tmp),
        "zero1_guard": _zero1_guard(rank, tmp),
        "pipeline": _pipeline(rank, tmp),
    }


def test_zero1_and_two_stage_pipeline_with_monitor(tmp_path: Path) -> None:
    results = launch(_worker, world_size=2, payload=tmp_path)

    zero1 = results[0]["zero1"]
    assert zero1["losses"][-1] < zero1["losses"][0] - 0.1, zero1["losses"]
    assert zero1["skipped"] == 2 and results[1]["zero1"]["skipped"] == 2  # layer steps 2 and 4
    assert zero1["state_restored"]
    records = read_records(tmp_path / "zero1")
    events = {(r["step"], r["action"]) for r in records if r["kind"] == "event"}
    assert {(2, "skip_step"), (4, "skip_step")} <= events
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # Through DeepSpeed's own monitor (its CSV backend), with the monitor's tags.
    csv_files = {p.name for p in (tmp_path / "ds_csv").rglob("*.csv")}
    assert any(schema.tensorboard_tag("loss").replace("/", "_") in name for name in csv_files), (
        csv_files
    )

    # the guard: both faulty steps left weights, fp32 partitions and Adam state bit-identical on
    # both ranks, and DeepSpeed counted them as skipped (its own overflow path)
    for result in results:
        guard = result["zero1_guard"]
        assert [i + 1 for i, same in enumerate(guard["unchanged"]) if same] == [3, 9], guard
        assert guard["skipped"] == 2
    events = [r for r in read_records(tmp_path / "zero1_guard") if r["kind"] == "event"]
    guard_events = [(e["step"], e["severity"]) for e in events if e["detector"] == "guard"]
    assert guard_events == [(3, "critical"), (9, "critical")]  # the monitor acted

    stages = {result["pipeline"]["stage"]: result["pipeline"] for result in results}
    assert stages[0]["gated_layers"] == [1] and stages[1]["gated_layers"] == [2]
    losses = stages[1]["losses"]
    assert losses[-1] < losses[0] - 0.1, losses
    records = read_records(tmp_path / "pipeline")
    logged = {r["step"]: r["scalars"]["loss"] for r in records if r["kind"] == "step"}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged[6] == pytest.approx(losses[5], rel=1e-4)  # the last stage's loss
    assert any(r["kind"] == "step" and "layers" in r for r in records)
