"""Safe checkpoint file handling: nothing half-written, nothing overwritten by accident.

- Every output is written to a temporary sibling (`.NAME.partial-<pid>`, as in
  `megatron_gate.output_files`) and renamed into place only when complete; on any error the
  temporary is removed and the old output (if any) stays.
- An existing output is replaced only with `force=True` (`--force` on the command line).
- `torch.load` is only ever called with `weights_only=True` (no pickled code runs).
- Leftovers of a killed run (`.NAME.partial-<pid>` of a dead PID) are removed by the next run
  writing into the same directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_gate.errors import InputError, write_failure_message
from megatron_gate.output_files import partial_path, refused_write, remove


class CheckpointError(InputError):
    """A checkpoint that cannot be read or written as asked; the message names what and why."""


def check_output(path: str | os.PathLike, *, force: bool) -> Path:
    """Raise before any work starts if `path` exists and `force` is off, or if its directory is
    missing or not writable; return it as a Path. Leftovers of killed runs are removed first."""
    path = Path(path)
    if path.exists() and not force:
        raise CheckpointError(
            f"output {path} already exists; pass --force (force=True) to replace it."
        )
    if not path.parent.is_dir():
        raise CheckpointError(f"output directory {path.parent} does not exist; create it first.")
    _probe_writable(path)
    remove_stale_partials(path.parent)
    return path


def check_not_input(source: str | os.PathLike, output: str | os.PathLike) -> None:
    """Raise if `output` is `source` or lies inside it (a forced write would replace the input
    while it is being read)."""
    source, target = Path(source).resolve(), Path(output).resolve()
    if target == source or source in target.parents:
        raise CheckpointError(
            f"output {output} is the input or inside it (output): write to another path."
        )


def _probe_writable(path: Path) -> None:
    """Create and remove a file beside `path` (os.access says yes to root on read-only mounts)."""
    probe = path.with_name(f".{path.name}.probe-{os.getpid()}")
    try:
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise CheckpointError(
            f"output location is not writable ({path.parent}: {error.strerror or error}); "
            "choose a writable output path."
        ) from error


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old|probe)-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(directory: Path) -> list[Path]:
    """Clean up after killed runs in `directory`; return what was removed or restored.

    `.NAME.partial-PID` / `.NAME.probe-PID` of a dead PID are deleted. `.NAME.old-PID` (an output
    set aside while `--force` replaced it) is moved back to NAME when NAME is missing (the run
    died between the two renames), else deleted.
    """
    handled = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return handled
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or _pid_alive(int(match["pid"])):
            continue
        target = directory / match["name"]
        try:
            if match["kind"] == "old" and not (target.exists() or target.is_symlink()):
                entry.rename(target)
            else:
                remove(entry)
        except OSError:
            continue  # another run is cleaning up too, or it is not ours to remove
        handled.append(entry)
    return handled


def commit(partial: Path, path: Path, *, force: bool) -> None:
    """Move a completed `partial` onto `path` (replacing it only when `force`)."""
    if path.exists():
        if not force:
            remove(partial)
            raise CheckpointError(
                f"output {path} appeared while writing; pass --force to replace it."
            )
        # Keep the old output until the new one is in place: rename it aside, then drop it.
        aside = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(aside)
        partial.rename(path)
        remove(aside)
    else:
        partial.rename(path)


def refused_write_error(error: BaseException, path: Path) -> CheckpointError | None:
    """The one-line `CheckpointError` of a write of `path` that the machine refused (a full disk,
    a read-only folder), or None for any other failure."""
    refused = refused_write(error, path.parent)
    return None if refused is None else CheckpointError(write_failure_message(path, refused))


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
    remove(partial)
    try:
        if directory:
            partial.mkdir()
        yield partial
        commit(partial, path, force=force)
    except Exception as error:
        remove(partial)
        refused = refused_write_error(error, path)
        if refused is not None:
            raise refused from error
        raise
    except BaseException:
        remove(partial)
        raise


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in `obj` (nested dicts, lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


def check_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise before writing `needed` bytes beside `path` when its file system has less free."""
    directory = Path(path).parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # unknown: the write itself reports a failure
    if needed > free:
        raise CheckpointError(
            f"output needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free "
            f"({directory}): free some space or choose another output location."
        )


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
    check_free_space(path, tensor_bytes(obj))
    with atomic_output(path, force=force) as partial:
        torch.save(obj, partial)
    return path
