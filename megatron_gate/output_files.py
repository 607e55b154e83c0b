"""Files written whole or not at all (torch-free: the dashboard and the demo report use it too).

    atomic_write(path, lambda partial: torch.save(state, partial))
    atomic_write_text(path, html)

The content goes to a hidden sibling, `.NAME.partial-<pid>`, renamed onto `path` only when
complete. When the machine refuses the write (a full disk, a read-only or forbidden folder) the
partial file is removed, `path` keeps its earlier content, and `OutputError` names the path and
the cause (one line, exit 2, see `megatron_gate.errors`). `checkpoint.safe_io` cleans up the
partial files of killed runs, which carry the same name.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from megatron_gate.errors import InputError, output_error

DISK_FULL_MARGIN = 1 << 20
"""Free bytes below which a failed write that is not an `OSError` counts as a full disk."""


def partial_path(path: Path) -> Path:
    """The temporary sibling that `path` is written to before the rename."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def remove(path: Path) -> None:
    """Delete a file or a folder tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def disk_nearly_full(directory: Path) -> bool:
    """Whether `directory`'s file system has less than `DISK_FULL_MARGIN` free bytes."""
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_MARGIN
    except OSError:
        return False


_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def refused_write(error: BaseException, directory: Path) -> OSError | None:
    """The `OSError` behind a failed write, or None when the failure is not the machine's.

    Libraries wrap the refusal: Megatron's checkpoint writer raises its own exception from the
    `OSError`, torch.save's zip writer a `RuntimeError` that keeps no errno; the latter counts as
    `ENOSPC` when the disk is indeed (nearly) full."""
    if isinstance(error, OSError):
        return error
    if isinstance(error, InputError):
        return None  # already one line of its own
    cause = error.__cause__ or error.__context__
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _REFUSALS:
            return cause
        cause = cause.__cause__ or cause.__context__
    if isinstance(error, Exception) and disk_nearly_full(directory):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """`write(partial)`, then rename `partial` onto `path`; see the module docstring."""
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException as error:
        remove(partial)
        refused = refused_write(error, path.parent)
        if refused is not None:
            raise output_error(path, refused) from error
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, make_folder: bool = False) -> Path:
    """Write `text` (UTF-8) to `path` whole or not at all (`make_folder`: create its folder)."""
    if make_folder:
        make_folders(Path(path).parent)
    return atomic_write(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def make_folders(folder: str | os.PathLike) -> Path:
    """`mkdir -p folder`; `OutputError` when the machine refuses it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(folder, error) from error
    return folder


def append_whole(fd: int, data: bytes, *, path: str | os.PathLike) -> None:
    """Append `data` with one `os.write` on an `O_APPEND` descriptor, whole or not at all.

    A write the machine refuses raises `OutputError`; a short one (the disk filled up during
    it) is cut back first, so that readers never meet a torn last line."""
    try:
        written = os.write(fd, data)
    except OSError as error:
        raise output_error(path, error) from error
    if written < len(data):
        os.ftruncate(fd, os.fstat(fd).st_size - written)
        raise output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))


def open_for_append(path: str | os.PathLike) -> int:
    """An `O_APPEND` descriptor of `path` (created, with its folder); `OutputError` if refused."""
    path = Path(path)
    make_folders(path.parent)
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as error:
        raise output_error(path, error) from error
