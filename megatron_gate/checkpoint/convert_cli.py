"""`megatron-gate convert --from hf --to megatron IN OUT`: Hugging Face / paper <-> Megatron."""

from __future__ import annotations

import argparse

from megatron_gate.checkpoint import megatron_dev
from megatron_gate.checkpoint.cli_common import add_io_arguments, report_errors
from megatron_gate.checkpoint.convert import SIDES, convert

# Megatron-LM dev's head_wise_attn_gate checkpoints (<-> megatron only): megatron_dev.py
CLI_SIDES = (*SIDES, megatron_dev.FORMAT)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megatron-gate convert`."""
    parser.add_argument(
        "--from",
        dest="from_format",
        choices=CLI_SIDES,
        required=True,
        help="input kind: hf (Qwen3-Next), paper (authors' gated Qwen3), megatron, "
        "megatron-dev (Megatron-LM dev's head_wise_attn_gate)",
    )
    parser.add_argument(
        "--to",
        dest="to_format",
        choices=CLI_SIDES,
        required=True,
        help="output kind; exactly one of --from/--to is megatron",
    )
    add_io_arguments(parser)
    parser.add_argument("--zero-centered-gamma", action="store_true",
                        help="Megatron side keeps Qwen3-Next's zero-centred norm weights "
                        "(for layernorm_zero_centered_gamma=True / TE); default stores 1 + w")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 2 on bad input (nothing written)."""
    common = {
        "from_format": args.from_format,
        "to_format": args.to_format,
        "force": args.force,
        "megatron_format": args.megatron_format or "torch",
        "model_config": args.model_config,
    }
    if megatron_dev.FORMAT in (args.from_format, args.to_format):
        return report_errors(
            "convert", lambda: megatron_dev.convert_dev(args.input, args.output, **common)
        )
    return report_errors(
        "convert",
        lambda: convert(
            args.input, args.output, zero_centered_gamma=args.zero_centered_gamma, **common
        ),
    )
