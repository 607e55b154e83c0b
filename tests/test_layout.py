"""The fused `linear_qkv` row layout: split/fuse inverse, Megatron-native order, FP8 padding."""

from __future__ import annotations

import pytest
import torch

from megatron_gate.config import GateConfigError
from megatron_gate.layout import build_layout


@pytest.mark.parametrize("granularity", [None, "elementwise", "headwise"])
def test_split_then_fuse_is_identity(granularity: str | None) -> None:
    layout = build_layout(
        num_attention_heads=8, num_query_groups=2, head_dim=4, granularity=granularity
    )
    weight = torch.randn(layout.total_rows, 6)
    torch.testing.assert_close(layout.fuse_weight(layout.split_weight(weight)), weight)


def test_elementwise_rows_follow_megatron_native_order() -> None:
    # Megatron's attention_output_gate: per group [q heads | gate heads | k | v].
    heads, groups, head_dim = 4, 2, 3
    layout = build_layout(
        num_attention_heads=heads,
        num_query_groups=groups,
        head_dim=head_dim,
        granularity="elementwise",
    )
    rows = torch.arange(layout.total_rows).unsqueeze(1)
    parts = layout.split_weight(rows)
    per_group = (2 * heads // groups + 2) * head_dim
    hpg = heads // groups
    for head in range(heads):
        group, within = divmod(head, hpg)
        q_start = group * per_group + within * head_dim
        g_start = group * per_group + hpg * head_dim + within * head_dim
        assert parts["query"][head, :, 0].tolist() == list(range(q_start, q_start + head_dim))
        assert parts["gate"][head, :, 0].tolist() == list(range(g_start, g_start + head_dim))
    k_start = 2 * hpg * head_dim
    assert parts["key"][1, :, 0].tolist() == list(
        range(per_group + k_start, per_group + k_start + head_dim)
    )


@pytest.mark.parametrize(("groups", "tp"), [(8, 8), (8, 2), (2, 8), (1, 4)])
def test_headwise_fp8_padding_aligns_every_rank(groups: int, tp: int) -> None:
    layout = build_layout(
        num_attention_heads=32,
        num_query_groups=groups,
        head_dim=128,
        granularity="headwise",
        tp_size=tp,
        fp8_alignment=16,
    )
    assert layout.total_rows % tp == 0
    assert (layout.total_rows // tp) % 16 == 0
    assert layout.padding_rows < 16 * max(1, tp // groups)
    # Padding never appears among the returned segments.
    weight = torch.randn(layout.total_rows, 2)
    parts = layout.split_weight(weight)
    assert parts["gate"].shape == (32, 1, 2)


def test_no_padding_without_fp8() -> None:
    layout = build_layout(
        num_attention_heads=32, num_query_groups=8, head_dim=128, granularity="headwise"
    )
    assert layout.padding_rows == 0
    assert layout.group_rows == 4 * 128 + 4 + 2 * 128


def test_wrong_row_count_names_the_shapes() -> None:
    layout = build_layout(
        num_attention_heads=4, num_query_groups=2, head_dim=4, granularity="headwise"
    )
    with pytest.raises(GateConfigError, match="rows, expected"):
        layout.split_weight(torch.zeros(layout.total_rows + 1, 3))
