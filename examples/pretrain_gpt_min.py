"""A minimal GPT pre-training entry point for Megatron-LM 0.19 (the config-container API).

It has the shape of Megatron-LM's own `pretrain_gpt.py` (parse args, build a `GPTModelConfig` and
a `PretrainConfigContainer`, call `pretrain`) without its many options: mock or indexed data,
the standard masked LM loss. It does not import megatron-gate: launch it through
`python -m megatron_gate.run examples/pretrain_gpt_min.py ... --gated-attention headwise`,
exactly as you would launch your own `pretrain_gpt.py`.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import mpu, tensor_parallel
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.enums import ModelType
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

_INT_KEYS = ("tokens", "labels", "position_ids")


def get_batch(data_iterator) -> tuple[torch.Tensor, ...]:
    """Tokens, labels, loss mask, causal attention mask and positions of one micro-batch.

    TP rank 0 reads the data; the other ranks of its tensor-parallel group receive a copy.
    """
    batch = next(data_iterator) if mpu.get_tensor_model_parallel_rank() == 0 else None
    ints = tensor_parallel.broadcast_data(_INT_KEYS, batch, torch.int64)
    loss_mask = tensor_parallel.broadcast_data(("loss_mask",), batch, torch.float32)["loss_mask"]
    seq_length = ints["tokens"].shape[1]
    # [1, 1, s, s], True above the diagonal: a query must not attend to later positions.
    attention_mask = torch.ones(seq_length, seq_length, dtype=torch.bool).triu(1)[None, None]
    return ints["tokens"], ints["labels"], loss_mask, attention_mask.cuda(), ints["position_ids"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token loss, the number of tokens, and the `lm loss` report Megatron logs."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    return (
        loss,
        num_tokens,
        {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])},
    )


def forward_step(data_iterator, model):
    """One forward pass; Megatron's schedule calls the returned loss function on its output."""
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def dataset_config(args) -> GPTDatasetConfig:
    """GPT dataset settings from the parsed arguments."""
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        tokenizer=build_tokenizer(args),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Build the train, validation and test datasets (on TP rank 0 only)."""
    args = get_args()
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0,
        dataset_config(args),
    ).build()


if __name__ == "__main__":
    train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(config, train_valid_test_datasets_provider, ModelType.encoder_or_decoder, forward_step)
