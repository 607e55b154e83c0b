"""Megatron-LM dev's own headwise gate (`head_wise_attn_gate`, PR #4841) <-> megatron-gate.

Both gate each head with one sigmoid scalar; they store the gate rows of `linear_qkv`
differently. Megatron-LM dev appends them after q/k/v, per TP rank:

    rank r's rows:  [ qkv_r | gate_r ]      qkv_r: rank r's row block of Megatron's plain
                                            [q heads | k | v] x ng rows; gate_r: its np/tp heads
    full (TP=1):    [ qkv (ng * (hpg + 2) * hn) | gate (np, head order) ]

and its sharded state dict writes two TP-independent tensors per layer, `<key>._qkv` and
`<key>._gate` (key = `...linear_qkv.weight` / `.bias`), so a dev checkpoint holds the same
global tensors at any TP size. megatron-gate fuses one gate row per head into each query group
(`megatron_gate.layout`: `[q | gate | k | v] x ng`). Conversion moves rows head by head through
`QkvLayout.split_weight` / `fuse_weight` only, so it is exact both ways.

On disk, `megatron-dev` is a Megatron-LM torch_dist checkpoint directory (`latest_checkpointed_
iteration.txt` + `release/` or `iter_*`), its shape from `--model-config` or the
`megatron_gate_model.json` this module writes beside it (GptShape with granularity "headwise").
Dev requires `num_query_groups >= tp` and `num_attention_heads % tp == 0`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from megatron_gate.checkpoint.model import GptShape, check_full_state_dict
from megatron_gate.checkpoint.safe_io import CheckpointError, check_output, commit, partial_path
from megatron_gate.layout import QkvLayout, build_layout

FORMAT = "megatron-dev"
QKV_SUFFIX, GATE_SUFFIX = "._qkv", "._gate"
_QKV = ".self_attention.linear_qkv."


def _is_qkv(name: str) -> bool:
    """`...self_attention.linear_qkv.weight` or `.bias` (not its `_extra_state`)."""
    return _QKV in name and name.rsplit(".", 1)[-1] in ("weight", "bias")


# ------------------------------------------------------------------ row layouts
def _plain_layout(shape: GptShape) -> QkvLayout:
    """Megatron's ungated `[q | k | v] x ng` rows (dev's `qkv` block)."""
    return build_layout(
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        head_dim=shape.kv_channels,
        granularity=None,
    )


def _check_headwise(shape: GptShape, *, tp: int = 1) -> None:
    if shape.granularity != "headwise":
        raise CheckpointError(
            f"Megatron-LM dev's head_wise_attn_gate is headwise, the model is "
            f"{shape.granularity!r} (granularity): convert a headwise checkpoint"
        )
    if shape.num_query_groups < tp or shape.num_attention_heads % tp:
        raise CheckpointError(
            f"head_wise_attn_gate needs num_query_groups >= tp and num_attention_heads % tp == 0, "
            f"got {shape.num_query_groups} groups, {shape.num_attention_heads} heads, tp={tp} "
            "(tensor parallel size): use a smaller tp"
        )


def dev_rows_from_ours(fused: torch.Tensor, shape: GptShape) -> tuple[torch.Tensor, torch.Tensor]:
    """megatron-gate's `[total_rows, ...]` weight or bias -> dev's `(qkv, gate)` full blocks."""
    heads = shape.qkv_layout().split_weight(fused)
    qkv = _plain_layout(shape).fuse_weight(heads)
    # [np, 1, ...] -> [np, ...]: one gate row per head, in head order
    return qkv, heads["gate"].flatten(0, 1)


def ours_from_dev_rows(qkv: torch.Tensor, gate: torch.Tensor, shape: GptShape) -> torch.Tensor:
    """Inverse of `dev_rows_from_ours`."""
    heads = _plain_layout(shape).split_weight(qkv)
    # [np, ...] -> [np, 1, ...]
    heads["gate"] = gate.unsqueeze(1)
    return shape.qkv_layout().fuse_weight(heads)


def dev_rank_rows(qkv: torch.Tensor, gate: torch.Tensor, *, tp: int, rank: int) -> torch.Tensor:
    """TP rank `rank`'s `linear_qkv` rows in a dev model: `[qkv_r ; gate_r]` (plain row blocks)."""
    return torch.cat([qkv.chunk(tp)[rank], gate.chunk(tp)[rank]])


def dev_rows_from_ranks(shards: list[torch.Tensor], shape: GptShape) -> tuple[torch.Tensor, ...]:
    """Inverse of `dev_rank_rows` over all ranks: the full `(qkv, gate)` blocks."""
    gate_rows = shape.num_attention_heads // len(shards)
    qkv = torch.cat([shard[:-gate_rows] for shard in shards])
    return qkv, torch.cat([shard[-gate_rows:] for shard in shards])


# ------------------------------------------------------------------ full state dicts
def to_dev_state(state: dict[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    """megatron-gate full state dict -> `{name: tensor}` with `name._qkv` / `name._gate` blocks."""
    _check_headwise(shape)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if _is_qkv(name):
            out[name + QKV_SUFFIX], out[name + GATE_SUFFIX] = dev_rows_from_ours(tensor, shape)
        else:
            out[name] = tensor
    return out


def from_dev_state(dev: dict[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    """Inverse of `to_dev_state`; checks the result against `shape`."""
    _check_headwise(shape)
    state = {name: t for name, t in dev.items() if not name.endswith((QKV_SUFFIX, GATE_SUFFIX))}
    for name in [name for name in dev if name.endswith(QKV_SUFFIX)]:
        base = name.removesuffix(QKV_SUFFIX)
        if base + GATE_SUFFIX not in dev:
            raise CheckpointError(
                f"tensor {base}{GATE_SUFFIX} is missing next to {name} (head_wise_attn_gate "
                "checkpoint): pass a checkpoint written with head_wise_attn_gate=True"
            )
        state[base] = ours_from_dev_rows(dev[name], dev[base + GATE_SUFFIX], shape)
    check_full_state_dict(state, shape, source="Megatron-LM dev checkpoint")
    return state


# ------------------------------------------------------------------ torch_dist directories
def _plain_model(shape: GptShape) -> torch.nn.Module:
    from megatron_gate.checkpoint.model import build_gpt_from_shape

    return build_gpt_from_shape(
        shape.replace(granularity=None, layernorm_zero_centered_gamma=False)
    )


def _layer_offsets(sharded: Any) -> list[tuple[int, int, int]]:
    """The prepended (layer) axes of a ShardedTensor as `from_rank_offsets` arguments."""
    return [
        (axis, sharded.global_offset[axis], sharded.axis_fragmentations[axis])
        for axis in range(sharded.prepend_axis_num)
    ]


def _qkv_tensors(sharded: Any, blocks: tuple[torch.Tensor, torch.Tensor], tp: int, rank: int):
    """The `._qkv` / `._gate` ShardedTensors that dev's sharded-state-dict factory writes for
    TP rank `rank`: each block split in `tp` row blocks, this rank's at offset `rank`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    offsets = [*_layer_offsets(sharded), (sharded.prepend_axis_num, rank, tp)]
    return [
        ShardedTensor.from_rank_offsets(
            sharded.key + suffix,
            block.chunk(tp)[rank].contiguous(),
            *offsets,
            replica_id=sharded.replica_id,
            prepend_axis_num=sharded.prepend_axis_num,
        )
        for suffix, block in zip((QKV_SUFFIX, GATE_SUFFIX), blocks, strict=True)
    ]


def _dev_sharded_state_dict(
    model: torch.nn.Module, shape: GptShape, dev: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """The plain model's sharded state dict with each `linear_qkv` tensor replaced by dev's two
    blocks: full blocks from `dev`, or empty ones to load into."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    sizes = (_plain_layout(shape).total_rows, shape.num_attention_heads)
    sharded = model.sharded_state_dict()
    for name in [name for name in sharded if _is_qkv(name)]:
        entry = sharded.pop(name)
        if dev is not None:
            blocks = (dev[name + QKV_SUFFIX], dev[name + GATE_SUFFIX])
        else:
            rest = tuple(entry.global_shape[entry.prepend_axis_num + 1 :])
            blocks = tuple(torch.empty(rows, *rest) for rows in sizes)
        sharded[name + QKV_SUFFIX], sharded[name + GATE_SUFFIX] = _qkv_tensors(
            entry, blocks, tp, rank
        )
    return sharded


def _read_worker(_rank: int, _world: int, payload: tuple[str, dict]) -> dict[str, Any]:
    from megatron.core import dist_checkpointing

    from megatron_gate.checkpoint.reshard import resolve_checkpoint_dir
    from megatron_gate.distributed import init_model_parallel

    path, fields = payload
    shape = GptShape.from_dict(fields)
    init_model_parallel(tp=1, pp=1)
    try:
        directory = resolve_checkpoint_dir(path)
    except CheckpointError as error:
        return {"error": str(error)}
    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    if not any(key.endswith(GATE_SUFFIX) for key in stored):
        return {"error": f"no {GATE_SUFFIX} tensors in {directory} (head_wise_attn_gate): pass a "
                         "checkpoint of a Megatron-LM dev model with head_wise_attn_gate=True"}  # fmt: skip
    loaded = dist_checkpointing.load(
        _dev_sharded_state_dict(_plain_model(shape), shape), str(directory)
    )
    # numpy arrays travel by value to the parent (see checkpoint.convert).
    return {
        name: tensor.detach().numpy()
        for name, tensor in loaded.items()
        if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state")
    }


def _local_shard(name: str, full: torch.Tensor, param: torch.Tensor, shape: GptShape):
    """This TP rank's part of a full tensor, as Megatron partitions `param`."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if shape.gated_linear_unit and ".mlp.linear_fc1." in name:
        # SwiGLU: a rank holds [gate_proj_r ; up_proj_r], not a plain row block of the full rows.
        return torch.cat([half.chunk(tp)[rank] for half in full.chunk(2)])
    return full.chunk(tp, dim=param.partition_dim)[rank]


def _write_worker(rank: int, world: int, payload: tuple) -> None:
    from megatron.core import dist_checkpointing

    from megatron_gate.distributed import init_model_parallel

    directory, fields, dev = payload
    shape = GptShape.from_dict(fields)
    init_model_parallel(tp=world, pp=1)
    model = _plain_model(shape)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not _is_qkv(name):
                param.copy_(_local_shard(name, dev[name], param, shape))
    dist_checkpointing.save(_dev_sharded_state_dict(model, shape, dev), directory)


def read_dev(path: str | Path, shape: GptShape) -> dict[str, torch.Tensor]:
    """The megatron-gate full state dict of a Megatron-LM dev head_wise_attn_gate checkpoint."""
    from megatron_gate.distributed import launch

    _check_headwise(shape)
    arrays = launch(_read_worker, world_size=1, payload=(str(path), shape.to_dict()))[0]
    if isinstance(arrays.get("error"), str):
        raise CheckpointError(arrays["error"])
    return from_dev_state({name: torch.from_numpy(a) for name, a in arrays.items()}, shape)


def write_dev(
    path: str | Path,
    shape: GptShape,
    state: dict[str, torch.Tensor],
    *,
    tp: int = 1,
    force: bool = False,
) -> Path:
    """Write a megatron-gate full state dict as a dev torch_dist checkpoint saved by `tp` ranks
    (the global tensors do not depend on `tp`; `tp > 1` writes dev's per-rank row blocks)."""
    from megatron_gate.checkpoint.model import SHAPE_FILE
    from megatron_gate.checkpoint.reshard import RELEASE, TRACKER_FILE
    from megatron_gate.distributed import launch

    _check_headwise(shape, tp=tp)
    check_full_state_dict(state, shape, source="model to write")
    directory = check_output(path, force=force)
    partial = partial_path(directory)
    (partial / RELEASE).mkdir(parents=True)
    try:
        payload = (str(partial / RELEASE), shape.to_dict(), to_dev_state(state, shape))
        launch(_write_worker, world_size=tp, payload=payload)
        (partial / TRACKER_FILE).write_text(RELEASE + "\n")
        shape.save_json(partial / SHAPE_FILE)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    commit(partial, directory, force=force)
    return directory


def convert_dev(
    source: str | Path,
    output: str | Path,
    *,
    from_format: str,
    to_format: str,
    force: bool = False,
    megatron_format: str = "torch",
    model_config: str | Path | None = None,
) -> Path:
    """`megatron-gate convert --from megatron-dev --to megatron` and back."""
    from megatron_gate.checkpoint.convert import read_megatron, write_megatron
    from megatron_gate.checkpoint.reshard import read_shape

    if {from_format, to_format} != {FORMAT, "megatron"}:
        raise CheckpointError(
            f"--from {from_format} --to {to_format}: {FORMAT} converts to and from megatron only "
            f"(--from/--to): use --from {FORMAT} --to megatron or --from megatron --to {FORMAT}"
        )
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"input does not exist ({source}): pass a checkpoint")
    check_output(output, force=force)
    if from_format == FORMAT:
        shape = read_shape(source, model_config)
        state = read_dev(source, shape)
        return write_megatron(output, shape, state, megatron_format=megatron_format, force=force)
    shape, state = read_megatron(source, model_config=model_config)
    return write_dev(output, shape, state, force=force)
