"""The gate multiply: `out = attn * sigmoid(gate)`, one fused elementwise op for both granularities.

Shapes: `attn` is the core attention output `[sq, b, np * hn]` (or `[t, 1, np * hn]` for packed
THD sequences); `gate` is `[sq, b, np, g]` with `g = hn` (elementwise) or `g = 1` (headwise),
so one broadcasting multiply serves both.
"""

from __future__ import annotations

import torch
from megatron.core.jit import jit_fuser


@jit_fuser
def _gate_in_fp32(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    # [sq, b, np * hn] -> [sq, b, np, hn]; the gate broadcasts over hn when headwise.
    heads = attn.view(gate.shape[0], gate.shape[1], gate.shape[2], -1)
    gated = heads.float() * torch.sigmoid(gate.float())
    return gated.to(attn.dtype).view(attn.shape)


@jit_fuser
def _gate_in_input_dtype(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    heads = attn.view(gate.shape[0], gate.shape[1], gate.shape[2], -1)
    gated = heads * torch.sigmoid(gate.to(attn.dtype))
    return gated.view(attn.shape)


def apply_output_gate(
    attn: torch.Tensor, gate: torch.Tensor, *, sigmoid_in_fp32: bool = True
) -> torch.Tensor:
    """Multiply `attn [sq, b, np * hn]` by `sigmoid(gate [sq, b, np, hn | 1])`."""
    if sigmoid_in_fp32:
        return _gate_in_fp32(attn, gate)
    return _gate_in_input_dtype(attn, gate)
