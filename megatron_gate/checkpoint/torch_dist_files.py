"""Vetting a torch_dist checkpoint directory before torch or Megatron reads it.

torch's distributed-checkpoint reader unpickles `.metadata` with plain `pickle`, and its default
load planner unpickles every non-tensor entry of the `.distcp` files (Megatron's `_extra_state`
and `common_state` objects) with `torch.load(weights_only=False)`; Megatron's legacy `common.pt`
is read with `torch.load`'s default (weights-only only from torch 2.6). A crafted checkpoint can
therefore run code the moment it is loaded. `vet_torch_dist_dir` reads those same bytes first:

- `.metadata` with `MetadataUnpickler`, which resolves only the classes on `ALLOWED_GLOBALS`
  (torch.distributed.checkpoint's metadata and plan dataclasses, `torch.Size`, dtypes);
- every byte entry the metadata lists, and `common.pt`, with `torch.load(weights_only=True)`;
- every storage reference: a plain file name inside the directory, with its byte range inside
  the file (a truncated `.distcp` is reported here rather than as a traceback later).

Anything else is refused with a `CheckpointError` naming the file. The check runs before any
reader touches the directory; a file swapped between the check and the read is out of scope
(the directory is the user's own input, not a shared location).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from megatron_gate.checkpoint.safe_io import CheckpointError

METADATA_FILE = ".metadata"
LEGACY_COMMON_FILE = "common.pt"
MAX_METADATA_BYTES = 1 << 30
"""`.metadata` larger than this is refused before unpickling (it is KBs to a few MBs in practice)."""
MAX_OBJECT_BYTES = 1 << 28
"""A pickled (non-tensor) entry larger than this is refused before it is read."""

_DCP = "torch.distributed.checkpoint"
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        *(
            (f"{_DCP}.metadata", name)
            for name in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "TensorProperties",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        *(
            (f"{_DCP}.planner", name)
            for name in (
                "SavePlan",
                "LoadPlan",
                "WriteItem",
                "ReadItem",
                "WriteItemType",
                "LoadItemType",
                "TensorWriteData",
                "BytesIOWriteData",
            )
        ),
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }
)
"""(module, name) pairs `.metadata` may refer to; plus `torch.<dtype>` attributes."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only torch.distributed.checkpoint metadata (see the module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"{module}.{name} is not a torch.distributed.checkpoint metadata class"
        )


def read_metadata(checkpoint_dir: Path) -> Any:
    """The `Metadata` of `checkpoint_dir/.metadata`, unpickled with the allow-list only."""
    path = checkpoint_dir / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(
            f"torch_dist metadata is missing ({path}): pass a complete torch_dist checkpoint."
        )
    if path.stat().st_size > MAX_METADATA_BYTES:
        raise CheckpointError(
            f"torch_dist metadata is larger than {MAX_METADATA_BYTES >> 20} MiB ({path}): "
            "refused; pass a checkpoint written by Megatron or megatron-gate."
        )
    try:
        with path.open("rb") as stream:
            metadata = MetadataUnpickler(stream).load()
    except Exception as error:  # noqa: BLE001 - any failure of a hostile or damaged file
        raise CheckpointError(
            f"torch_dist metadata cannot be read safely ({path}): {_first_line(error)}; "
            "pass a checkpoint written by Megatron or megatron-gate."
        ) from error
    _check_structure(metadata, path)
    return metadata


def _check_structure(metadata: Any, path: Path) -> None:
    """Raise unless `metadata` has the shape torch's reader relies on (an allow-listed pickle can
    still build objects with missing or wrongly typed fields)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    valid = (
        isinstance(metadata, Metadata)
        and isinstance(entries, dict)
        and isinstance(storage, dict)
        and all(
            isinstance(key, str)
            and isinstance(value, (TensorStorageMetadata, BytesStorageMetadata))
            for key, value in entries.items()
        )
        and all(
            isinstance(index, MetadataIndex)
            and isinstance(getattr(index, "fqn", None), str)
            and isinstance(info, _StorageInfo)
            for index, info in storage.items()
        )
    )
    if not valid:
        raise CheckpointError(
            f"torch_dist metadata is not a checkpoint index ({path}): pass a complete checkpoint "
            "written by Megatron or megatron-gate."
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def _storage_file(checkpoint_dir: Path, info: Any) -> Path:
    """The data file `info` points at; a name that leaves the directory is refused."""
    name = getattr(info, "relative_path", None)
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise CheckpointError(
            f"torch_dist metadata names a data file outside the checkpoint ({name!r} in "
            f"{checkpoint_dir / METADATA_FILE}): refused."
        )
    return checkpoint_dir / name


def _check_range(checkpoint_dir: Path, info: Any, sizes: dict[Path, int]) -> Path:
    """Raise unless `info`'s byte range lies inside its (existing) data file."""
    path = _storage_file(checkpoint_dir, info)
    if path not in sizes:
        if not path.is_file():
            raise CheckpointError(
                f"torch_dist data file is missing ({path}): copy the complete checkpoint."
            )
        sizes[path] = path.stat().st_size
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    transforms = getattr(info, "transform_descriptors", None)
    if transforms is not None and not isinstance(transforms, (list, tuple)):
        offset = None  # reported below as damaged
    valid = all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, length))
    if not valid or offset < 0 or length < 0 or offset + length > sizes[path]:
        raise CheckpointError(
            f"torch_dist data file is truncated or damaged ({path}: entry at {offset}+{length}, "
            f"file has {sizes[path]} bytes): copy the complete checkpoint again."
        )
    return path


def _check_object(path: Path, info: Any, fqn: str) -> None:
    """Unpickle one non-tensor entry weights-only, as the default planner would not."""
    if getattr(info, "transform_descriptors", None):
        raise CheckpointError(
            f"torch_dist entry {fqn} is stored with transforms {list(info.transform_descriptors)} "
            f"({path}): only plain entries are read; re-save the checkpoint without them."
        )
    if info.length > MAX_OBJECT_BYTES:
        raise CheckpointError(
            f"torch_dist entry {fqn} is larger than {MAX_OBJECT_BYTES >> 20} MiB ({path}): refused."
        )
    with path.open("rb") as stream:
        stream.seek(info.offset)
        data = stream.read(info.length)
    _load_weights_only(io.BytesIO(data), f"entry {fqn} of {path}")


def _load_weights_only(source: Any, what: str) -> Any:
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"torch_dist {what} cannot be read with torch.load(weights_only=True): "
            f"{_first_line(error)}; refused (it may hold code)."
        ) from error


def vet_torch_dist_dir(checkpoint_dir: str | Path) -> None:
    """Raise a `CheckpointError` unless every pickled part of `checkpoint_dir` is plain data.

    Reads `.metadata` (allow-listed classes only), checks every storage reference, and loads
    every non-tensor entry and a legacy `common.pt` with `weights_only=True`.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    checkpoint_dir = Path(checkpoint_dir)
    metadata = read_metadata(checkpoint_dir)
    entries = metadata.state_dict_metadata
    sizes: dict[Path, int] = {}
    for index, info in metadata.storage_data.items():
        path = _check_range(checkpoint_dir, info, sizes)
        fqn = getattr(index, "fqn", None)
        if isinstance(entries.get(fqn), BytesStorageMetadata):
            _check_object(path, info, str(fqn))
    common = checkpoint_dir / LEGACY_COMMON_FILE
    if common.exists():
        _load_weights_only(common, f"file {common}")
