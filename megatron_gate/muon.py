"""Muon and Megatron-Core's other emerging optimizers on gated layers.

Muon orthogonalizes `linear_qkv` per segment: each query group's rows are split by the
parameter's `qkv_split_shapes`. Megatron's set-up (`_get_megatron_emerging_optimizer`, 0.19)
tags every `linear_qkv.weight` with shapes computed from the model config: `[q, k, v]`, or
`[q, q, k, v]` only when that config has `attention_output_gate`, which gated layers keep off the
config they share with the rest of the model. Their rows would be split wrongly (a gate row
orthogonalized with query rows) or not at all. `install()` wraps the set-up so that a model with
gated layers is tagged with their own shapes (`GatedSelfAttention.qkv_split_shapes`, derived
from `layout.py`). It is idempotent, and `GatedSelfAttention` calls it when it is built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_gate.config import GateConfigError


def gated_split_shapes(model_chunks: Sequence[torch.nn.Module]) -> list[int] | None:
    """This rank's one `qkv_split_shapes` of the gated layers in `model_chunks` (None: none)."""
    from megatron_gate.attention import GatedSelfAttention

    shapes = {
        tuple(module.qkv_split_shapes)
        for chunk in model_chunks
        for module in chunk.modules()
        if isinstance(module, GatedSelfAttention)
    }
    if len(shapes) > 1:
        raise GateConfigError(
            f"gated layers of one rank have different linear_qkv segments {sorted(shapes)}; "
            "Megatron's emerging optimizers tag one split per model chunk: use one granularity."
        )
    return list(shapes.pop()) if shapes else None


def check_tp_mode(config: Any, model_chunks: Sequence[torch.nn.Module]) -> None:
    """With `ng < tp` the ranks of one group hold different segments: only Muon's "blockwise"
    TP mode (each rank orthogonalizes its own rows) can split them."""
    from megatron_gate.attention import GatedSelfAttention

    if not getattr(config, "muon_split_qkv", False):
        return
    mode = getattr(config, "muon_tp_mode", "blockwise")
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, GatedSelfAttention) and module._groups_shared_by_ranks() > 1:
                if mode != "blockwise":
                    raise GateConfigError(
                        f"muon_tp_mode={mode!r} with num_query_groups="
                        f"{module.qkv_layout.num_query_groups} < tensor_model_parallel_size="
                        f"{module.world_size}: ranks of one query group hold different "
                        "linear_qkv segments, which this mode cannot gather; use "
                        "--muon-tp-mode blockwise, TP <= num_query_groups or --no-muon-split-qkv."
                    )
                return


@contextlib.contextmanager
def _tagged_with(shapes: list[int]) -> Iterator[None]:
    """Megatron's tagging loop reads `_get_qkv_split_shapes` from `megatron.core.optimizer`."""
    from megatron.core import optimizer as megatron_optimizer

    original = megatron_optimizer._get_qkv_split_shapes
    megatron_optimizer._get_qkv_split_shapes = lambda _model_config: list(shapes)
    try:
        yield
    finally:
        megatron_optimizer._get_qkv_split_shapes = original


def _wrap_setup(original: Any) -> Any:
    def _get_megatron_emerging_optimizer(*args: Any, **kwargs: Any) -> Any:
        config = kwargs["config"] if "config" in kwargs else args[0]
        model_chunks = kwargs["model_chunks"] if "model_chunks" in kwargs else args[1]
        shapes = gated_split_shapes(model_chunks)
        if shapes is None:
            return original(*args, **kwargs)
        check_tp_mode(config, model_chunks)
        with _tagged_with(shapes):
            return original(*args, **kwargs)

    return _get_megatron_emerging_optimizer


def install() -> None:
    """Tag gated `linear_qkv` weights with their own segments in Megatron's emerging-optimizer
    set-up (megatron-core >= 0.19; nothing to do on older versions). Idempotent."""
    try:
        from megatron.core import optimizer as megatron_optimizer
    except ImportError:  # an install without Megatron-Core's optimizers: nothing to tag
        return
    needed = ("_get_megatron_emerging_optimizer", "_get_qkv_split_shapes")
    if not all(hasattr(megatron_optimizer, name) for name in needed):
        return
    from megatron_gate.megatron_lm.patching import wrap

    wrap([megatron_optimizer], "_get_megatron_emerging_optimizer", _wrap_setup)
