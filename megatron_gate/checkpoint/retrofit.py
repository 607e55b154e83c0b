"""`retrofit`: a non-gated Megatron GPT checkpoint -> a gated one with identical outputs.

The construction (exact, for both granularities):

    gate rows of linear_qkv = 0          sigmoid(0) = 0.5 for every head and channel
    linear_proj.weight     *= 2          linear_proj(2 W)(0.5 a) = W a

so the first forward of the gated model equals the non-gated model's bit for bit (tested in
fp32; multiplying by 0.5 and 2 only changes exponents, so bf16 behaves the same barring
subnormals). The gate starts "half open" and input-independent, and its gradient is not zero
(dL/d gate = 0.25 * (W_proj^T dL/d out) * a, with the doubled W_proj), so training
moves it away from 0.5 from the first step on; no loss jump at the switch. Biases: `linear_proj`
bias is unchanged, gate bias rows (if `linear_qkv` has a bias) are zero.
Alternatives such as a large positive gate bias (sigmoid ~ 1) are only approximate and need a
bias the paper's gate does not have; hence this choice.

Megatron's native `attention_output_gate=True` checkpoints already have elementwise gate rows in
exactly our layout (`[q | gate | k | v]` per group): they are imported unchanged as elementwise
(`source_gate="native"`); converting them to headwise is refused (not exact).
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_gate.checkpoint.convert import read_megatron, write_megatron
from megatron_gate.checkpoint.model import GptShape
from megatron_gate.checkpoint.safe_io import CheckpointError, check_not_input, check_output

SOURCE_GATES = ("none", "native")


def _gated_qkv(tensor: torch.Tensor, plain: GptShape, gated: GptShape) -> torch.Tensor:
    """Plain fused rows (weight `[rows, h]` or bias `[rows]`) -> gated rows with zero gates."""
    heads = plain.qkv_layout().split_weight(tensor)
    layout = gated.qkv_layout()
    query = heads["query"]
    # gate [np, gate_rows_per_head, ...] of zeros: sigmoid(0) = 0.5 everywhere.
    heads["gate"] = query.new_zeros((query.shape[0], layout.gate_rows_per_head, *query.shape[2:]))
    return layout.fuse_weight(heads)


def retrofit_state_dict(
    state: dict[str, torch.Tensor], shape: GptShape, *, granularity: str
) -> tuple[GptShape, dict[str, torch.Tensor]]:
    """Gate a non-gated full state dict of `shape`; return the gated shape and state dict."""
    if shape.granularity is not None:
        raise CheckpointError(
            f"the checkpoint is already gated (granularity={shape.granularity!r}); retrofit takes "
            "a non-gated model, or source_gate='native' for Megatron's attention_output_gate."
        )
    gated = shape.replace(granularity=granularity)
    out = dict(state)
    for index in range(shape.num_layers):
        prefix = f"decoder.layers.{index}.self_attention."
        for name in ("linear_qkv.weight", "linear_qkv.bias"):
            if prefix + name in state:
                out[prefix + name] = _gated_qkv(state[prefix + name], shape, gated)
        out[prefix + "linear_proj.weight"] = state[prefix + "linear_proj.weight"] * 2
    return gated, out


def retrofit(
    source: str | Path,
    output: str | Path,
    *,
    granularity: str = "elementwise",
    source_gate: str = "none",
    force: bool = False,
    megatron_format: str | None = None,
    model_config: str | Path | None = None,
) -> Path:
    """Write a gated copy of the Megatron checkpoint `source` (see the module docstring).

    `source_gate`: "none" (a plain model: zero gates, doubled `linear_proj`) or "native"
    (Megatron's `attention_output_gate=True`: rows kept, elementwise only). `megatron_format`
    defaults to the input's ("torch_dist" for a directory, "torch" for a file).
    """
    if granularity not in ("elementwise", "headwise"):
        raise CheckpointError(f"--granularity {granularity!r}; use elementwise or headwise.")
    if source_gate not in SOURCE_GATES:
        raise CheckpointError(
            f"--source-gate {source_gate!r}; use one of {', '.join(SOURCE_GATES)}."
        )
    if source_gate == "native" and granularity != "elementwise":
        raise CheckpointError(
            "--source-gate native holds elementwise gates; a headwise model cannot reproduce "
            "them exactly. Use --granularity elementwise."
        )
    check_not_input(source, output)
    check_output(output, force=force)
    megatron_format = megatron_format or ("torch_dist" if Path(source).is_dir() else "torch")
    if source_gate == "native":
        shape, state = read_megatron(
            source, model_config=model_config, shape_changes={"granularity": "elementwise"}
        )
    else:
        plain, state = read_megatron(source, model_config=model_config)
        shape, state = retrofit_state_dict(state, plain, granularity=granularity)
    return write_megatron(output, shape, state, megatron_format=megatron_format, force=force)
