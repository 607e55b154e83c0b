"""Muon (the real `emerging-optimizers` package, through Megatron-Core's own optimizer set-up) on
gated layers: each query group's q, gate, k and v rows are orthogonalized as separate segments.

The reference is written out here: rows picked by index arithmetic (not `layout.py`), each
segment orthogonalized on its own with the optimizer's own Newton-Schulz function.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from megatron_gate.config import GateConfigError
from megatron_gate.demo.tiny_gpt import build_gpt, random_batch, tiny_config
from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.layout import build_layout
from megatron_gate.spec import gated_gpt_layer_spec

pytest.importorskip("emerging_optimizers", reason="needs the emerging-optimizers package")

HEADS, HIDDEN, VOCAB, SEQ = 8, 64, 128, 16
HEAD_DIM = HIDDEN // HEADS


def _segments(groups: int, gate_rows_per_head: int) -> list[tuple[str, list[int]]]:
    """(segment, its rows in every group) of the fused weight, counted by hand."""
    hpg = HEADS // groups
    sizes = {"q": hpg * HEAD_DIM, "gate": hpg * gate_rows_per_head, "k": HEAD_DIM, "v": HEAD_DIM}
    group_rows = sum(sizes.values())
    result, offset = [], 0
    for name, size in sizes.items():
        rows = [g * group_rows + offset + i for g in range(groups) for i in range(size)]
        result.append((name, rows))
        offset += size
    return result


def _gated_muon(granularity: str, groups: int, tp: int = 1, tp_mode: str = "blockwise") -> Any:
    """A gated GPT and Megatron's real Muon optimizer for it (fp32, no grad clipping: CPU)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = tiny_config(
        num_attention_heads=HEADS, num_query_groups=groups, tensor_model_parallel_size=tp
    )
    spec = gated_gpt_layer_spec(granularity=granularity, backend="local")
    model = build_gpt(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ)
    chunk = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    optimizer_config = OptimizerConfig(
        optimizer="muon", lr=0.02, clip_grad=0.0, muon_tp_mode=tp_mode
    )
    return model, chunk, get_megatron_optimizer(optimizer_config, [chunk])


def _muon_of(optimizer: Any) -> Any:
    from megatron.core.optimizer.emerging_optimizers import TensorParallelMuon

    inner = [sub.optimizer for sub in optimizer.chained_optimizers]
    return next(opt for opt in inner if isinstance(opt, TensorParallelMuon))


@pytest.mark.usefixtures("megatron_world")
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_muon_orthogonalizes_each_segment_on_its_own(granularity: str) -> None:
    init_model_parallel(tp=1, seed=3)
    model, _, optimizer = _gated_muon(granularity, groups=2)
    weight = model.decoder.layers[0].self_attention.linear_qkv.weight
    gate_rows = HEAD_DIM if granularity == "elementwise" else 1
    assert weight.is_qkv
    assert weight.qkv_split_shapes == [4 * HEAD_DIM, 4 * gate_rows, HEAD_DIM, HEAD_DIM]
    muon = _muon_of(optimizer)
    grad = torch.randn_like(weight)
    expected = torch.empty_like(grad)
    for _name, rows in _segments(groups=2, gate_rows_per_head=gate_rows):
        expected[rows] = muon.scaled_orthogonalize_fn(grad[rows], None, None)
    torch.testing.assert_close(muon.orthogonalize(weight, grad), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.usefixtures("megatron_world")
def test_muon_step_trains_a_gated_model() -> None:
    init_model_parallel(tp=1, seed=3)
    model, _chunk, optimizer = _gated_muon("headwise", groups=2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss = model(**random_batch(batch=2, seq_len=SEQ, vocab_size=VOCAB, seed=0)).mean()
    loss.backward()
    # one rank: DDP's backward hooks already put the grads in main_grad (no sync needed)
    update_successful, grad_norm, _ = optimizer.step()
    assert update_successful and grad_norm > 0
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    after = dict(model.named_parameters())
    assert torch.isfinite(after[qkv]).all() and not torch.equal(after[qkv], before[qkv])


def test_rank_split_shapes_cut_segments_where_the_rank_boundary_falls() -> None:
    for granularity, gate_rows in (("headwise", 1), ("elementwise", HEAD_DIM)):
        layout = build_layout(
            num_attention_heads=HEADS,
            num_query_groups=1,
            head_dim=HEAD_DIM,
            granularity=granularity,
        )
        segments = _segments(groups=1, gate_rows_per_head=gate_rows)
        share = layout.group_rows // 2
        for rank in range(2):
            mine = range(rank * share, (rank + 1) * share)
            expected = [len(set(rows) & set(mine)) for _, rows in segments]
            shapes = layout.rank_split_shapes(tp_rank=rank, tp_size=2)
            assert shapes == [size for size in expected if size]
            assert sum(shapes) == share


def test_fp8_padding_is_a_segment_of_its_own() -> None:
    layout = build_layout(
        num_attention_heads=HEADS,
        num_query_groups=2,
        head_dim=HEAD_DIM,
        granularity="headwise",
        fp8_alignment=16,
    )
    assert layout.padding_rows > 0
    assert layout.qkv_split_shapes == [4 * HEAD_DIM, 4, layout.padding_rows, HEAD_DIM, HEAD_DIM]


def _tp2_case(rank: int, world_size: int, payload: Any) -> dict[str, Any]:
    init_model_parallel(tp=2, seed=3)
    result: dict[str, Any] = {}
    for granularity in ("headwise", "elementwise"):
        model, _, optimizer = _gated_muon(granularity, groups=1, tp=2)
        weight = model.decoder.layers[0].self_attention.linear_qkv.weight
        muon = _muon_of(optimizer)
        grad = torch.randn_like(weight)
        shapes = weight.qkv_split_shapes
        pieces = torch.split(grad, shapes)
        expected = torch.cat([muon.scaled_orthogonalize_fn(p, None, None) for p in pieces])
        error = (muon.orthogonalize(weight, grad) - expected).abs().max().item()
        result[granularity] = {"shapes": shapes, "is_qkv": bool(weight.is_qkv), "error": error}
    try:
        _gated_muon("headwise", groups=1, tp=2, tp_mode="duplicated")
        result["duplicated"] = None
    except GateConfigError as error:
        result["duplicated"] = str(error)
    return result


def test_groups_below_tp_split_each_ranks_share_or_say_why_not() -> None:
    results = launch(_tp2_case, world_size=2)
    for granularity in ("headwise", "elementwise"):
        layout = build_layout(
            num_attention_heads=HEADS,
            num_query_groups=1,
            head_dim=HEAD_DIM,
            granularity=granularity,
        )
        for rank, result in enumerate(results):
            case = result[granularity]
            assert case["is_qkv"] and case["error"] < 1e-5
            assert case["shapes"] == layout.rank_split_shapes(tp_rank=rank, tp_size=2)
        # the two ranks of the one group hold different segments
        assert results[0][granularity]["shapes"] != results[1][granularity]["shapes"]
    for result in results:
        assert "muon_tp_mode='duplicated'" in result["duplicated"]
        assert "--muon-tp-mode blockwise" in result["duplicated"]
