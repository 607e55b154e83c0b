"""Arguments and error reporting shared by the checkpoint commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from megatron_gate.checkpoint.safe_io import CheckpointError
from megatron_gate.config import GateConfigError


def add_io_arguments(parser: argparse.ArgumentParser) -> None:
    """INPUT, OUTPUT, --force, --model-config, --megatron-format."""
    parser.add_argument("input", help="input checkpoint (file or directory)")
    parser.add_argument("output", help="output path; must not exist unless --force")
    parser.add_argument("--force", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--model-config",
        default=None,
        help="GptShape JSON of a Megatron input without megatron_gate_model.json "
        "(fields: see docs/checkpoints.md)",
    )
    parser.add_argument(
        "--megatron-format",
        choices=("torch", "torch_dist"),
        default=None,
        help="Megatron output: 'torch' (one full state-dict file) or 'torch_dist' "
        "(Megatron-LM checkpoint directory, loadable at any TP/PP)",
    )


def report_errors(action: Callable[[], object]) -> int:
    """Run `action`; print a clear one-line error and return 2 for bad input, 0 on success."""
    try:
        written = action()
    except (CheckpointError, GateConfigError, FileExistsError) as error:
        print(f"megatron-gate: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0
