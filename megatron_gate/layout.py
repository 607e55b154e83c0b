"""Row layout of the fused `linear_qkv` weight of a gated attention layer.

Rows are interleaved per query group, as in Megatron-Core:

    [ q heads (hpg * hn) | gate rows | gate padding | k (hn) | v (hn) ]   x ng query groups

where `hpg` = heads per group, `hn` = head dim, gate rows = `hpg * hn` (elementwise: exactly the
layout of Megatron-Core's native `attention_output_gate`) or `hpg` (headwise: one row per head).
Padding rows exist only for headwise gates under FP8, to keep every rank's rows 16-aligned.

The global row order never depends on the tensor-parallel size (padding aside, which depends on
it only when `ng < tp`), so a plain row split of the weight is a valid TP shard: resharding never
moves a gate row to another head. This module is the only place that slices that layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_gate.config import GateConfigError

SEGMENTS: tuple[str, ...] = ("query", "gate", "gate_padding", "key", "value")


@dataclass(frozen=True, kw_only=True)
class QkvLayout:
    """Sizes of each per-group segment of the fused `linear_qkv` rows."""

    num_query_groups: int
    """`ng`: query groups (key/value heads) of the whole layer."""
    heads_per_group: int
    """`hpg = np / ng`: query heads sharing one key/value head."""
    head_dim: int
    """`hn`: channels per head (`kv_channels`)."""
    gate_rows_per_head: int
    """`hn` for elementwise gates, 1 for headwise gates, 0 for no gate."""
    padding_rows: int = 0
    """Unused rows after the gate block of each group (headwise + FP8 alignment only)."""

    @property
    def segment_sizes(self) -> dict[str, int]:
        """Rows of each segment within one query group, in order."""
        return {
            "query": self.heads_per_group * self.head_dim,
            "gate": self.heads_per_group * self.gate_rows_per_head,
            "gate_padding": self.padding_rows,
            "key": self.head_dim,
            "value": self.head_dim,
        }

    @property
    def group_rows(self) -> int:
        """Rows of one query group."""
        return sum(self.segment_sizes.values())

    @property
    def total_rows(self) -> int:
        """Rows of the whole fused weight (all ranks together)."""
        return self.num_query_groups * self.group_rows

    @property
    def qkv_split_shapes(self) -> list[int]:
        """Rows of each non-empty segment of one query group, in order: `[q, gate, (padding,) k,
        v]`. Megatron's emerging optimizers (Muon) read this as a parameter's `qkv_split_shapes`
        and orthogonalize every segment on its own, so gate rows never mix with query rows and
        FP8 padding (all zero) stays a zero segment of its own."""
        return [size for size in self.segment_sizes.values() if size]

    def rank_split_shapes(self, *, tp_rank: int, tp_size: int) -> list[int]:
        """`qkv_split_shapes` of one TP rank's rows (a plain row split of the fused weight).

        With `ng >= tp` a rank holds whole groups: the per-group shapes. With `ng < tp` a rank
        holds one contiguous share of one group, which cuts segments: the pieces of each
        segment that fall into that share (so ranks of one group differ).
        """
        ranks_per_group = max(1, tp_size // self.num_query_groups)
        if ranks_per_group == 1:
            return self.qkv_split_shapes
        share = self.group_rows // ranks_per_group
        start = (tp_rank % ranks_per_group) * share
        shapes, offset = [], 0
        for size in self.segment_sizes.values():
            overlap = min(offset + size, start + share) - max(offset, start)
            if overlap > 0:
                shapes.append(overlap)
            offset += size
        return shapes

    def row_factors(self, factors: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-group factors `{segment: [g]}` -> per-row factors `[g * group_rows]` in fused row
        order; rows of segments not given (gate, padding, ...) get 1."""
        reference = next(iter(factors.values()))
        groups = reference.numel()
        columns = []
        for name, size in self.segment_sizes.items():
            factor = factors.get(name, reference.new_ones(groups))
            # [g] -> [g, rows of this segment]
            columns.append(factor.reshape(groups, 1).expand(groups, size))
        # [g, group_rows] -> [g * group_rows]
        return torch.cat(columns, dim=1).reshape(-1)

    def split_groups(self, mixed: torch.Tensor, dim: int = -1) -> dict[str, torch.Tensor]:
        """Split `[..., g * group_rows, ...]` (along `dim`) into per-segment views `[..., g, rows]`.

        Works on activations (`[sq, b, g * group_rows]`) and on weights (`[rows, h]`, `dim=0`),
        for any number `g` of whole groups (a rank's share or all of them). Padding is dropped.
        """
        dim = dim % mixed.dim()
        groups = mixed.size(dim) // self.group_rows
        # [..., g * group_rows, ...] -> [..., g, group_rows, ...]
        grouped = mixed.unflatten(dim, (groups, self.group_rows))
        parts = torch.split(grouped, list(self.segment_sizes.values()), dim=dim + 1)
        return {
            name: part
            for name, part in zip(SEGMENTS, parts, strict=False)
            if name != "gate_padding"
        }

    def fuse_groups(self, segments: dict[str, torch.Tensor], dim: int = 0) -> torch.Tensor:
        """Inverse of `split_groups` for full tensors: `{segment: [..., g, rows, ...]}` -> fused.

        Padding rows are filled with zeros.
        """
        query = segments["query"]
        dim = dim % (query.dim() - 1)
        padding_shape = list(query.shape)
        padding_shape[dim + 1] = self.padding_rows
        padding = query.new_zeros(padding_shape)
        gate = segments.get("gate")
        if gate is None:
            gate_shape = list(query.shape)
            gate_shape[dim + 1] = 0
            gate = query.new_zeros(gate_shape)
        ordered = [query, gate, padding, segments["key"], segments["value"]]
        fused = torch.cat(ordered, dim=dim + 1)
        # [..., g, group_rows, ...] -> [..., g * group_rows, ...]
        return fused.flatten(dim, dim + 1)

    def split_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full fused weight or bias `[total_rows, ...]` -> per-head tensors.

        Returns `query [np, hn, ...]`, `gate [np, gate_rows_per_head, ...]`, `key [ng, hn, ...]`
        and `value [ng, hn, ...]`, heads in global order.
        """
        if weight.size(0) != self.total_rows:
            raise GateConfigError(
                f"linear_qkv has {weight.size(0)} rows, expected {self.total_rows} for {self}."
            )
        parts = self.split_groups(weight, dim=0)
        rest = tuple(weight.shape[1:])
        num_heads = self.num_query_groups * self.heads_per_group
        return {
            # [ng, hpg * hn, ...] -> [np, hn, ...]
            "query": parts["query"].reshape(num_heads, self.head_dim, *rest),
            # [ng, hpg * gate_rows_per_head, ...] -> [np, gate_rows_per_head, ...]
            "gate": parts["gate"].reshape(num_heads, self.gate_rows_per_head, *rest),
            "key": parts["key"].reshape(self.num_query_groups, self.head_dim, *rest),
            "value": parts["value"].reshape(self.num_query_groups, self.head_dim, *rest),
        }

    def fuse_weight(self, heads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of `split_weight`: per-head tensors -> full fused weight `[total_rows, ...]`."""
        rest = tuple(heads["query"].shape[2:])
        ng = self.num_query_groups
        segments = {
            # [np, hn, ...] -> [ng, hpg * hn, ...]
            "query": heads["query"].reshape(ng, -1, *rest),
            "key": heads["key"].reshape(ng, self.head_dim, *rest),
            "value": heads["value"].reshape(ng, self.head_dim, *rest),
        }
        if self.gate_rows_per_head:
            segments["gate"] = heads["gate"].reshape(ng, -1, *rest)
        return self.fuse_groups(segments, dim=0)


def gate_rows_per_head(granularity: str | None, head_dim: int) -> int:
    """Gate rows each head owns in `linear_qkv`: `hn` (elementwise), 1 (headwise), 0 (none)."""
    return {"elementwise": head_dim, "headwise": 1, None: 0}[granularity]


def headwise_padding(
    *, unpadded_group_rows: int, num_query_groups: int, tp_size: int, alignment: int
) -> int:
    """Padding rows per group so that every TP rank's share of `linear_qkv` is `alignment`-aligned.

    With `ng >= tp` a rank holds whole groups, so aligning one group suffices (and stays valid at
    any TP size). With `ng < tp` one group is split over `tp / ng` ranks, so the group must align
    to `alignment * tp / ng`.
    """
    ranks_per_group = max(1, tp_size // num_query_groups)
    target = alignment * ranks_per_group
    return math.ceil(unpadded_group_rows / target) * target - unpadded_group_rows


def build_layout(
    *,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    granularity: str | None,
    tp_size: int = 1,
    fp8_alignment: int | None = None,
) -> QkvLayout:
    """Layout of a gated (or plain, `granularity=None`) `linear_qkv` for the given model shape.

    `fp8_alignment` pads headwise gates when set (FP8 runs); elementwise and plain layouts are
    aligned whenever `head_dim` is.
    """
    layout = QkvLayout(
        num_query_groups=num_query_groups,
        heads_per_group=num_attention_heads // num_query_groups,
        head_dim=head_dim,
        gate_rows_per_head=gate_rows_per_head(granularity, head_dim),
    )
    if granularity != "headwise" or not fp8_alignment:
        return layout
    padding = headwise_padding(
        unpadded_group_rows=layout.group_rows,
        num_query_groups=num_query_groups,
        tp_size=tp_size,
        alignment=fp8_alignment,
    )
    return QkvLayout(**{**layout.__dict__, "padding_rows": padding})
