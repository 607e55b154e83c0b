"""`megatron-gate reshard IN OUT`: rewrite a Megatron checkpoint as torch_dist (any TP/PP) or as
one full state-dict file, optionally proving it loads at a given TP/PP layout."""

from __future__ import annotations

import argparse

from megatron_gate.checkpoint.cli_common import add_io_arguments, report_errors
from megatron_gate.checkpoint.convert import reshard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megatron-gate reshard`."""
    add_io_arguments(parser)
    parser.add_argument(
        "--check-tp",
        type=int,
        default=None,
        help="after writing, load the torch_dist output at this TP size (gloo, CPU)",
    )
    parser.add_argument("--check-pp", type=int, default=1, help="pipeline size for --check-tp")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Reshard; 0 on success, 2 on bad input (nothing written)."""
    # --check-pp alone asks for a check too; it must not pass silently having checked nothing.
    asked = args.check_tp is not None or args.check_pp != 1
    tp = 1 if args.check_tp is None else args.check_tp
    layout = (tp, args.check_pp) if asked else None
    return report_errors(
        "reshard",
        lambda: reshard(
            args.input,
            args.output,
            megatron_format=args.megatron_format or "torch_dist",
            force=args.force,
            model_config=args.model_config,
            check_layout=layout,
        ),
    )
