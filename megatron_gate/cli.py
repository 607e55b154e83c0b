"""`megatron-gate COMMAND ...`: the console entry point.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen command's module is imported (Megatron imports are slow).
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; with `command`, that command's arguments are added."""
    parser = argparse.ArgumentParser(prog="megatron-gate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen command; return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage / the error for an unknown command
        return 2
    args = build_parser(command).parse_args(argv)
    return int(importlib.import_module(COMMANDS[command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
