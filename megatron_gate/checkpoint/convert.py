"""`convert`: Hugging Face Qwen3-Next or the paper's Qwen3 <-> Megatron gated GPT checkpoints.

Formats on disk:
- `hf` / `paper`: a Hugging Face model directory, `config.json` + `model.safetensors` (read also
  as `model.safetensors.index.json` + shards; written as one file).
- `megatron`, `--megatron-format torch` (default): one file `torch.save`d with
  `{"format": FULL_FORMAT, "model_config": GptShape dict, "model": full TP=1/PP=1 state dict}`,
  keys as `GPTModel.state_dict()` with Megatron's local modules.
- `megatron`, `--megatron-format torch_dist`: a Megatron-LM checkpoint directory
  (`latest_checkpointed_iteration.txt` = release, `release/` torch_dist) loadable at any TP/PP,
  plus `megatron_gate_model.json` (see `megatron_gate.checkpoint.reshard`, the module below
  this one).

`reshard` rewrites a Megatron checkpoint between those two Megatron formats.

Every input is validated (config, tensor names and shapes) before anything is written; outputs
go to a temporary path renamed at the end; an existing output needs `force=True`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_gate.checkpoint import hf_qwen3_next, paper_qwen3
from megatron_gate.checkpoint.model import GptShape, check_full_state_dict, read_json_object
from megatron_gate.checkpoint.reshard import (
    check_layout_fits,
    check_layout_request,
    load_distributed,
    read_shape,
    resolve_checkpoint_dir,
    verify_loadable,
    write_distributed,
)
from megatron_gate.checkpoint.safe_io import (
    CheckpointError,
    atomic_output,
    check_free_space,
    check_not_input,
    check_output,
    load_torch,
    save_torch,
    tensor_bytes,
)

FULL_FORMAT = "megatron-gate/full-state-dict/1"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
SIDES = ("hf", "paper", "megatron")
MEGATRON_FORMATS = ("torch", "torch_dist")


# ------------------------------------------------------------------ Hugging Face directories
def read_hf_dir(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(config.json dict, tensors)` of a Hugging Face model directory (safetensors only)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model directory.")
    config = read_json_object(config_file, what="config.json")
    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        tensors.update(_load_safetensors(file))
    return config, tensors


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or the shards its index names."""
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    index = path / HF_INDEX
    if not index.is_file():
        raise CheckpointError(
            f"{path} has neither {HF_WEIGHTS} nor {HF_INDEX}; only safetensors checkpoints convert."
        )
    weight_map = read_json_object(index, what="safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"safetensors index has no weight_map object ({index}): regenerate the index "
            '(it maps every tensor name to its shard: {"weight_map": {"name": "file"}}).'
        )
    names = sorted({str(name) for name in weight_map.values()})
    for name in names:
        if Path(name).name != name or name in (".", ".."):
            raise CheckpointError(
                f"safetensors index names a shard outside the model directory ({name!r} in "
                f"{index}): shards must be plain file names."
            )
        if not (path / name).is_file():
            raise CheckpointError(
                f"safetensors shard {name} named by the index is missing ({index}): copy the "
                "complete model directory."
            )
    return [path / name for name in names]


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"safetensors file cannot be read ({file}): {str(error)[:200]}; the file is truncated "
            "or damaged: copy it again."
        ) from error


def write_hf_dir(
    path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], *, force: bool
) -> Path:
    """Write `config.json` + `model.safetensors` atomically."""
    from safetensors.torch import save_file

    check_free_space(path, tensor_bytes(tensors))
    with atomic_output(path, force=force, directory=True) as partial:
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        contiguous = {name: tensor.contiguous() for name, tensor in tensors.items()}
        save_file(contiguous, str(partial / HF_WEIGHTS), metadata={"format": "pt"})
    return Path(path)


# ------------------------------------------------------------------ Megatron checkpoints
def read_megatron(
    path: str | Path,
    *,
    model_config: str | Path | None = None,
    shape_changes: dict[str, Any] | None = None,
) -> tuple[GptShape, dict[str, torch.Tensor]]:
    """`(shape, full state dict)` of a Megatron checkpoint (full file or torch_dist directory).

    The shape comes from `model_config` (a `GptShape` JSON) when given, else from the
    checkpoint; `shape_changes` are applied to it before the tensors are checked against it.
    """

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"input {path} does not exist.")
    saved = None
    if path.is_dir():
        resolve_checkpoint_dir(path)  # vets the pickled files here, before a worker reads them
        shape = read_shape(path, model_config)
    else:
        saved = load_torch(path)
        if not isinstance(saved, dict) or saved.get("format") != FULL_FORMAT:
            raise CheckpointError(
                f"{path} is not a megatron-gate full state-dict file (no format={FULL_FORMAT!r}); "
                "pass a torch_dist directory or a file written by megatron-gate."
            )
        shape = (
            GptShape.load_json(model_config)
            if model_config
            else GptShape.from_dict(saved["model_config"])
        )
    shape = shape.replace(**(shape_changes or {}))
    state = saved["model"] if saved is not None else load_full_from_distributed(path, shape)
    check_full_state_dict(state, shape, source=str(path))
    return shape, state


def write_megatron(
    path: str | Path,
    shape: GptShape,
    state: dict[str, torch.Tensor],
    *,
    megatron_format: str = "torch",
    force: bool,
) -> Path:
    """Write a full state dict as a `torch` file or a torch_dist directory."""
    check_full_state_dict(state, shape, source="converted model")
    if megatron_format == "torch":
        payload = {"format": FULL_FORMAT, "model_config": shape.to_dict(), "model": state}
        return save_torch(payload, path, force=force)
    if megatron_format == "torch_dist":
        return save_full_as_distributed(path, shape, state, force=force)
    raise CheckpointError(
        f"megatron_format={megatron_format!r}; use one of {', '.join(MEGATRON_FORMATS)}."
    )


def _storage_shape(shape: GptShape) -> GptShape:
    """The shape a local model needs to hold `shape`'s tensors (zero-centred norms: same tensors,
    only their meaning differs, and the local RMSNorm cannot be built zero-centred)."""
    return shape.replace(layernorm_zero_centered_gamma=False)


def _load_full_worker(_rank: int, _world: int, payload: tuple[str, dict]) -> dict[str, Any]:
    from megatron_gate.checkpoint.model import build_gpt_from_shape
    from megatron_gate.distributed import init_model_parallel

    path, shape_fields = payload
    init_model_parallel(tp=1, pp=1)
    model = build_gpt_from_shape(_storage_shape(GptShape.from_dict(shape_fields)))
    try:
        load_distributed(model, path)
    except CheckpointError as error:
        return {"error": str(error)}  # re-raised by the parent as the same clear error
    # numpy arrays travel by value; torch tensors would be shared-memory handles that die with
    # this process before the parent reads them.
    state = model.state_dict()
    return {k: v.detach().numpy() for k, v in state.items() if not k.endswith("_extra_state")}


def _save_full_worker(_rank: int, _world: int, payload: tuple) -> None:
    from megatron_gate.checkpoint.model import build_gpt_from_shape
    from megatron_gate.distributed import init_model_parallel

    partial, shape_fields, state = payload
    shape = GptShape.from_dict(shape_fields)
    init_model_parallel(tp=1, pp=1)
    model = build_gpt_from_shape(_storage_shape(shape))
    model.load_state_dict(state, strict=False)  # keys checked by write_megatron
    write_distributed(model, Path(partial), shape=shape)


def load_full_from_distributed(path: Path, shape: GptShape) -> dict[str, torch.Tensor]:
    """Full state dict of a torch_dist checkpoint (loaded at TP=1/PP=1 in one gloo process)."""
    from megatron_gate.distributed import launch

    arrays = launch(_load_full_worker, world_size=1, payload=(str(path), shape.to_dict()))[0]
    if isinstance(arrays.get("error"), str):
        raise CheckpointError(arrays["error"])
    return {key: torch.from_numpy(array) for key, array in arrays.items()}


def save_full_as_distributed(
    path: str | Path, shape: GptShape, state: dict[str, torch.Tensor], *, force: bool
) -> Path:
    """Write a full state dict as a torch_dist checkpoint (one gloo process, TP=1/PP=1)."""
    from megatron_gate.distributed import launch

    # The worker only fills the temporary directory; this process (the one the user started)
    # renames it into place, so a worker that outlives a killed parent commits nothing.
    check_free_space(path, tensor_bytes(state))
    with atomic_output(path, force=force) as partial:
        launch(_save_full_worker, world_size=1, payload=(str(partial), shape.to_dict(), state))
    return Path(path)


# ------------------------------------------------------------------ conversion
def _to_megatron(
    side: str, path: Path, *, zero_centered_gamma: bool
) -> tuple[GptShape, dict[str, torch.Tensor]]:
    config, tensors = read_hf_dir(path)
    with malformed_config_is_input_error(path / "config.json"):
        if side == "hf":
            shape = hf_qwen3_next.shape_from_config(config, zero_centered_gamma=zero_centered_gamma)
        else:
            shape = paper_qwen3.shape_from_config(config)
    if side == "hf":
        return shape, hf_qwen3_next.hf_to_megatron(tensors, shape)
    return shape, paper_qwen3.paper_to_megatron(tensors, shape)


@contextlib.contextmanager
def malformed_config_is_input_error(config_file: Path) -> Iterator[None]:
    """Turn a wrongly typed `config.json` field (a list where a number belongs, a string where
    a mapping does) met while reading the config into a `CheckpointError` naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        if isinstance(error, CheckpointError):
            raise
        detail = f"{type(error).__name__}: {str(error)[:200]}"
        raise CheckpointError(
            f"config.json is malformed ({config_file}): {detail}; fix the wrongly typed or "
            "missing field."
        ) from error


def _from_megatron(
    side: str, shape: GptShape, state: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if side == "hf":
        return hf_qwen3_next.config_from_shape(shape), hf_qwen3_next.megatron_to_hf(state, shape)
    return paper_qwen3.config_from_shape(shape), paper_qwen3.megatron_to_paper(state, shape)


def convert(
    source: str | Path,
    output: str | Path,
    *,
    from_format: str,
    to_format: str,
    force: bool = False,
    megatron_format: str = "torch",
    zero_centered_gamma: bool = False,
    model_config: str | Path | None = None,
) -> Path:
    """Convert the checkpoint at `source` from `from_format` to `to_format` and write `output`.

    `from_format` / `to_format`: "hf" (Qwen3-Next), "paper" (the authors' gated Qwen3) or
    "megatron"; exactly one side is "megatron". `zero_centered_gamma` stores Qwen3-Next norm
    weights unchanged for a Megatron model with `layernorm_zero_centered_gamma=True` (TE norms);
    off, Megatron gets the scale `1 + w` that its local RMSNorm needs.
    """
    for name, value in (("--from", from_format), ("--to", to_format)):
        if value not in SIDES:
            raise CheckpointError(f"{name} {value!r} is unknown; use one of {', '.join(SIDES)}.")
    if (from_format == "megatron") == (to_format == "megatron"):
        raise CheckpointError(
            f"--from {from_format} --to {to_format}: exactly one side must be megatron "
            "(convert hf -> megatron -> paper in two steps where the models agree)."
        )
    if megatron_format not in MEGATRON_FORMATS:
        raise CheckpointError(
            f"--megatron-format {megatron_format!r}; use one of {', '.join(MEGATRON_FORMATS)}."
        )
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"input {source} does not exist.")
    check_not_input(source, output)
    check_output(output, force=force)
    if to_format == "megatron":
        shape, state = _to_megatron(from_format, source, zero_centered_gamma=zero_centered_gamma)
        return write_megatron(output, shape, state, megatron_format=megatron_format, force=force)
    shape, state = read_megatron(source, model_config=model_config)
    config, tensors = _from_megatron(to_format, shape, state)
    return write_hf_dir(output, config, tensors, force=force)


def reshard(
    source: str | Path,
    output: str | Path,
    *,
    megatron_format: str = "torch_dist",
    force: bool = False,
    model_config: str | Path | None = None,
    check_layout: tuple[int, int] | None = None,
) -> Path:
    """Rewrite a Megatron checkpoint as a torch_dist directory (loadable at any TP/PP) or as one
    full state-dict file; optionally prove the torch_dist output loads at `check_layout` (tp, pp).
    """
    if check_layout is not None:
        check_layout_request(check_layout, megatron_format=megatron_format)
    check_not_input(source, output)
    check_output(output, force=force)
    shape, state = read_megatron(source, model_config=model_config)
    if check_layout is not None:
        check_layout_fits(shape, *check_layout)
    written = write_megatron(output, shape, state, megatron_format=megatron_format, force=force)
    if check_layout is not None:
        verify_loadable(written, shape, tp=check_layout[0], pp=check_layout[1])
    return written
