"""examples/pretrain_gpt_min.py with injected faults: `MEGATRON_GATE_FAULTS="3:nan,11:1000"`
multiplies the loss of iteration 3 by NaN and of iteration 11 by 1000 (1-based, as Megatron
logs them). For the guard's end-to-end test."""

from __future__ import annotations

import os
from functools import partial

import pretrain_gpt_min as base
import torch
from megatron.core.enums import ModelType
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args


def _faults() -> dict[int, float]:
    items = [
        item.split(":") for item in os.environ.get("MEGATRON_GATE_FAULTS", "").split(",") if item
    ]
    return {int(step): float(factor) for step, factor in items}


def faulty_loss(loss_mask, output_tensor):  # noqa: ANN001, ANN201
    """The standard loss, times the fault factor of this iteration."""
    loss, num_tokens, report = base.loss_func(loss_mask, output_tensor)
    factor = _faults().get(get_args().curr_iteration + 1)
    if factor is None:
        return loss, num_tokens, report
    loss = loss * factor
    reported = report["lm loss"]  # [sum, tokens]: only the sum is scaled
    return loss, num_tokens, {"lm loss": torch.cat([reported[:1] * factor, reported[1:]])}


def forward_step(data_iterator, model):  # noqa: ANN001, ANN201
    output_tensor, loss_func = base.forward_step(data_iterator, model)
    return output_tensor, partial(faulty_loss, loss_func.args[0])


if __name__ == "__main__":
    base.train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(config, base.train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step)  # fmt: skip
