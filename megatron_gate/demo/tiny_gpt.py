"""Small Megatron-Core GPT models for tests, benchmarks and the demo (CPU-friendly defaults)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig


def tiny_config(**overrides: Any) -> TransformerConfig:
    """A small fp32 `TransformerConfig`: 2 layers, hidden 64, 4 heads, 2 query groups, no dropout,
    no linear biases (as in Qwen/Llama-style models)."""
    fields: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        hidden_dropout=0.0,
        add_bias_linear=False,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_gpt(
    config: TransformerConfig,
    layer_spec: ModuleSpec,
    *,
    vocab_size: int = 256,
    max_sequence_length: int = 64,
    pre_process: bool = True,
    post_process: bool = True,
    position_embedding_type: str = "rope",
) -> torch.nn.Module:
    """A `GPTModel` with `layer_spec` (gated or not) on this pipeline stage."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=position_embedding_type,
    )


def causal_mask(seq_len: int) -> torch.Tensor:
    """Megatron's boolean attention mask `[1, 1, s, s]`: True where a query must not attend."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)[None, None]


def position_ids(batch: int, seq_len: int) -> torch.Tensor:
    """`[b, s]` positions 0..s-1."""
    return torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len)


def random_batch(
    *, batch: int, seq_len: int, vocab_size: int, seed: int = 0, with_labels: bool = True
) -> dict[str, Any]:
    """GPTModel keyword arguments for a random batch with an explicit causal mask.

    With labels (next tokens) the model returns per-token losses; without, logits.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    kwargs = {
        "input_ids": tokens,
        "position_ids": position_ids(batch, seq_len),
        "attention_mask": causal_mask(seq_len),
    }
    if with_labels:
        kwargs["labels"] = torch.roll(tokens, -1, dims=1)
    return kwargs


def run_pipeline(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    loss_fn: Any,
    forward_only: bool = False,
) -> list[dict[str, Any]]:
    """One microbatch through Megatron's pipeline schedule (any PP size) on this stage's `model`.

    `loss_fn(output) -> (loss, {name: tensor})` runs on the last stage; its dicts are returned.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Any, chunk: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        return chunk(**next(data_iterator)), loss_fn

    tokens = batch["input_ids"]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=forward_only,
    )
