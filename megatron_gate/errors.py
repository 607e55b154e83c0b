"""The one error shape every megatron-gate command prints.

    megatron-gate <command>: error: <what> (<field or file>): <how to fix>

`InputError` is the base of every error a user can fix by changing an input (a flag, a file, a
config key): the command prints its message as one line and exits with `INPUT_ERROR_EXIT` before
any work has started, leaving nothing behind. `OutputError` is the one environment failure a
user fixes the same way: a write the machine refused (a full disk, a read-only or forbidden
folder), named with its path and cause (`output_error`); the writer has removed its partial file
and earlier outputs are intact. Anything else is a bug or an environment failure: one line too,
with the hint to rerun with `--debug` for the traceback.
"""

from __future__ import annotations

import errno
import os

INPUT_ERROR_EXIT = 2
UNEXPECTED_ERROR_EXIT = 1
MAX_MESSAGE_CHARS = 1000
"""Longer messages are cut: an error line must never echo a huge input back."""


class InputError(ValueError):
    """A bad input; the message names what, the field or file, and how to fix it."""


class OutputError(InputError):
    """A write the machine refused (disk full, read-only or forbidden folder); exit 2 as well:
    the output location is the user's choice."""


_WRITE_FIXES = {
    errno.ENOSPC: "free some space or choose another output location",
    errno.EDQUOT: "free some space (disk quota) or choose another output location",
    errno.EROFS: "the file system is read-only: choose a writable output location",
    errno.EACCES: "choose an output location you may write to",
    errno.EPERM: "choose an output location you may write to",
}


def write_failure_message(path: str | os.PathLike, error: BaseException) -> str:
    """`writing the output failed (PATH: CAUSE): FIX` for a refused write of `path`."""
    number = getattr(error, "errno", None)
    cause = getattr(error, "strerror", None) or (os.strerror(number) if number else error)
    fix = _WRITE_FIXES.get(number, "check the output location and free space")
    return (
        f"writing the output failed ({path}: {one_line(cause)[:200]}): {fix} (nothing "
        "half-written is left; earlier outputs are kept)"
    )


def output_error(path: str | os.PathLike, error: BaseException) -> OutputError:
    """The `OutputError` of a refused write of `path` (raise it `from error`)."""
    return OutputError(write_failure_message(path, error))


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
