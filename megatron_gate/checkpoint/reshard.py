"""Megatron distributed checkpoints (torch_dist) of gated GPTs at any TP/PP layout.

Why Megatron's default sharding is already right for the gate: `linear_qkv` is a
column-parallel weight saved as one global tensor `[ng * group_rows, h]` split into equal row
blocks, one per TP rank. Our fused rows are interleaved per query group
(`[q | gate | k | v]` x ng, see `megatron_gate.layout`), and that global order does not depend on
the TP size. A rank's block at any TP size is therefore a contiguous range of the same global
tensor, and loading at another TP size hands each rank exactly the rows its heads own; a gate row
never changes head and a K/V row never becomes a gate row. `tests/checkpoint/test_reshard.py`
proves it for TP 2 -> 1, 1 -> 2, PP 1 -> 2, both granularities and `num_query_groups < TP`.
The one TP-dependent case, headwise gates padded for FP8 with `ng < tp` (the padding grows with
TP), reloads only at its own TP size: `load_distributed` reports the `linear_qkv` shape mismatch.

On-disk layout (Megatron-LM's, so `--load DIR --finetune` finds it)::

    DIR/latest_checkpointed_iteration.txt   "release"
    DIR/release/                            torch_dist checkpoint of {"model": sharded_state_dict}
    DIR/megatron_gate_model.json            the GptShape (megatron-gate's own record)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_gate.checkpoint.model import SHAPE_FILE, GptShape
from megatron_gate.checkpoint.safe_io import (
    CheckpointError,
    check_output,
    commit,
    partial_path,
    refused_write_error,
)
from megatron_gate.checkpoint.torch_dist_files import vet_torch_dist_dir

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The torch_dist directory of `path`: itself, or the iteration its Megatron-LM tracker names."""
    path = Path(path)
    tracker = path / TRACKER_FILE
    if tracker.is_file():
        path = path / _tracked_iteration(tracker)
    if not (path / "metadata.json").is_file():
        raise CheckpointError(
            f"{path} is not a torch_dist checkpoint (no metadata.json); pass the checkpoint "
            f"directory or its Megatron-LM root (with {TRACKER_FILE})."
        )
    # Before torch or Megatron unpickle anything in it (see torch_dist_files).
    vet_torch_dist_dir(path)
    return path


def _tracked_iteration(tracker: Path) -> str:
    """The directory name Megatron-LM's tracker file names: `release` or `iter_NNNNNNN`."""
    with tracker.open("rb") as stream:
        text = stream.read(64).decode("ascii", errors="replace").strip()
    if text == RELEASE:
        return RELEASE
    if not text.isdigit():
        raise CheckpointError(
            f"tracker file holds {text[:20]!r}, not 'release' or an iteration number "
            f"({tracker}): write the iteration to load, e.g. 'release'."
        )
    return f"iter_{int(text):07d}"


def read_shape(path: str | Path, model_config: str | Path | None = None) -> GptShape:
    """The `GptShape` of a checkpoint: `model_config` when given, else the one saved beside it."""
    if model_config is not None:
        return GptShape.load_json(model_config)
    path = Path(path)
    for candidate in (path / SHAPE_FILE, path.parent / SHAPE_FILE):
        if candidate.is_file():
            return GptShape.load_json(candidate)
    return GptShape.load_json(path / SHAPE_FILE)  # raises, naming --model-config


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _shared_partial(directory: Path) -> Path:
    """Rank 0's temporary path, agreed on by every rank."""
    chosen = [str(partial_path(directory))]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return Path(chosen[0])


def write_distributed(model: torch.nn.Module, partial: Path, *, shape: GptShape) -> None:
    """Write `model` (this rank's part) as a complete Megatron-LM checkpoint directory at
    `partial`, which must not exist yet; every rank calls it. Nothing is renamed: the caller
    commits `partial` (see `safe_io.commit`)."""
    from megatron.core import dist_checkpointing

    bind_megatron_write_queue()
    if _rank() == 0:
        (partial / RELEASE).mkdir(parents=True)
    _barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(partial / RELEASE))
    _barrier()
    if _rank() == 0:
        (partial / TRACKER_FILE).write_text(RELEASE + "\n")
        shape.save_json(partial / SHAPE_FILE)


def bind_megatron_write_queue() -> None:
    """Give Megatron's torch_dist writer a results queue whose manager process dies with this
    one. Megatron starts its own on the first save (`get_write_results_queue`, cached in the
    module), and that server outlives a killed worker; seeding the cache avoids it. Call it in
    every process before `dist_checkpointing.save`."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_gate.distributed import manager_dying_with_this_process

    if getattr(filesystem_async, "_results_queue", "unknown") is None:
        manager = manager_dying_with_this_process(multiprocessing.get_context("spawn"))
        filesystem_async._results_queue = manager.Queue()  # the proxy keeps `manager` alive


def save_distributed(
    model: torch.nn.Module, directory: str | Path, *, shape: GptShape, force: bool = False
) -> Path:
    """Save `model` (this rank's part) as a torch_dist checkpoint; every rank calls it.

    Written into a temporary sibling first and renamed by rank 0 when all ranks are done.
    """
    directory = check_output(directory, force=force)
    partial = _shared_partial(directory)
    try:
        write_distributed(model, partial, shape=shape)
        if _rank() == 0:
            commit(partial, directory, force=force)
    except BaseException as error:
        if _rank() == 0 and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
        refused = refused_write_error(error, directory)
        if refused is not None:
            raise refused from error
        raise
    _barrier()
    return directory


def _expected_global_shapes(sharded_state_dict: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Storage key -> global shape of every tensor the model will ask the checkpoint for."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    shapes: dict[str, tuple[int, ...]] = {}
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedTensorFactory):
            # SwiGLU's fc1 is stored as two tensors (`key_w`, `key_v`) built by the factory.
            built = value.build()
            values = nested_values(built) if isinstance(built, dict) else [built]
        else:
            values = [value]
        for tensor in values:
            if isinstance(tensor, ShardedTensor):
                shapes[tensor.key] = tuple(tensor.global_shape)
    return shapes


def check_checkpoint_shapes(sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> None:
    """Raise a `CheckpointError` naming the first tensor missing from, or mis-shaped in, the file."""
    from megatron.core import dist_checkpointing

    stored = dist_checkpointing.load_tensors_metadata(str(checkpoint_dir))
    for key, expected in _expected_global_shapes(sharded_state_dict).items():
        if key not in stored:
            raise CheckpointError(f"{checkpoint_dir}: tensor {key} is missing from the checkpoint.")
        found = tuple(stored[key].global_shape)
        if found != expected:
            raise CheckpointError(
                f"{checkpoint_dir}: tensor {key} has global shape {list(found)}, the model expects "
                f"{list(expected)}; check the model config (heads, query groups, gate granularity)."
            )


def load_distributed(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a torch_dist checkpoint saved at any TP/PP layout into `model` (every rank calls it)."""
    from megatron.core import dist_checkpointing

    checkpoint_dir = resolve_checkpoint_dir(directory)
    sharded = {"model": model.sharded_state_dict()}
    check_checkpoint_shapes(sharded, checkpoint_dir)
    state = dist_checkpointing.load(sharded, str(checkpoint_dir))
    model.load_state_dict(state["model"])


def _verify_worker(rank: int, world_size: int, payload: tuple) -> int:
    from megatron.core import parallel_state

    from megatron_gate.checkpoint.model import build_gpt_from_shape
    from megatron_gate.distributed import init_model_parallel

    path, shape_fields, tp, pp = payload
    shape = GptShape.from_dict(shape_fields).replace(layernorm_zero_centered_gamma=False)
    init_model_parallel(tp=tp, pp=pp)
    model = build_gpt_from_shape(
        shape,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
    )
    load_distributed(model, path)
    return sum(param.numel() for param in model.parameters())


def verify_loadable(path: str | Path, shape: GptShape, *, tp: int, pp: int) -> list[int]:
    """Load a torch_dist checkpoint at TP=`tp`, PP=`pp` in `tp * pp` gloo CPU processes.

    Returns each rank's number of loaded parameters; raises if any rank cannot load.
    """
    from megatron_gate.distributed import launch

    payload = (str(path), shape.to_dict(), tp, pp)
    return launch(_verify_worker, world_size=tp * pp, payload=payload)


MAX_CHECK_RANKS = 64
"""`--check-tp * --check-pp` above this is refused: each rank is a CPU process."""


def check_layout_request(layout: tuple[int, int], *, megatron_format: str) -> None:
    """Raise unless (tp, pp) is a layout `verify_loadable` can start."""
    if megatron_format != "torch_dist":
        raise CheckpointError(
            "--check-tp/--check-pp need a torch_dist output (--megatron-format): pass "
            "--megatron-format torch_dist or drop --check-tp."
        )
    for flag, value in zip(("--check-tp", "--check-pp"), layout, strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(
                f"{flag} {value} is not a positive size ({flag}): pass 1 or more."
            )
    if layout[0] * layout[1] > MAX_CHECK_RANKS:
        raise CheckpointError(
            f"--check-tp {layout[0]} x --check-pp {layout[1]} needs {layout[0] * layout[1]} "
            f"processes (--check-tp): at most {MAX_CHECK_RANKS} are started here."
        )


def check_layout_fits(shape: GptShape, tp: int, pp: int) -> None:
    """Raise unless `shape`'s heads, query groups and layers split over (tp, pp)."""
    if shape.num_attention_heads % tp or (
        shape.num_query_groups % tp and tp % shape.num_query_groups
    ):
        raise CheckpointError(
            f"--check-tp {tp}: {shape.num_attention_heads} heads / {shape.num_query_groups} "
            "query groups cannot be split over that many ranks (--check-tp): pick a divisor."
        )
    if shape.num_layers % pp:
        raise CheckpointError(
            f"--check-pp {pp}: {shape.num_layers} layers cannot be split into {pp} equal "
            "pipeline stages (--check-pp): pick a divisor of the layer count."
        )
