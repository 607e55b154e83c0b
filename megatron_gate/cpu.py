"""Opt-in CPU runtime: lets Megatron-Core models run forward/backward on the CPU with gloo.

Megatron-Core is written for CUDA. On a machine without CUDA, `enable_cpu_runtime()` redirects the
few CUDA-only calls that a model build, a training step and pipeline schedules make:

- `cuda_device_to_cpu`: a torch-function mode that maps `device="cuda"`/`cuda:N`/`N` arguments,
  `Tensor.cuda()`, `Tensor.to("cuda")` and `pin_memory()` to the CPU (Megatron allocates on
  `torch.cuda.current_device()` and on `device="cuda"` literals in many places);
- `cuda_current_device`: `torch.cuda.current_device()` answers `"cpu"`, so allocations on "the current
  device" land on the CPU even where the mode is not active (autograd's backward of Megatron's
  communication functions);
- `cuda_rng`: `torch.cuda` seeding and RNG state (the model-parallel RNG tracker) live in a shadow
  CPU generator;
- `cuda_synchronize`: `torch.cuda.synchronize()` and stream waits are no-ops;
- `dynamo_off`: torch.compile (Megatron's `jit_fuser`) is disabled: compiling fused ops costs ~15 s
  per process on a small CPU and buys nothing there.

It is explicit and idempotent, does nothing when CUDA is available (a CUDA run is never touched),
and every patched function keeps its original as `__wrapped__`. The mode is installed on the
calling thread (the training thread).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class CudaDeviceToCpu(TorchFunctionMode):
    """Torch-function mode that runs CUDA placements on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_SHADOW_CUDA_GENERATOR = torch.Generator(device="cpu")


def _shadow_get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return _SHADOW_CUDA_GENERATOR.get_state()


def _shadow_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    _SHADOW_CUDA_GENERATOR.set_state(new_state.clone())


def _shadow_manual_seed(seed: int) -> None:
    _SHADOW_CUDA_GENERATOR.manual_seed(int(seed))


def no_op(*_args: Any, **_kwargs: Any) -> None:
    """Stand-in for CUDA calls that have nothing to do on the CPU."""
    return None


def replace_attribute(owner: Any, name: str, replacement: Callable[..., Any]) -> None:
    """Set `owner.name = replacement`, keeping the original reachable as `__wrapped__`."""
    original = getattr(owner, name, None)
    if getattr(original, "_megatron_gate_cpu", False):
        return

    @functools.wraps(replacement)
    def patched(*args: Any, **kwargs: Any) -> Any:
        return replacement(*args, **kwargs)

    patched.__wrapped__ = original  # type: ignore[attr-defined]
    patched._megatron_gate_cpu = True  # type: ignore[attr-defined]
    setattr(owner, name, patched)


def _patch_current_device() -> None:
    replace_attribute(torch.cuda, "current_device", lambda: "cpu")


def _patch_rng() -> None:
    from megatron.core.tensor_parallel import random as megatron_random

    for owner in (torch.cuda, torch.cuda.random):
        replace_attribute(owner, "get_rng_state", _shadow_get_rng_state)
        replace_attribute(owner, "set_rng_state", _shadow_set_rng_state)
        replace_attribute(owner, "manual_seed", _shadow_manual_seed)
        replace_attribute(owner, "manual_seed_all", _shadow_manual_seed)
    replace_attribute(megatron_random, "_get_cuda_rng_state", _shadow_get_rng_state)
    replace_attribute(megatron_random, "_set_cuda_rng_state", _shadow_set_rng_state)


def _patch_synchronize() -> None:
    replace_attribute(torch.cuda, "synchronize", no_op)


def _patch_dynamo() -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True


_MODE: CudaDeviceToCpu | None = None


def _install_device_mode() -> None:
    global _MODE
    if _MODE is None:
        _MODE = CudaDeviceToCpu()
        _MODE.__enter__()


@dataclass(frozen=True)
class CpuPatch:
    """One named redirection of a CUDA-only call."""

    name: str
    apply: Callable[[], None]


PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch("cuda_device_to_cpu", _install_device_mode),
    CpuPatch("cuda_current_device", _patch_current_device),
    CpuPatch("cuda_rng", _patch_rng),
    CpuPatch("cuda_synchronize", _patch_synchronize),
    CpuPatch("dynamo_off", _patch_dynamo),
)

_APPLIED: list[str] = []


def enable_cpu_runtime(*, force: bool = False) -> list[str]:
    """Apply the CPU patches (once) when CUDA is absent; return the names applied.

    `force=True` is for tests only; on a CUDA machine the call is otherwise a logged no-op.
    """
    if torch.cuda.is_available() and not force:
        logger.info("megatron_gate.cpu: CUDA is available; CPU runtime not applied.")
        return []
    for patch in PATCHES:
        if patch.name not in _APPLIED:
            patch.apply()
            _APPLIED.append(patch.name)
    return list(_APPLIED)


def applied_patches() -> list[str]:
    """Names of the CPU patches applied in this process."""
    return list(_APPLIED)
