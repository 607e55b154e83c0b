"""An entry script whose model is not megatron.core's GPTModel (a custom class around a
TransformerBlock), so megatron-gate's spec swap cannot reach it: with --gated-attention the run
must stop at start-up instead of training ungated."""

from __future__ import annotations

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.training import get_args, pretrain
from megatron.training.arguments import core_transformer_config_from_args
from pretrain_gpt_min import forward_step, train_valid_test_datasets_provider


class CustomLanguageModel(MegatronModule):
    """Embedding -> TransformerBlock -> tied output projection, built without GPTModel."""

    def __init__(self, config, vocab_size: int) -> None:
        super().__init__(config)
        self.embedding = torch.nn.Embedding(vocab_size, config.hidden_size)
        self.decoder = TransformerBlock(config, get_gpt_layer_local_spec())

    def set_input_tensor(self, input_tensor) -> None:
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, tokens, position_ids, attention_mask, labels=None):
        hidden = self.embedding(tokens).transpose(0, 1)  # [b, s, h] -> [s, b, h]
        hidden = self.decoder(hidden, attention_mask)
        logits = hidden @ self.embedding.weight.t()
        return torch.nn.functional.cross_entropy(
            logits.transpose(0, 1).reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            reduction="none",
        ).view_as(labels)


def model_provider(pre_process=True, post_process=True, vp_stage=None):
    args = get_args()
    return CustomLanguageModel(core_transformer_config_from_args(args), args.vocab_size)


if __name__ == "__main__":
    pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "NullTokenizer"},
    )
