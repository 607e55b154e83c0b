"""Arguments and error reporting shared by the checkpoint commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from megatron_gate.errors import INPUT_ERROR_EXIT, InputError, error_line


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


def report_errors(command: str, action: Callable[[], object]) -> int:
    """Run `action`; print one error line and return 2 for bad input, 0 on success.

    `FileExistsError` and a failed write (`OSError`) count as bad input: the output location is
    the user's choice. Anything else propagates to `megatron_gate.cli` (one line, `--debug`).
    """
    try:
        written = action()
    except (InputError, FileExistsError) as error:
        print(error_line(command, error), file=sys.stderr)
        return INPUT_ERROR_EXIT
    except OSError as error:
        print(error_line(command, f"{error} (output or input file): check the paths and free "
                         "space, then rerun"), file=sys.stderr)  # fmt: skip
        return INPUT_ERROR_EXIT
    print(f"wrote {written}")
    return 0
