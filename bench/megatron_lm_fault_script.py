"""A GPT pre-training script for Megatron-LM 0.19's own loop, with one injected fault.

    python -m megatron_gate.run bench/megatron_lm_fault_script.py <Megatron-LM flags> \\
        --trace-fault lr_jump --trace-fault-step 400 --trace-corpus-seed 0

Launched through `megatron_gate.run` (CPU runtime, gloo, the stability monitor) by
bench/megatron_lm_traces.py. The data is the demo's byte-level text corpus (Python's stdlib
sources, `megatron_gate.demo.data.embedded_corpus`): sample i is a window at a seeded random
offset, so every run sees real, noisy text. The fault (1-based iteration, as Megatron logs it):

- nan_batch: the loss of every micro-batch of the step times NaN (the guard skips the update);
- corrupted_batch: uniformly random tokens and labels for the whole step;
- lr_jump: the scheduler's learning rate x `--trace-fault-factor` for `--trace-fault-length` steps;
- scaled_weight: layer 1's MLP input weight x `--trace-fault-factor`, once, before the forward;
- bitflip_weight: the top exponent bit (bit 30) of one query weight of layer 1 flipped, once.
"""

from __future__ import annotations

import argparse
import struct
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from megatron.core import mpu, tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import gpt_config_from_args, pretrain_cfg_container_from_args
from megatron.training.arguments import parse_and_validate_args

FAULTS = ("nan_batch", "corrupted_batch", "lr_jump", "scaled_weight", "bitflip_weight")
BYTE_VOCAB = 256
FLIPPED_BIT = 30  # the top exponent bit of a float32: |w| < 2 becomes |w| x 2^128
_INT_KEYS = ("tokens", "labels", "position_ids")


@dataclass(frozen=True, kw_only=True)
class Fault:
    """The fault of this run (kind None: a healthy run)."""

    kind: str | None = None
    step: int = 0
    length: int = 1
    factor: float = 1.0
    corpus_seed: int = 0

    def active(self, iteration: int) -> bool:
        return self.kind is not None and self.step <= iteration < self.step + self.length


FAULT = Fault()
_INJECTED: set[int] = set()  # iterations whose one-off weight fault is done


def parse_fault(argv: list[str]) -> tuple[Fault, list[str]]:
    """This script's own flags from `argv`; the rest is left for Megatron's parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--trace-fault", choices=FAULTS, default=None)
    parser.add_argument("--trace-fault-step", type=int, default=0)
    parser.add_argument("--trace-fault-length", type=int, default=1)
    parser.add_argument("--trace-fault-factor", type=float, default=1.0)
    parser.add_argument("--trace-corpus-seed", type=int, default=0)
    ours, rest = parser.parse_known_args(argv)
    fault = Fault(kind=ours.trace_fault, step=ours.trace_fault_step,
                  length=ours.trace_fault_length if ours.trace_fault == "lr_jump" else 1,
                  factor=ours.trace_fault_factor, corpus_seed=ours.trace_corpus_seed)  # fmt: skip
    return fault, rest


def current_iteration() -> int:
    """The 1-based iteration Megatron is running (its logs' numbering)."""
    return int(getattr(get_args(), "curr_iteration", 0)) + 1


# ---------------------------------------------------------------------- data
class TextWindows(torch.utils.data.Dataset):
    """`num_samples` windows of `seq_length + 1` bytes at seeded random offsets of `stream`."""

    def __init__(self, stream: torch.Tensor, *, num_samples: int, seq_length: int, seed: int):
        self.stream = stream
        self.seq_length = seq_length
        rng = np.random.default_rng(seed)
        self.offsets = rng.integers(0, stream.numel() - seq_length - 1, size=num_samples)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.offsets[index])
        window = self.stream[start : start + self.seq_length + 1]  # [s + 1]
        return {
            "tokens": window[:-1].clone(),
            "labels": window[1:].clone(),
            "loss_mask": torch.ones(self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.int64),
        }


def datasets_provider(train_val_test_num_samples: list[int], vp_stage: int | None = None):
    """Training windows of the embedded corpus; no validation or test set (`--eval-iters 0`)."""
    from megatron_gate.demo.data import embedded_corpus

    args = get_args()
    windows = TextWindows(embedded_corpus().train, num_samples=train_val_test_num_samples[0],
                          seq_length=args.seq_length, seed=FAULT.corpus_seed)  # fmt: skip
    return windows, None, None


# ---------------------------------------------------------------------- faults
def _corrupt(tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    noise = torch.Generator().manual_seed(FAULT.corpus_seed * 7919 + current_iteration())
    return (torch.randint(0, BYTE_VOCAB, tokens.shape, generator=noise),
            torch.randint(0, BYTE_VOCAB, labels.shape, generator=noise))  # fmt: skip


def _flip_bit(weight: torch.Tensor, index: int) -> None:
    flat = weight.data.view(-1)
    (bits,) = struct.unpack("<I", struct.pack("<f", float(flat[index])))
    (flipped,) = struct.unpack("<f", struct.pack("<I", bits ^ (1 << FLIPPED_BIT)))
    flat[index] = flipped


def _parameter(model: torch.nn.Module, suffix: str) -> torch.Tensor:
    for name, parameter in model.named_parameters():
        if name.endswith(suffix):
            return parameter
    raise KeyError(f"no parameter named *{suffix}")


@torch.no_grad()
def inject_weight_fault(model: torch.nn.Module) -> None:
    """Scale or bit-flip one weight of layer 1 in place, once, at the fault step."""
    if FAULT.kind not in ("scaled_weight", "bitflip_weight") or not FAULT.active(
        current_iteration()
    ):
        return
    if current_iteration() in _INJECTED:  # once per step, not once per micro-batch
        return
    _INJECTED.add(current_iteration())
    if FAULT.kind == "scaled_weight":
        _parameter(model, "decoder.layers.0.mlp.linear_fc1.weight").mul_(FAULT.factor)
    else:  # linear_qkv rows: [q heads | k | v] per query group; element 5 of row 3 is a query
        weight = _parameter(model, "decoder.layers.0.self_attention.linear_qkv.weight")
        _flip_bit(weight, 3 * weight.shape[1] + 5)


def install_lr_jump() -> None:
    """Multiply the lr Megatron's scheduler sets for the iterations of an lr_jump."""
    original = OptimizerParamScheduler.get_lr

    def get_lr(self: OptimizerParamScheduler, param_group: dict) -> float:
        # The scheduler steps at the end of iteration n and sets the lr of iteration n + 1.
        args = get_args()
        upcoming = int(getattr(args, "curr_iteration", -1)) + 2
        lr = original(self, param_group)
        return lr * FAULT.factor if FAULT.active(upcoming) else lr

    OptimizerParamScheduler.get_lr = get_lr


# ---------------------------------------------------------------------- forward step
def get_batch(data_iterator: Any) -> tuple[torch.Tensor, ...]:
    """Tokens, labels, loss mask, causal mask, positions; TP rank 0 reads, the others get a copy."""
    batch = next(data_iterator) if mpu.get_tensor_model_parallel_rank() == 0 else None
    ints = tensor_parallel.broadcast_data(_INT_KEYS, batch, torch.int64)
    loss_mask = tensor_parallel.broadcast_data(("loss_mask",), batch, torch.float32)["loss_mask"]
    tokens, labels = ints["tokens"], ints["labels"]
    if FAULT.kind == "corrupted_batch" and FAULT.active(current_iteration()):
        tokens, labels = _corrupt(tokens, labels)
    length = tokens.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)[None, None]  # [1, 1, s, s]
    return tokens, labels, loss_mask, causal.cuda(), ints["position_ids"]


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor) -> tuple[Any, ...]:
    """Summed token loss, token count, and `lm loss` [sum, tokens] (NaN on a nan_batch step)."""
    mask = loss_mask.view(-1).float()
    total = torch.sum(output_tensor.view(-1).float() * mask)
    if FAULT.kind == "nan_batch" and FAULT.active(current_iteration()):
        total = total * float("nan")
    tokens = mask.sum().detach().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.float()])}


def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    inject_weight_fault(model)
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator)
    output_tensor = model(tokens, position_ids, attention_mask, labels=labels)
    return output_tensor, partial(loss_func, loss_mask)


def main() -> None:
    global FAULT
    FAULT, sys.argv[1:] = parse_fault(sys.argv[1:])
    if FAULT.kind == "lr_jump":
        install_lr_jump()
    datasets_provider.is_distributed = True
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "NullTokenizer"})
    config = pretrain_cfg_container_from_args(args, gpt_config_from_args(args))
    pretrain(config, datasets_provider, ModelType.encoder_or_decoder, forward_step)


if __name__ == "__main__":
    main()
