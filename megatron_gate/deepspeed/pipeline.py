"""Gated attention as layers of a DeepSpeed `PipelineModule` (Megatron-DeepSpeed-style pipelines).

A pipeline is a flat list of layers that hand one tensor to the next:

    EmbeddingPipe              tokens [b, s] -> hidden [s, b, h]
    GatedTransformerLayerPipe  hidden -> hidden   (Megatron-Core TransformerLayer, gated attention)
    ... x num_layers
    OutputPipe                 hidden -> logits [b, s, v]
    loss_fn(logits, labels)

Each transformer layer is Megatron-Core's own `TransformerLayer` built from
`gated_gpt_layer_spec`, so it is the same module (and checkpoint layout) as in a Megatron-LM run.
Megatron's parallel state must be initialised (tensor-parallel size 1 here: DeepSpeed owns the
pipeline and data parallelism).
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gate.config import GateConfig
from megatron_gate.spec import gated_gpt_layer_spec


def _causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """`[1, 1, s, s]`, True above the diagonal (positions a query must not attend to)."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)[None, None]


class EmbeddingPipe(torch.nn.Module):
    """Token and learned position embeddings: `[b, s]` token ids -> `[s, b, h]`."""

    def __init__(self, config: TransformerConfig, *, vocab_size: int, seq_length: int) -> None:
        super().__init__()
        self.embedding = LanguageModelEmbedding(
            config, vocab_size=vocab_size, max_sequence_length=seq_length
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.embedding(tokens, positions)


class GatedTransformerLayerPipe(torch.nn.Module):
    """One Megatron-Core `TransformerLayer` with gated self-attention: `[s, b, h] -> [s, b, h]`."""

    def __init__(self, config: TransformerConfig, *, layer_number: int, gate: GateConfig) -> None:
        super().__init__()
        spec = gated_gpt_layer_spec(gate_config=gate)
        self.layer = build_module(spec, config=config, layer_number=layer_number)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        output, _context = self.layer(
            hidden, attention_mask=_causal_mask(hidden.shape[0], hidden.device)
        )
        return output


class OutputPipe(torch.nn.Module):
    """Final norm and the output projection: `[s, b, h] -> [b, s, v]` logits."""

    def __init__(self, config: TransformerConfig, *, vocab_size: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.head = torch.nn.Linear(config.hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)).transpose(0, 1).contiguous()


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy: logits `[b, s, v]`, labels `[b, s]`."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def gated_gpt_pipeline(
    config: TransformerConfig,
    *,
    vocab_size: int,
    seq_length: int,
    gate: GateConfig,
    num_stages: int,
    partition_method: str = "type:GatedTransformerLayerPipe",
):
    """A DeepSpeed `PipelineModule` of a GPT whose every attention layer is gated.

    `partition_method` defaults to balancing the transformer layers across the stages.
    """
    from deepspeed.pipe import LayerSpec, PipelineModule

    layers = [LayerSpec(EmbeddingPipe, config, vocab_size=vocab_size, seq_length=seq_length)]
    layers += [
        LayerSpec(GatedTransformerLayerPipe, config, layer_number=number, gate=gate)
        for number in range(1, config.num_layers + 1)
    ]
    layers.append(LayerSpec(OutputPipe, config, vocab_size=vocab_size))
    pipeline = PipelineModule(
        layers=layers,
        num_stages=num_stages,
        loss_fn=language_model_loss,
        partition_method=partition_method,
    )
    # Every stage holds some layers; the monitor (and any reader) learns the total from here.
    pipeline.config = config
    return pipeline
