"""Opt-in CPU runtime: Megatron-Core models and Megatron-LM's training loop on the CPU with gloo.

Megatron is written for CUDA. On a machine without CUDA, `enable_cpu_runtime()` redirects the
CUDA-only calls that a model build, a training step, pipeline schedules (`cpu/model.py`) and
Megatron-LM's `pretrain` (`cpu/training_loop.py`: `initialize_megatron`'s CUDA assert, one device
instead of zero, streams, allocator statistics, CUDA tensor-type asserts, the GPU-architecture
check) make, and skips the `make` of the prebuilt dataset helpers.

It is the one switch: explicit, idempotent, a logged no-op when CUDA is available (a CUDA run is
never touched), and every patched function keeps its original as `__wrapped__`.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from megatron_gate.cpu.model import MODEL_PATCHES
from megatron_gate.cpu.patching import CpuPatch, apply_patches

logger = logging.getLogger(__name__)

_APPLIED: list[str] = []


def _training_loop_patches() -> tuple[CpuPatch, ...]:
    from megatron_gate.cpu.training_loop import TRAINING_PATCHES, prebuilt_dataset_helpers

    return (*TRAINING_PATCHES, CpuPatch("prebuilt_dataset_helpers", prebuilt_dataset_helpers))


def has_training_loop() -> bool:
    """Whether `megatron.training` (Megatron-LM's loop) is installed (megatron-core >= 0.17 wheels)."""
    return importlib.util.find_spec("megatron.training") is not None


def enable_cpu_runtime(*, training_loop: bool = True, force: bool = False) -> list[str]:
    """Run Megatron on the CPU when CUDA is absent; return the names of the patches applied.

    `training_loop=True` (the default) also covers Megatron-LM's `pretrain` and its dataset
    helpers whenever `megatron.training` is installed; `False` patches only what a Megatron-Core
    model needs (a lighter start for model-level tests and non-Megatron loops such as DeepSpeed).
    `force=True` is for tests only; on a CUDA machine the call is otherwise a logged no-op.
    """
    if torch.cuda.is_available() and not force:
        logger.info("megatron_gate.cpu: CUDA is available; CPU runtime not applied.")
        return []
    apply_patches(MODEL_PATCHES, _APPLIED)
    if training_loop and has_training_loop():
        apply_patches(_training_loop_patches(), _APPLIED)
    return list(_APPLIED)


def applied_patches() -> list[str]:
    """Names of the CPU patches applied in this process."""
    return list(_APPLIED)
