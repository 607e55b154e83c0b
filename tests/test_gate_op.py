"""The fused gate multiply against a plain reference, values and gradients, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from megatron_gate.gate_op import apply_output_gate


def reference_gate(attn: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Plain G1 gate: per head, `attn_h * sigmoid(gate_h)` in fp32, cast back."""
    sq, batch, heads, _ = gate.shape
    head_dim = attn.shape[-1] // heads
    out = torch.empty_like(attn, dtype=torch.float32)
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scale = 1.0 / (1.0 + torch.exp(-gate[:, :, h, :].double()))
        out[:, :, cols] = (attn[:, :, cols].double() * scale).float()
    return out.to(attn.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_width", ["elementwise", "headwise"])
def test_fused_gate_matches_reference(dtype: torch.dtype, gate_width: str) -> None:
    torch.manual_seed(0)
    sq, batch, heads, head_dim = 5, 3, 4, 8
    attn = torch.randn(sq, batch, heads * head_dim, dtype=dtype, requires_grad=True)
    width = head_dim if gate_width == "elementwise" else 1
    gate = (3 * torch.randn(sq, batch, heads, width)).to(dtype).requires_grad_()
    upstream = torch.randn(sq, batch, heads * head_dim, dtype=dtype)

    fused = apply_output_gate(attn, gate)
    (fused_attn_grad, fused_gate_grad) = torch.autograd.grad(fused, (attn, gate), upstream)
    expected = reference_gate(attn, gate)
    (ref_attn_grad, ref_gate_grad) = torch.autograd.grad(expected, (attn, gate), upstream)

    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    assert fused.dtype == dtype and fused.shape == attn.shape
    torch.testing.assert_close(fused, expected, **tol)
    torch.testing.assert_close(fused_attn_grad, ref_attn_grad, **tol)
    torch.testing.assert_close(fused_gate_grad, ref_gate_grad, **tol)


def test_input_dtype_variant_is_close_to_fp32() -> None:
    torch.manual_seed(1)
    attn = torch.randn(4, 2, 32, dtype=torch.bfloat16)
    gate = torch.randn(4, 2, 4, 8, dtype=torch.bfloat16)
    fast = apply_output_gate(attn, gate, sigmoid_in_fp32=False)
    torch.testing.assert_close(fast, reference_gate(attn, gate), atol=2e-2, rtol=2e-2)


def test_packed_thd_shape() -> None:
    # THD: [t, 1, np * hn] with the gate [t, 1, np, g].
    attn = torch.randn(7, 1, 12)
    gate = torch.zeros(7, 1, 3, 1)
    torch.testing.assert_close(apply_output_gate(attn, gate), attn * 0.5)
