"""Tensor and pipeline parallelism: gated models at TP=2 / PP=2 equal TP=1 given the same weights.

One 2-process gloo launch runs every layout (each launch costs ~10 s of imports). On each rank a
TP=1/PP=1 reference is built first; its full weights are then sliced into the parallel model,
and losses and gradients are compared (fp32 tolerance).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from megatron_gate.demo.tiny_gpt import build_gpt, random_batch, run_pipeline, tiny_config
from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.spec import gated_gpt_layer_spec

SEQ, BATCH, VOCAB = 16, 2, 128
TOL = {"atol": 2e-5, "rtol": 1e-4}

# (name, granularity, config overrides, tp, pp)
CASES: list[tuple[str, str | None, dict[str, Any], int, int]] = [
    ("headwise-tp2", "headwise", {}, 2, 1),
    ("elementwise-tp2", "elementwise", {}, 2, 1),
    ("headwise-tp2-groups<tp", "headwise", {"num_query_groups": 1}, 2, 1),
    ("elementwise-tp2-groups<tp", "elementwise", {"num_query_groups": 1}, 2, 1),
    ("headwise-tp2-bias", "headwise", {"add_bias_linear": True}, 2, 1),
    ("headwise-pp2", "headwise", {}, 1, 2),
    ("elementwise-pp2", "elementwise", {}, 1, 2),
]


def _batch() -> dict[str, torch.Tensor]:
    return random_batch(batch=BATCH, seq_len=SEQ, vocab_size=VOCAB, seed=7)


def _config(overrides: dict[str, Any], pp: int):  # noqa: ANN202
    return tiny_config(
        num_layers=4, pipeline_dtype=torch.float32, pipeline_model_parallel_size=pp, **overrides
    )


def _build(granularity: str, overrides: dict[str, Any], pp: int) -> torch.nn.Module:
    from megatron.core import parallel_state

    spec = gated_gpt_layer_spec(granularity=granularity, backend="local")
    return build_gpt(
        _config(overrides, pp),
        spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )


def _reference(granularity: str, overrides: dict[str, Any]) -> tuple[float, dict, dict]:
    init_model_parallel(tp=1, pp=1, seed=11)
    model = _build(granularity, overrides, pp=1)
    loss = model(**_batch()).mean()
    loss.backward()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), weights, grads


def _global_name(name: str, layer_offset: int) -> str:
    return re.sub(
        r"decoder\.layers\.(\d+)\.",
        lambda match: f"decoder.layers.{int(match.group(1)) + layer_offset}.",
        name,
    )


def _shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of a full tensor, as Megatron partitions `param`."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp_size, dim=param.partition_dim)[tp_rank]


def _parallel_loss(model: torch.nn.Module, pp: int) -> float | None:
    from megatron.core import parallel_state

    if pp == 1:
        loss = model(**_batch()).mean()
        loss.backward()
        return loss.item()

    def loss_fn(output: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    losses = run_pipeline(model, _batch(), loss_fn=loss_fn)
    if parallel_state.is_pipeline_last_stage():
        return losses[0]["loss"].item()
    return None


def _compare_case(granularity: str, overrides: dict[str, Any], tp: int, pp: int) -> dict[str, Any]:
    from megatron.core import parallel_state

    ref_loss, ref_weights, ref_grads = _reference(granularity, overrides)
    init_model_parallel(tp=tp, pp=pp, seed=99)
    model = _build(granularity, overrides, pp=pp)
    offset = parallel_state.get_pipeline_model_parallel_rank() * (4 // pp)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_shard(ref_weights[_global_name(name, offset)], param))
    loss = _parallel_loss(model, pp)
    worst: dict[str, float] = {}
    for name, param in model.named_parameters():
        expected = _shard(ref_grads[_global_name(name, offset)], param)
        torch.testing.assert_close(param.grad, expected, **TOL, msg=f"grad of {name}")
        worst[name] = (param.grad - expected).abs().max().item()
    return {"reference_loss": ref_loss, "loss": loss, "max_grad_diff": max(worst.values())}


def _worker(rank: int, world_size: int, cases: list) -> dict[str, Any]:
    return {name: _compare_case(g, overrides, tp, pp) for name, g, overrides, tp, pp in cases}


@pytest.fixture(scope="module")
def parallel_results() -> list[dict[str, Any]]:
    return launch(_worker, world_size=2, payload=CASES)


@pytest.mark.parametrize("case", [case[0] for case in CASES])
def test_parallel_layout_matches_single_rank(parallel_results: list, case: str) -> None:
    for rank_result in parallel_results:
        result = rank_result[case]
        assert result["max_grad_diff"] < 1e-4
        if result["loss"] is not None:  # only the last pipeline stage sees the loss
            assert result["loss"] == pytest.approx(result["reference_loss"], abs=1e-5)
    assert any(rank_result[case]["loss"] is not None for rank_result in parallel_results)
