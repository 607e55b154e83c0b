"""CPU patches for Megatron-LM's training loop (`megatron.training.pretrain`) with gloo.

`pretrain` makes more CUDA-only calls than a model does:

- `allow_no_cuda`: `initialize_megatron` asserts CUDA unless `allow_no_cuda=True`, which
  `pretrain` cannot pass;
- `one_device`: with `torch.cuda.device_count() == 0`, `initialize.py` silently skips the
  model-parallel groups and seeds; the CPU counts as one device (`is_available()` stays False)
  and `set_device` is a no-op;
- `cuda_tensor_type_names`: `Tensor.type()` answers `torch.cuda.FloatTensor` for a CPU float
  tensor (gradient clipping and the fp16/bf16 optimizers assert CUDA tensor types);
- `device_arch`: `validate_args` reads the GPU architecture for TP/CP > 1; the CPU answers 0,
  and `CUDA_DEVICE_MAX_CONNECTIONS=1`, which that check then asks for, is set;
- `cuda_streams`: DDP and the grad buffers create and wait on CUDA streams; on the CPU a stream
  is a no-op stand-in;
- `memory_stats`: memory reports read CUDA allocator statistics; they answer 0.

`prebuilt_dataset_helpers()` is a fix for GPUs too (a megatron-core wheel ships the compiled
dataset helper but no Makefile), so `megatron_gate.run` applies it on every machine.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

from megatron_gate.cpu.patching import CpuPatch, no_op, replace_attribute


def _cuda_type_names(original: Callable[..., Any]) -> Callable[..., Any]:
    """`Tensor.type()` that names a CPU tensor as its CUDA type (`torch.cuda.FloatTensor`)."""

    def type_name(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = original(tensor, *args, **kwargs)
        asks_for_name = not args and not kwargs and isinstance(result, str)
        if asks_for_name and not result.startswith("torch.cuda."):
            return result.replace("torch.", "torch.cuda.", 1)
        return result

    return type_name


def _initialize_megatron_without_cuda(original: Callable[..., Any]) -> Callable[..., Any]:
    def initialize_megatron(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _patch_allow_no_cuda() -> None:
    from megatron.training import initialize, training

    original = initialize.initialize_megatron
    replacement = _initialize_megatron_without_cuda(getattr(original, "__wrapped__", original))
    # `training.py` imported the function by name: patch both bindings.
    for owner in (initialize, training):
        replace_attribute(owner, "initialize_megatron", replacement)


def _patch_one_device() -> None:
    # `is_available` stays False: with PYTORCH_NVML_BASED_CUDA_CHECK=1 (DeepSpeed sets it) it
    # would answer from `device_count`, and DataLoaders would then pin memory on CUDA.
    replace_attribute(torch.cuda, "is_available", lambda: False)
    replace_attribute(torch.cuda, "device_count", lambda: 1)
    replace_attribute(torch.cuda, "set_device", no_op)


def _patch_tensor_type_names() -> None:
    # A method patch, not a torch-function mode: a mode would add its cost to every op.
    replace_attribute(torch.Tensor, "type", _cuda_type_names(torch.Tensor.type))


def _patch_device_arch() -> None:
    from megatron.training import arguments

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    replace_attribute(arguments, "get_device_arch_version", lambda: 0)


class _CpuStream(torch.cpu.Stream):
    """A CUDA-stream stand-in: work on the CPU is already ordered, so waits are no-ops."""

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True


_CURRENT_STREAM = _CpuStream()


def _patch_streams() -> None:
    replace_attribute(torch.cuda, "Stream", lambda *_args, **_kwargs: _CpuStream())
    replace_attribute(torch.cuda, "current_stream", lambda *_args, **_kwargs: _CURRENT_STREAM)
    replace_attribute(torch.cuda, "default_stream", lambda *_args, **_kwargs: _CURRENT_STREAM)
    replace_attribute(torch.cuda, "stream", lambda _stream=None: contextlib.nullcontext())


def _patch_memory_stats() -> None:
    for name in (
        "memory_allocated",
        "max_memory_allocated",
        "memory_reserved",
        "max_memory_reserved",
    ):
        replace_attribute(torch.cuda, name, lambda *_args, **_kwargs: 0)


TRAINING_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch("allow_no_cuda", _patch_allow_no_cuda),
    CpuPatch("one_device", _patch_one_device),
    CpuPatch("cuda_tensor_type_names", _patch_tensor_type_names),
    CpuPatch("device_arch", _patch_device_arch),
    CpuPatch("cuda_streams", _patch_streams),
    CpuPatch("memory_stats", _patch_memory_stats),
)


def prebuilt_dataset_helpers() -> None:
    """Skip `make` for Megatron's dataset helpers when the compiled helper already imports.

    `initialize_megatron` runs `make -C megatron/core/datasets` on rank 0; a megatron-core wheel
    ships the compiled helper but no Makefile, so rank 0 exits. A source checkout still compiles.
    """
    from megatron.core.datasets import utils

    original = utils.compile_helpers

    def compile_helpers() -> None:
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401
        except ImportError:
            original()

    replace_attribute(utils, "compile_helpers", compile_helpers)
