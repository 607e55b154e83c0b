"""The one error shape every megatron-gate command prints.

    megatron-gate <command>: error: <what> (<field or file>): <how to fix>

`InputError` is the base of every error a user can fix by changing an input (a flag, a file, a
config key): the command prints its message as one line and exits with `INPUT_ERROR_EXIT` before
any work has started, leaving nothing behind. Anything else is a bug or an environment failure:
one line too, with the hint to rerun with `--debug` for the traceback.
"""

from __future__ import annotations

INPUT_ERROR_EXIT = 2
UNEXPECTED_ERROR_EXIT = 1
MAX_MESSAGE_CHARS = 1000
"""Longer messages are cut: an error line must never echo a huge input back."""


class InputError(ValueError):
    """A bad input; the message names what, the field or file, and how to fix it."""


def one_line(message: object) -> str:
    """`message` with whitespace runs (newlines included) collapsed, cut to `MAX_MESSAGE_CHARS`."""
    text = " ".join(str(message).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def error_line(command: str, message: object) -> str:
    """The line printed for an error of `command`."""
    return f"megatron-gate {command}: error: {one_line(message)}"


def unexpected_error_line(command: str, error: BaseException) -> str:
    """The line printed for an exception that is not an `InputError`."""
    detail = one_line(f"{type(error).__name__}: {error}")
    return error_line(command, f"unexpected {detail} (rerun with --debug for the traceback)")
