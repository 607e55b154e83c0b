"""How the CPU runtime replaces a CUDA-only call: once, keeping the original as `__wrapped__`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CpuPatch:
    """One named redirection of a CUDA-only call."""

    name: str
    apply: Callable[[], None]


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


def apply_patches(patches: tuple[CpuPatch, ...], applied: list[str]) -> None:
    """Apply each patch whose name is not in `applied` yet, and record it there."""
    for patch in patches:
        if patch.name not in applied:
            patch.apply()
            applied.append(patch.name)
