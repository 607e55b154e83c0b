"""`megatron-gate COMMAND ...`: the console entry point.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen command's module is imported (Megatron imports are slow). Errors follow
`megatron_gate.errors`: one line, exit 2 for bad input, `--debug` for an unexpected traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from megatron_gate.errors import (
    INPUT_ERROR_EXIT,
    UNEXPECTED_ERROR_EXIT,
    InputError,
    error_line,
    one_line,
    unexpected_error_line,
)

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("megatron_gate.demo.cli", "train baseline and gated GPTs under an aggressive LR"),
    "sweep": ("megatron_gate.demo.sweep", "learning-rate sensitivity sweep (Wortsman et al.)"),
    "convert": ("megatron_gate.checkpoint.convert_cli", "convert Hugging Face <-> Megatron"),
    "retrofit": ("megatron_gate.checkpoint.retrofit_cli", "add gates to a non-gated checkpoint"),
    "reshard": ("megatron_gate.checkpoint.reshard_cli", "reshard a distributed checkpoint"),
    "dashboard": ("megatron_gate.dashboard.cli", "live stability dashboard for run directories"),
    "watch": ("megatron_gate.dashboard.watch", "live terminal view of run directories (over ssh)"),
    "info": ("megatron_gate.info", "versions, backends and what megatron-gate can use here"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as the one error line (no usage block), exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(INPUT_ERROR_EXIT)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with `command`, that command's arguments are added."""
    parser = OneLineParser(prog="megatron-gate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
            sub.add_argument(
                "--debug", action="store_true", help="show the traceback of an unexpected error"
            )
    return parser


def run_command(command: str, args: argparse.Namespace) -> int:
    """Run `command`; an `InputError` or unexpected exception becomes one line on stderr."""
    try:
        return int(importlib.import_module(COMMANDS[command][0]).run(args) or 0)
    except InputError as error:
        print(error_line(command, error), file=sys.stderr)
        return INPUT_ERROR_EXIT
    except KeyboardInterrupt:
        print(error_line(command, "interrupted (Ctrl-C)"), file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            raise
        print(unexpected_error_line(command, error), file=sys.stderr)
        return UNEXPECTED_ERROR_EXIT


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage / the error for an unknown command
        return INPUT_ERROR_EXIT
    args = build_parser(command).parse_args(argv)
    return run_command(command, args)


if __name__ == "__main__":
    sys.exit(main())
