"""`UpdateNorm`: the exact per-layer update norm, from the buckets of `bucketed_step`.

No copy of the model: `bucketed_step(optimizer, on_bucket=update_norm.add)` hands each bucket's
changes (new - old) over while the bucket's old copy exists anyway, and `add` folds
sum((new - old)^2) per layer into a `[num_layers + 1]` device vector (the last entry: every
parameter outside the layers). Its sums join the monitor's one collective at the next log step.

Each parameter is counted once across ranks: the `ParameterCollector` decides which parameters
this rank counts (tensor-parallel shards on every TP rank, replicated ones on TP rank 0, data-
parallel replicas on DP rank 0) and in which layer. Optimizers that step copies of the model's
parameters (Megatron's fp32 main params) name their model parameter through `aliases`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_gate.monitor.tensor_statistics import GroupedSumOfSquares


class UpdateNorm:
    """Per-layer sums of squared updates, accumulated bucket by bucket on the device."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        groups: Sequence[int],
        *,
        num_layers: int,
        device: torch.device,
    ) -> None:
        self.group_of = {id(param): group for param, group in zip(params, groups, strict=True)}
        self.num_layers = num_layers
        self.device = device
        self.aliases: dict[int, int] = {}
        """id(stepped tensor) -> id(model parameter) for optimizers that step copies."""
        self.update_sumsq: torch.Tensor | None = None
        """`[num_layers + 1]` of the last measured step, or None."""
        self._pending: torch.Tensor | None = None
        self._squares = GroupedSumOfSquares(device)

    def begin(self) -> None:
        """Start measuring one optimizer step."""
        self._pending = torch.zeros(self.num_layers + 1, device=self.device)

    def add(self, params: Sequence[torch.Tensor], changes: Sequence[torch.Tensor]) -> None:
        """`on_bucket` of `bucketed_step`: add sum((new - old)^2) of this bucket per layer."""
        if self._pending is None:
            self.begin()
        rows, counted = [], []
        for param, change in zip(params, changes, strict=True):
            group = self.group_of.get(self.aliases.get(id(param), id(param)))
            if group is not None:  # else counted on another rank, or not a model parameter
                rows.append(group)
                counted.append(change)
        self._squares.add(self._pending, counted, rows)

    def finish(self, accept: torch.Tensor | None = None) -> None:
        """End the step: its update, zero where the guard rejected it (nothing was applied)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if accept is not None:
            pending = torch.where(accept, pending, torch.zeros_like(pending))
        self.update_sumsq = pending

    def discard(self) -> None:
        """Forget the measured update (the parameters were reloaded, e.g. by a rollback)."""
        self.update_sumsq = None
        self._pending = None
