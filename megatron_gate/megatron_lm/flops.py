"""Megatron-LM's FLOPs count (logged TFLOP/s, MFU, `num_floating_point_operations_so_far`)
with the gate's rows of `linear_qkv`.

Megatron-LM's `num_floating_point_operations` (training.py) counts gate rows only for a GPT whose
args have `attention_output_gate` (as many rows as the query), and never for a HybridModel. A
gated layer adds `num_attention_heads * gate_rows_per_head` rows (`hn` per head elementwise, 1
headwise): 2 FLOPs per multiply-add x 3 GEMMs (forward, data and weight gradient) x tokens x
hidden x rows. The wrapper adds what Megatron's count leaves out; FP8 padding rows are not
counted (they do no useful work), nor the sigmoid and the multiply (elementwise, like norms).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_gate.layout import gate_rows_per_head


@dataclass(frozen=True, kw_only=True)
class GatedLayers:
    """What the FLOPs count needs to know about the built model (all ranks together)."""

    granularity: str
    count: int


def _is_hybrid(args: argparse.Namespace) -> bool:
    # Megatron-LM's own test (`is_hybrid_model`) picks its hybrid formula the same way.
    return getattr(args, "hybrid_layer_pattern", None) is not None


def _head_dim(args: argparse.Namespace) -> int:
    return args.kv_channels or args.hidden_size // args.num_attention_heads


def gate_rows_counted_by_megatron(args: argparse.Namespace) -> int:
    """Gate rows per layer that Megatron-LM's own count already holds."""
    if getattr(args, "attention_output_gate", False) and not _is_hybrid(args):
        return args.num_attention_heads * _head_dim(args)
    return 0


def missing_gate_flops(args: argparse.Namespace, *, tokens: int, gated: GatedLayers) -> int:
    """FLOPs of the gate rows of one global batch of `tokens` that Megatron-LM leaves out."""
    rows = args.num_attention_heads * gate_rows_per_head(gated.granularity, _head_dim(args))
    missing = rows - gate_rows_counted_by_megatron(args)
    return 6 * tokens * args.hidden_size * missing * gated.count


def wrap_num_floating_point_operations(
    original: Callable[..., Any], gated: Callable[[], GatedLayers | None]
) -> Callable[..., Any]:
    """`num_floating_point_operations` plus the gate rows it misses (`gated()`: None = no gate)."""

    def num_floating_point_operations(
        args: argparse.Namespace, batch_size: int, *rest: Any, **kwargs: Any
    ) -> Any:
        flops = original(args, batch_size, *rest, **kwargs)
        layers = gated()
        if layers is None or not layers.count:
            return flops
        tokens = kwargs.get("total_real_tokens_in_batch", rest[1] if len(rest) > 1 else None)
        if tokens is None:
            tokens = batch_size * args.seq_length
        return flops + missing_gate_flops(args, tokens=tokens, gated=layers)

    return num_floating_point_operations
