"""`bucketed_step`: an optimizer step that can be undone on the device, bucket by bucket.

    bucketed_step(optimizer, accept=verdict.accept)         # skipped: bit-identical state
    bucketed_step(optimizer, on_bucket=update_norm.add)     # measures (new - old) per bucket

The optimizer steps one bucket of parameters at a time (the bucket presented as its
`param_groups`, each group keeping its own hyper-parameters). Per bucket it keeps the old
parameters, and with `accept` the old optimizer state of those parameters (moments, step
counters: every tensor in `optimizer.state[p]`), steps, calls `on_bucket(params, old_params)`,
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


def _state_tensors(optimizer: Any, params: Sequence[torch.Tensor]) -> list[tuple[Any, str]]:
    return [
        (param, key)
        for param in params
        for key, value in optimizer.state.get(param, {}).items()
        if isinstance(value, torch.Tensor)
    ]


@torch.no_grad()
def _step_bucket(
    optimizer: Any,
    bucket: list[dict[str, Any]],
    *,
    accept: torch.Tensor | None,
    on_bucket: OnBucket | None,
) -> None:
    params = [param for group in bucket for param in group["params"]]
    old_params = [param.detach().clone() for param in params]
    old_state: dict[tuple[int, str], torch.Tensor] = {}
    if accept is not None:
        old_state = {
            (id(param), key): optimizer.state[param][key].clone()
            for param, key in _state_tensors(optimizer, params)
        }
    optimizer.step()
    if on_bucket is not None:
        on_bucket(params, old_params)
    if accept is None:
        return
    for param, old in zip(params, old_params, strict=True):
        param.copy_(torch.where(accept, param, old))
    for param, key in _state_tensors(optimizer, params):
        new = optimizer.state[param][key]
        old = old_state.get((id(param), key))
        if old is None:  # created by this step: "before" is the fresh state
            old = torch.zeros_like(new)
        new.copy_(torch.where(accept, new, old))


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
