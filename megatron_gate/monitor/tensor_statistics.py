"""max |x| and sum of x^2 of many tensors, with few ops: the monitor's activation statistics.

A logged step observes three activations per layer. Each observation is a *partial*
`(min, max, 2-norm)`, read from the tensor once, and all of a step's partials are finished
together by `finish` (a handful of ops for the whole model, not a few per layer):

    partial = partial_statistics(x)               # per tensor, during the forward
    abs_max, sumsq = finish([p0, p1, ...])        # once per logged step, [n] each, float32

- `partial_statistics` is one fused kernel (`torch.compile`) on CUDA, where a kernel launch
  costs more than the extra read; elsewhere two eager reductions (`aminmax`, `vector_norm`),
  neither of which makes a copy of `x` (no `|x|` or `x^2` temporary). On this project's CPUs
  the compiled call costs 47 us against 11 us eager at the benchmark model's shapes (plus
  ~20 s of compilation per process), so the CPU stays eager.
- `plain_abs_max_and_sumsq` is the reference that tests compare the fast path with.
- `GroupedSumOfSquares` adds the squared norms of many tensors into per-group slots (layers)
  with one `_foreach_norm` and one `index_add_` (gradient and update norms per layer).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""`(min, max, 2-norm in float32)` of one tensor, 0-d each, on its device."""

# "0" keeps the eager path everywhere, "1" compiles on every device (e.g. to measure the CPU).
COMPILE_ENV = "MEGATRON_GATE_MONITOR_COMPILE"


def _eager_partial(tensor: torch.Tensor) -> Partial:
    low, high = torch.aminmax(tensor)
    return low, high, torch.linalg.vector_norm(tensor, 2, dtype=torch.float32)


def _fusable_partial(tensor: torch.Tensor) -> Partial:
    # The same three reductions written so that inductor emits one loop over `tensor`.
    return tensor.amin(), tensor.amax(), torch.linalg.vector_norm(tensor, 2, dtype=torch.float32)


class _PartialStatistics:
    """`partial_statistics` with its compiled variant chosen per device type, once."""

    def __init__(self) -> None:
        self._by_device_type: dict[str, Callable[[torch.Tensor], Partial]] = {}
        self._compiled: Callable[[torch.Tensor], Partial] | None = None

    def __call__(self, tensor: torch.Tensor) -> Partial:
        kind = tensor.device.type
        function = self._by_device_type.get(kind)
        if function is None:
            function = self._by_device_type[kind] = self._choose(kind)
        if function is _eager_partial:
            return _eager_partial(tensor)
        try:
            return function(tensor)
        except Exception as error:  # noqa: BLE001 - a compiler failure must not cost the statistic
            logger.warning(
                "stability monitor: the compiled statistics kernel failed on %s (%s: %s); "
                "using the eager path.",
                kind,
                type(error).__name__,
                error,
            )
            self._by_device_type[kind] = _eager_partial
            return _eager_partial(tensor)

    def _choose(self, device_type: str) -> Callable[[torch.Tensor], Partial]:
        if not compile_enabled(device_type):
            return _eager_partial
        if self._compiled is None:
            self._compiled = torch.compile(_fusable_partial, dynamic=True)
        return self._compiled


def compile_enabled(device_type: str) -> bool:
    """Whether `partial_statistics` compiles for tensors on `device_type`.

    Off when TorchDynamo is disabled (`TORCHDYNAMO_DISABLE=1`, as in the tests) or
    `MEGATRON_GATE_MONITOR_COMPILE=0`; on CUDA by default, elsewhere only with `=1`.
    """
    setting = os.environ.get(COMPILE_ENV, "")
    if setting == "0" or os.environ.get("TORCHDYNAMO_DISABLE", "") in ("1", "true", "True"):
        return False
    if not hasattr(torch, "compile"):
        return False
    return setting == "1" or device_type == "cuda"


partial_statistics = _PartialStatistics()
"""`(min, max, float32 2-norm)` of a tensor, read once; call it under `torch.no_grad()`."""


def finish(partials: Sequence[Partial]) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n]` float32 max |x| and `[n]` float32 sum of x^2 of the `n` observed tensors."""
    lows, highs, norms = zip(*partials, strict=True)
    # stack promotes mixed dtypes (bf16 and fp32 activations) to the widest one.
    low = torch.stack(lows).float()
    high = torch.stack(highs).float()
    return torch.maximum(high, low.neg_()), torch.stack(norms).square_()


def abs_max_and_sumsq(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-d float32 (max |x|, sum of x^2) through the fast path (one tensor)."""
    with torch.no_grad():
        abs_max, sumsq = finish([partial_statistics(tensor)])
    return abs_max[0], sumsq[0]


def plain_abs_max_and_sumsq(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: 0-d float32 (max |x|, sum of x^2), computed the obvious way in float64."""
    values = tensor.detach().double()
    return values.abs().max().float(), values.square().sum().float()


class GroupedSumOfSquares:
    """`out[g] += sum of x^2` over the tensors x of each group g, in a few ops for all of them.

    One `_foreach_norm` (float32 accumulation) and one `index_add_`; the group index tensor is
    cached per group list (the same parameters every step).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    @torch.no_grad()
    def add(
        self, out: torch.Tensor, tensors: Sequence[torch.Tensor], groups: Sequence[int]
    ) -> None:
        """Add each tensor's sum of squares into `out[group]` (in place)."""
        if not tensors:
            return
        norms = torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32))
        out.index_add_(0, self._index(groups), norms.square_().to(self.device))

    def _index(self, groups: Sequence[int]) -> torch.Tensor:
        key = tuple(groups)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(key, device=self.device)
        return self._index_cache[key]
