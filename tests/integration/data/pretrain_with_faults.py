"""examples/pretrain_gpt_min.py with injected faults, by 1-based iteration (as Megatron logs):

    MEGATRON_GATE_FAULTS="3:nan,11:1000"          the loss of iteration 3 x NaN, of 11 x 1000
                                                  (every time it is computed: the batch's fault)
    MEGATRON_GATE_FAULTS="4:matmul@1,6:grad@0"    once, on one global rank only (silent data
                                                  corruption): the output layer's matmul output
                                                  x NaN, or an MLP weight's gradient x 1e6
    MEGATRON_GATE_FAULTS="9:weight@0"             a weight of rank 0 set to NaN in memory (stays)

For the guard's and the attribution's end-to-end tests."""

from __future__ import annotations

import os
from functools import partial

import pretrain_gpt_min as base
import torch
from megatron.core.enums import ModelType
from megatron.core.utils import get_attr_wrapped_model
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

FIRED: set[int] = set()


def _faults() -> dict[int, str]:
    items = [
        item.split(":") for item in os.environ.get("MEGATRON_GATE_FAULTS", "").split(",") if item
    ]
    return {int(step): fault for step, fault in items}


def _fault_here(iteration: int) -> str | None:
    """This rank's fault of `iteration`: a loss factor, or a one-time kind (first call only)."""
    fault = _faults().get(iteration)
    if fault is None or "@" not in fault:
        return fault
    kind, rank = fault.split("@")
    if int(rank) != torch.distributed.get_rank() or iteration in FIRED:
        return None
    FIRED.add(iteration)
    return kind


def faulty_loss(factor, loss_mask, output_tensor):  # noqa: ANN001, ANN201
    """The standard loss, times `factor`."""
    loss, num_tokens, report = base.loss_func(loss_mask, output_tensor)
    if factor is None:
        return loss, num_tokens, report
    loss = loss * factor
    reported = report["lm loss"]  # [sum, tokens]: only the sum is scaled
    return loss, num_tokens, {"lm loss": torch.cat([reported[:1] * factor, reported[1:]])}


def _once(module: torch.nn.Module, change) -> None:  # noqa: ANN001
    """`change` the module's next output, once."""

    def hook(_module, _inputs, output):  # noqa: ANN001, ANN202
        handle.remove()
        return (change(output[0]), *output[1:]) if isinstance(output, tuple) else change(output)

    handle = module.register_forward_hook(hook)


def _inject(kind: str, model) -> None:  # noqa: ANN001
    output_layer = get_attr_wrapped_model(model, "output_layer")
    weight = get_attr_wrapped_model(model, "decoder").layers[0].mlp.linear_fc2.weight
    if kind == "matmul":
        _once(output_layer, lambda out: out * float("nan"))
    elif kind == "grad":

        def corrupt(grad):  # noqa: ANN001, ANN202
            handle.remove()
            return grad * 1.0e6

        handle = weight.register_hook(corrupt)
    elif kind == "weight":
        with torch.no_grad():
            weight.view(-1)[0] = float("nan")


def forward_step(data_iterator, model):  # noqa: ANN001, ANN201
    fault = _fault_here(get_args().curr_iteration + 1)
    factor = None
    if fault in ("matmul", "grad", "weight"):
        _inject(fault, model)
    elif fault is not None:
        factor = float(fault)
    output_tensor, loss_func = base.forward_step(data_iterator, model)
    return output_tensor, partial(faulty_loss, factor, loss_func.args[0])


if __name__ == "__main__":
    base.train_valid_test_datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(config, base.train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step)  # fmt: skip
