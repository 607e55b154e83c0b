"""`GateConfig`: what the gated attention layer is asked to do, validated up front."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_gate.errors import InputError

Granularity = Literal["elementwise", "headwise"]
Backend = Literal["auto", "te", "local"]

GRANULARITIES: tuple[str, ...] = ("elementwise", "headwise")
BACKENDS: tuple[str, ...] = ("auto", "te", "local")


class GateConfigError(InputError):
    """A gated-attention setting that cannot work; the message names the field and the fix."""


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Settings of the G1 output gate of Qiu et al. (2025).

    The gate is `sigmoid(x W_g)`, computed from the layer's normalized input `x` by extra rows
    fused into `linear_qkv`, and multiplied onto the scaled-dot-product-attention output before
    `linear_proj`.
    """

    granularity: Granularity = "elementwise"
    """`"elementwise"`: one gate per head channel, the layout of Megatron-Core's native
    `attention_output_gate` (and Qwen3-Next). `"headwise"`: one scalar gate per head."""

    gate_bias: bool = False
    """Give the gate rows a trainable bias. Off by default even when `add_bias_linear` is on
    (Megatron's native gate silently inherits that bias); the rows then stay at zero."""

    sigmoid_in_fp32: bool = True
    """Compute the sigmoid and the product in fp32 and cast back to the activation dtype."""

    backend: Backend = "auto"
    """`"te"`: Transformer Engine modules (BF16/FP8 fused attention); `"local"`: Megatron's own
    modules; `"auto"`: TE when it imports, local otherwise."""

    fp8_alignment: int = 16
    """Row alignment that FP8 GEMMs need per rank. Headwise gate rows are padded per query group
    to reach it when FP8 is on (the padding never reaches the output)."""

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise GateConfigError(
                f"GateConfig.granularity={self.granularity!r} is unknown; "
                f"use one of {', '.join(GRANULARITIES)}."
            )
        if self.backend not in BACKENDS:
            raise GateConfigError(
                f"GateConfig.backend={self.backend!r} is unknown; use one of {', '.join(BACKENDS)}."
            )
        if not isinstance(self.gate_bias, bool):
            raise GateConfigError(f"GateConfig.gate_bias={self.gate_bias!r} must be True or False.")
        if self.fp8_alignment < 1:
            raise GateConfigError(
                f"GateConfig.fp8_alignment={self.fp8_alignment} must be a positive integer (16 for FP8)."
            )
