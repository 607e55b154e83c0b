"""The packed one-collective reduction equals per-rank computations (2 gloo ranks, TP=2, PP=2).

One `launch` runs both layouts. On each rank the test computes its own reference statistics
with plain hooks (activations, gate values, Megatron's attention probabilities and scores),
and per-layer gradient norms with Megatron's `get_grad_norm_fp32` over the model-parallel
group; the parent combines the ranks' references and compares them with what the monitor
reduced, on every rank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.monitor.reduction import PackLayout, reduce_packed

SEQ, BATCH, VOCAB, LAYERS, PROBE = 16, 2, 128, 4, 5


def test_pack_layout_combines_max_and_sum() -> None:
    layout = PackLayout()
    layout.add("a", 2, "max")
    layout.add("b", 3, "sum")
    rows = torch.stack(
        [
            layout.pack({"a": torch.tensor([1.0, -5.0]), "b": torch.tensor([1.0, 2.0, 3.0])}),
            layout.pack({"b": torch.tensor([10.0, 0.0, 1.0])}),  # no "a" here: -inf
        ]
    )
    combined = layout.unpack(layout.combine(rows).tolist())
    assert combined == {"a": [1.0, -5.0], "b": [11.0, 2.0, 4.0]}
    assert reduce_packed(layout, rows[0]).tolist() == rows[0].tolist()  # not distributed
    with pytest.raises(ValueError, match="holds 2 values"):
        layout.pack({"a": torch.zeros(3)})


def _batch() -> dict[str, torch.Tensor]:
    from megatron_gate.demo.tiny_gpt import random_batch

    return random_batch(batch=BATCH, seq_len=SEQ, vocab_size=VOCAB, seed=5)


def _reference_hooks(model: torch.nn.Module, reference: dict[int, dict[str, Any]]) -> list:
    from megatron_gate.monitor.probe import sample_positions

    positions = sample_positions(SEQ, PROBE)
    handles = []

    def stats(key: str, number: int):  # noqa: ANN202
        def hook(_module, _inputs, output) -> None:  # noqa: ANN001
            tensor = output[0].detach().double()
            reference[number][key] = (
                tensor.abs().max().item(),
                tensor.pow(2).sum().item(),
                tensor.numel(),
            )

        return hook

    for layer in model.decoder.layers:
        number = layer.layer_number
        reference[number] = {}
        handles.append(layer.register_forward_hook(stats("residual", number)))
        handles.append(
            layer.self_attention.register_forward_hook(stats("attention_output", number))
        )
        handles.append(layer.mlp.register_forward_hook(stats("mlp_output", number)))
        core = layer.self_attention.core_attention

        def gate(_module, logits, number=number) -> None:  # noqa: ANN001
            values = torch.sigmoid(logits.double())
            reference[number]["gate"] = (
                values.sum().item(),
                values.numel(),
                (values < 0.1).sum().item(),
            )

        def probs(_module, inputs, _output, number=number) -> None:  # noqa: ANN001
            first = inputs[0][:, :, positions, 0].double()
            reference[number]["share"] = (first.sum().item(), first.numel())

        def scores(_module, inputs, _output, number=number) -> None:  # noqa: ANN001
            visible = ~inputs[1].expand_as(inputs[0])[:, :, positions]
            logits = inputs[0][:, :, positions].masked_fill(~visible, -math.inf)
            reference[number]["max_logit"] = logits.max().item()

        layer.self_attention.gate_observers.append(gate)
        handles.append(core.attention_dropout.register_forward_hook(probs))
        handles.append(core.scale_mask_softmax.register_forward_hook(scores))
    return handles


def _layer_grad_norms(model: torch.nn.Module) -> list[float]:
    """Megatron's own grad norm per global layer, reduced over the model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    layers = {layer.layer_number: layer for layer in model.decoder.layers}
    norms = []
    for number in range(1, LAYERS + 1):
        params = layers[number].parameters() if number in layers else []
        grads = [
            p.grad
            for p in params
            if p.grad is not None and param_is_not_tensor_parallel_duplicate(p)
        ]
        norm = get_grad_norm_fp32(
            grads, grad_stats_parallel_group=parallel_state.get_model_parallel_group()
        )
        norms.append(float(norm))
    return norms


def _run_case(tp: int, pp: int, run_dir: str) -> dict[str, Any]:
    from megatron.core import parallel_state

    from megatron_gate.demo.tiny_gpt import build_gpt, run_pipeline, tiny_config
    from megatron_gate.monitor import MonitorConfig, StabilityMonitor
    from megatron_gate.spec import gated_gpt_layer_spec

    init_model_parallel(tp=tp, pp=pp, seed=21)
    config = tiny_config(
        num_layers=LAYERS, pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp
    )
    model = build_gpt(
        config,
        gated_gpt_layer_spec(granularity="elementwise", backend="local"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    monitor = StabilityMonitor(
        MonitorConfig.from_dict(
            {
                "log_interval": 1,
                "layer_interval": 1,
                "probe_queries": PROBE,
                "sinks": {"console": False, "tensorboard": False},
            }
        ),
        models=[model],
        run_dir=run_dir,
    )
    reference: dict[int, dict[str, Any]] = {}
    handles = _reference_hooks(model, reference)
    monitor.start_step(0)

    losses = run_pipeline(
        model,
        _batch(),
        loss_fn=lambda out: (out.float().mean(), {"loss": out.float().mean().detach()}),
    )
    loss = losses[0]["loss"] if parallel_state.is_pipeline_last_stage() else None
    monitor.end_step(0, loss=loss, learning_rate=0.01)
    for handle in handles:
        handle.remove()
    monitor.close()
    return {
        "reference": reference,
        "loss": None if loss is None else loss.item(),
        "grad_norms": _layer_grad_norms(model),
        "record": monitor.last_records[0],
    }


def _worker(rank: int, world_size: int, run_dir: str) -> dict[str, Any]:
    return {
        "tp2": _run_case(2, 1, f"{run_dir}/tp2"),
        "pp2": _run_case(1, 2, f"{run_dir}/pp2"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    run_dir = tmp_path_factory.mktemp("parallel")
    return launch(_worker, world_size=2, payload=str(run_dir)), run_dir


def _combined(ranks: list[dict[str, Any]], number: int, key: str) -> list:
    return [rank["reference"][number][key] for rank in ranks if number in rank["reference"]]


@pytest.mark.parametrize("case", ["tp2", "pp2"])
def test_reduced_values_equal_per_rank_references(results: tuple, case: str) -> None:
    per_rank, run_dir = results
    ranks = [result[case] for result in per_rank]
    record = ranks[0]["record"]
    assert all(rank["record"] == record for rank in ranks)  # every rank decides on the same numbers
    layers = record["layers"]
    for number in range(1, LAYERS + 1):
        index = number - 1
        for kind in ("residual", "attention_output", "mlp_output"):
            parts = _combined(ranks, number, kind)
            assert parts, f"layer {number} measured nowhere"
            assert layers[f"max_abs_{kind}"][index] == pytest.approx(
                max(p[0] for p in parts), rel=1e-6
            )
            rms = math.sqrt(sum(p[1] for p in parts) / sum(p[2] for p in parts))
            assert layers[f"rms_{kind}"][index] == pytest.approx(rms, rel=1e-5)
        gate = _combined(ranks, number, "gate")
        assert layers["gate_mean"][index] == pytest.approx(
            sum(g[0] for g in gate) / sum(g[1] for g in gate), rel=1e-5
        )
        assert layers["gate_sparsity"][index] == pytest.approx(
            sum(g[2] for g in gate) / sum(g[1] for g in gate)
        )
        share = _combined(ranks, number, "share")
        assert layers["first_token_attention_share"][index] == pytest.approx(
            sum(s[0] for s in share) / sum(s[1] for s in share), rel=1e-5
        )
        logits = _combined(ranks, number, "max_logit")
        assert layers["max_attention_logit"][index] == pytest.approx(max(logits), rel=1e-5)
        assert layers["grad_norm"][index] == pytest.approx(ranks[0]["grad_norms"][index], rel=1e-4)
    losses = [rank["loss"] for rank in ranks if rank["loss"] is not None]
    assert record["scalars"]["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    if case == "tp2":  # TP ranks hold disjoint heads: both contributed gate values
        assert all(len(_combined(ranks, n, "gate")) == 2 for n in range(1, LAYERS + 1))
    else:  # PP stages hold disjoint layers
        assert sorted(ranks[0]["reference"]) == [1, 2] and sorted(ranks[1]["reference"]) == [3, 4]
    jsonl = (run_dir / case / "stability.jsonl").read_text().splitlines()
    assert sum('"run_start"' in line for line in jsonl) == 1  # one writer rank
