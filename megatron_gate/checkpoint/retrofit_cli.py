"""`megatron-gate retrofit IN OUT`: gate a non-gated Megatron checkpoint with identical outputs."""

from __future__ import annotations

import argparse

from megatron_gate.checkpoint.cli_common import add_io_arguments, report_errors
from megatron_gate.checkpoint.retrofit import SOURCE_GATES, retrofit


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megatron-gate retrofit`."""
    add_io_arguments(parser)
    parser.add_argument("--granularity", choices=("elementwise", "headwise"), default="elementwise")
    parser.add_argument("--source-gate", choices=SOURCE_GATES, default="none",
                        help="none: plain model (zero gates, linear_proj x2); native: Megatron's "
                        "attention_output_gate=True checkpoint (rows kept as elementwise)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Retrofit; 0 on success, 2 on bad input (nothing written)."""
    return report_errors(
        "retrofit",
        lambda: retrofit(
            args.input,
            args.output,
            granularity=args.granularity,
            source_gate=args.source_gate,
            force=args.force,
            megatron_format=args.megatron_format,
            model_config=args.model_config,
        ),
    )
