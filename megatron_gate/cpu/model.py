"""CPU patches for Megatron-Core models: forward/backward and pipeline schedules with gloo.

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

The mode is installed on the calling thread (the training thread). Applied by
`megatron_gate.cpu.enable_cpu_runtime()`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from megatron_gate.cpu.patching import CpuPatch, no_op, replace_attribute


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_STAY_ON_CPU = (torch.Tensor.cuda, torch.Tensor.pin_memory)


class CudaDeviceToCpu(TorchFunctionMode):
    """Torch-function mode that runs CUDA placements on the CPU.

    Every torch call of the thread passes through it, so the common case (no `device`
    argument, not a placement) is the first and cheapest path: it roughly halves the mode's
    cost per small op, which the monitor's many small ops and a CPU step's own feel alike.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in _STAY_ON_CPU:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if not kwargs:
            return func(*args)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


_SHADOW_CUDA_GENERATOR = torch.Generator(device="cpu")


def _shadow_get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return _SHADOW_CUDA_GENERATOR.get_state()


def _shadow_set_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    _SHADOW_CUDA_GENERATOR.set_state(new_state.clone())


def _shadow_manual_seed(seed: int) -> None:
    _SHADOW_CUDA_GENERATOR.manual_seed(int(seed))


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


MODEL_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch("cuda_device_to_cpu", _install_device_mode),
    CpuPatch("cuda_current_device", _patch_current_device),
    CpuPatch("cuda_rng", _patch_rng),
    CpuPatch("cuda_synchronize", _patch_synchronize),
    CpuPatch("dynamo_off", _patch_dynamo),
)
