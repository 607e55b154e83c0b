"""`megatron-gate convert --from hf --to megatron IN OUT`: Hugging Face / paper <-> Megatron."""

from __future__ import annotations

import argparse

from megatron_gate.checkpoint.cli_common import add_io_arguments, report_errors
from megatron_gate.checkpoint.convert import SIDES, convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megatron-gate convert`."""
    parser.add_argument(
        "--from",
        dest="from_format",
        choices=SIDES,
        required=True,
        help="input kind: hf (Qwen3-Next), paper (authors' gated Qwen3), megatron",
    )
    parser.add_argument(
        "--to",
        dest="to_format",
        choices=SIDES,
        required=True,
        help="output kind; exactly one of --from/--to is megatron",
    )
    add_io_arguments(parser)
    parser.add_argument("--zero-centered-gamma", action="store_true",
                        help="Megatron side keeps Qwen3-Next's zero-centred norm weights "
                        "(for layernorm_zero_centered_gamma=True / TE); default stores 1 + w")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 2 on bad input (nothing written)."""
    return report_errors(
        "convert",
        lambda: convert(
            args.input,
            args.output,
            from_format=args.from_format,
            to_format=args.to_format,
            force=args.force,
            megatron_format=args.megatron_format or "torch",
            zero_centered_gamma=args.zero_centered_gamma,
            model_config=args.model_config,
        ),
    )
