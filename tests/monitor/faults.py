"""Injected faults for the attribution tests: each one fires at a chosen step of a loop.

Transient faults fire once (the recompute of that step is clean); reproducible ones come from
the batch or stay in the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class StepClock:
    """The step the loop is computing (set by the loss function), for the faults to read."""

    step: int = -1


@dataclass
class OneTimeFault:
    """Fires on the first computation of `step` only (silent data corruption)."""

    clock: StepClock
    step: int
    factor: float
    fired: list[int] = field(default_factory=list)

    def due(self) -> bool:
        if self.clock.step == self.step and not self.fired:
            self.fired.append(self.step)
            return True
        return False


def corrupt_matmul_output(module: torch.nn.Module, fault: OneTimeFault) -> Callable[[], None]:
    """The output of `module` (a linear layer: a matmul) times `fault.factor`, once."""

    def hook(_module: torch.nn.Module, _inputs: object, output: object) -> object:
        if not fault.due():
            return output
        if isinstance(output, tuple):  # Megatron's linear layers return (output, bias)
            return (output[0] * fault.factor, *output[1:])
        return output * fault.factor

    return module.register_forward_hook(hook).remove


def corrupt_gradient(param: torch.nn.Parameter, fault: OneTimeFault) -> Callable[[], None]:
    """The gradient of `param` times `fault.factor`, once (in the backward pass)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad * fault.factor if fault.due() else grad

    return param.register_hook(hook).remove


def corrupt_weight_in_memory(param: torch.nn.Parameter, value: float = float("nan")) -> None:
    """One element of a weight set to `value` (stays there: reproducible until rolled back)."""
    with torch.no_grad():
        param.view(-1)[0] = value
