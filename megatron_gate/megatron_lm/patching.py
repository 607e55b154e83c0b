"""Wrap a function of Megatron-LM in place, once, keeping the original as `__wrapped__`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]

_MARK = "_megatron_gate_wrapped"


def is_wrapped(function: Any) -> bool:
    """True when `function` is one of megatron-gate's wrappers."""
    return bool(getattr(function, _MARK, False))


def wrap(owners: Iterable[Any], name: str, make: Wrapper) -> None:
    """Replace `owner.name` by `make(original)` in every owner that holds the same original.

    Megatron modules import functions by name (`from .arguments import parse_args`), so one
    function can have several bindings; all of them get the same wrapper. Idempotent.
    """
    owners = [owner for owner in owners if hasattr(owner, name)]
    if not owners:
        raise AttributeError(f"none of the given modules has {name!r} to wrap")
    original = getattr(owners[0], name)
    if is_wrapped(original):
        return
    replacement = functools.update_wrapper(make(original), original)
    setattr(replacement, _MARK, True)
    for owner in owners:
        # `==`, not `is`: an instance hands out a new bound-method object on every access.
        if getattr(owner, name) == original:
            setattr(owner, name, replacement)
