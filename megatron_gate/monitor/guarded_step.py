"""`bucketed_step`: an optimizer step that can be undone on the device, bucket by bucket.

    bucketed_step(optimizer, accept=verdict.accept)         # skipped: bit-identical state
    bucketed_step(optimizer, on_bucket=update_norm.add)     # hands over (new - old) per bucket

The optimizer steps one bucket of parameters at a time (the bucket presented as its
`param_groups`, each group keeping its own hyper-parameters). Per bucket it keeps the old
parameters, and with `accept` the old optimizer state of those parameters (moments, step
counters: every tensor in `optimizer.state[p]`), steps, calls `on_bucket(params, changes)`,
then sets every parameter and state tensor to `torch.where(accept, new, old)` in place. A
select, never a multiply: a NaN in the rejected update cannot reach the weights or the moments
(0 x NaN is NaN). State that did not exist before (the first step) is "old" as zeros, which is
what a fresh torch optimizer state means (`step` 0, zero moments).

Peak extra memory: one bucket of parameters (plus its state when `accept` is given).
Optimizer step hooks run once per bucket. Learning-rate schedulers are host objects that this
step does not see: a loop that needs the scheduler to stand still on a skipped step must know
the decision on the host (Megatron-LM and DeepSpeed read it where they already synchronise);
on the pure device path the scheduler advances as if the step had been taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

OnBucket = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]
"""`on_bucket(params, changes)`: a bucket's parameters after the step and their changes
(new - old, flat 1-d views of one temporary per bucket and dtype)."""


def bucketed_step(
    optimizer: Any,
    *,
    accept: torch.Tensor | None = None,
    on_bucket: OnBucket | None = None,
    bucket_bytes: int = 64 * 2**20,
) -> None:
    """Run `optimizer.step()` bucket by bucket; keep the old state where `accept` is False.

    `accept` None and `on_bucket` None: exactly one plain `optimizer.step()`.
    """
    if accept is None and on_bucket is None:
        optimizer.step()
        return
    groups = optimizer.param_groups
    try:
        for bucket in _buckets(groups, bucket_bytes):
            optimizer.param_groups = bucket
            _step_bucket(optimizer, bucket, accept=accept, on_bucket=on_bucket)
    finally:
        optimizer.param_groups = groups


def _buckets(groups: list[dict[str, Any]], bucket_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """Param groups restricted to consecutive runs of about `bucket_bytes` parameter bytes."""
    bucket: list[dict[str, Any]] = []
    size = 0
    for group in groups:
        params: list[torch.Tensor] = []
        for param in group["params"]:
            if param.grad is None:  # the optimizer skips it anyway
                continue
            params.append(param)
            size += param.numel() * param.element_size()
            if size >= bucket_bytes:
                yield [*bucket, {**group, "params": params}]
                bucket, params, size = [], [], 0
        if params:
            bucket.append({**group, "params": params})
    if bucket:
        yield bucket


StateKey = tuple[int, str]


def _state_tensors(optimizer: Any, params: Sequence[torch.Tensor]) -> dict[StateKey, torch.Tensor]:
    """The tensors of the optimizer state of `params`, by (parameter id, state key)."""
    return {
        (id(param), key): value
        for param in params
        for key, value in optimizer.state.get(param, {}).items()
        if isinstance(value, torch.Tensor)
    }


class _FlatCopy:
    """The values of some tensors, one flat copy per (device, dtype): a few ops per bucket
    instead of several per tensor (small models have many small tensors)."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.runs: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, tensor in enumerate(self.tensors):
            self.runs.setdefault((tensor.device, tensor.dtype), []).append(index)
        self.flat = {key: self._cat(indices) for key, indices in self.runs.items()}
        self.sizes = {key: [self.tensors[i].numel() for i in indices]
                      for key, indices in self.runs.items()}  # fmt: skip

    def _cat(self, indices: list[int]) -> torch.Tensor:
        # Called under no_grad only (`_step_bucket`): no detach needed, one dispatch less each.
        return torch.cat([self.tensors[i].reshape(-1) for i in indices])

    def _pieces(self, key: tuple[torch.device, torch.dtype], flat: torch.Tensor) -> list:
        indices = self.runs[key]
        chunks = flat.split(self.sizes[key])
        return [chunk.view_as(self.tensors[i]) for chunk, i in zip(chunks, indices, strict=True)]

    def changes(self) -> list[torch.Tensor]:
        """current - copy of every tensor, flat (1-d views), in the tensors' order.

        One temporary the size of each flat copy (a `cat` then an in-place subtraction)."""
        values: list[torch.Tensor | None] = [None] * len(self.tensors)
        for key, indices in self.runs.items():
            change = self._cat(indices).sub_(self.flat[key])
            pieces = change.split(self.sizes[key])
            for i, piece in zip(indices, pieces, strict=True):
                values[i] = piece
        return values  # type: ignore[return-value]

    def keep_where_rejected(
        self, accept: torch.Tensor, current: Sequence[torch.Tensor] | None = None
    ) -> None:
        """current = where(accept, current, copy), in place (a select, never a multiply).

        `current` are the tensors now holding the values (default: the copied tensors
        themselves; an optimizer may have replaced its state tensors by new ones)."""
        if current is not None:
            self.tensors = list(current)
        for key, indices in self.runs.items():
            selected = torch.where(accept, self._cat(indices), self.flat[key])
            targets = [self.tensors[i] for i in indices]
            torch._foreach_copy_(targets, self._pieces(key, selected))


@torch.no_grad()
def _step_bucket(
    optimizer: Any,
    bucket: list[dict[str, Any]],
    *,
    accept: torch.Tensor | None,
    on_bucket: OnBucket | None,
) -> None:
    params = [param for group in bucket for param in group["params"]]
    old_params = _FlatCopy(params)
    before = _state_tensors(optimizer, params) if accept is not None else {}
    old_state = _FlatCopy(list(before.values()))
    optimizer.step()
    if on_bucket is not None:
        on_bucket(params, old_params.changes())
    if accept is None:
        return
    after = _state_tensors(optimizer, params)
    old_params.keep_where_rejected(accept)
    old_state.keep_where_rejected(accept, [after[key] for key in before])
    for key, new in after.items():
        if key not in before:  # created by this step: "before" is the fresh state (zeros)
            new.copy_(torch.where(accept, new, torch.zeros_like(new)))


@contextlib.contextmanager
def guarded_inner_step(
    optimizer: Any,
    *,
    accept: torch.Tensor | None = None,
    on_bucket: OnBucket | None = None,
    bucket_bytes: int = 64 * 2**20,
) -> Iterator[None]:
    """Make `optimizer.step()` a `bucketed_step` while the context is open.

    For a torch optimizer stepped from code we do not own (Megatron's and DeepSpeed's
    wrappers call their inner optimizer's `step()`).
    """
    if accept is None and on_bucket is None:
        yield
        return

    def step(*_args: Any, **_kwargs: Any) -> None:
        del optimizer.step  # the class's own step for the bucketed call
        try:
            bucketed_step(optimizer, accept=accept, on_bucket=on_bucket, bucket_bytes=bucket_bytes)
        finally:
            optimizer.step = step

    optimizer.step = step  # an instance attribute shadows the method
    try:
        yield
    finally:
        del optimizer.step
