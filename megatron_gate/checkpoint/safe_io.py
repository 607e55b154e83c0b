"""Safe checkpoint file handling: nothing half-written, nothing overwritten by accident.

- Every output is written to a temporary sibling (`.NAME.partial-<pid>`) and renamed into place
  only when complete; on any error the temporary is removed and the old output (if any) stays.
- An existing output is replaced only with `force=True` (`--force` on the command line).
- `torch.load` is only ever called with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names what and why."""


def check_output(path: str | os.PathLike, *, force: bool) -> Path:
    """Raise before any work starts if `path` exists and `force` is off; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(
            f"output {path} already exists; pass --force (force=True) to replace it."
        )
    if not path.parent.exists():
        raise CheckpointError(f"output directory {path.parent} does not exist; create it first.")
    return path


def partial_path(path: Path) -> Path:
    """The temporary sibling that `path` is written to before the rename."""
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(partial: Path, path: Path, *, force: bool) -> None:
    """Move a completed `partial` onto `path` (replacing it only when `force`)."""
    if path.exists():
        if not force:
            _remove(partial)
            raise CheckpointError(
                f"output {path} appeared while writing; pass --force to replace it."
            )
        # Keep the old output until the new one is in place: rename it aside, then drop it.
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(aside)
        partial.rename(path)
        _remove(aside)
    else:
        partial.rename(path)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, force: bool, directory: bool = False
) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; rename it into place on success.

    With `directory=True` the temporary is created as an empty directory. On an exception the
    temporary is deleted and `path` is left as it was.
    """
    path = check_output(path, force=force)
    partial = partial_path(path)
    _remove(partial)
    if directory:
        partial.mkdir()
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    commit(partial, path, force=force)


def load_torch(path: str | os.PathLike) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with a clear error for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ...
        raise CheckpointError(
            f"{path} cannot be read with torch.load(weights_only=True): {error}"
        ) from error


def save_torch(obj: Any, path: str | os.PathLike, *, force: bool) -> Path:
    """`torch.save(obj)` to `path` atomically; refuses to replace `path` unless `force`."""
    path = Path(path)
    with atomic_output(path, force=force) as partial:
        torch.save(obj, partial)
    return path
