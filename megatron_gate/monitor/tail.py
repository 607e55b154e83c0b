"""Thresholds from a target false-alarm rate: peaks over threshold with a generalized Pareto tail.

Loss and gradient-norm residuals are heavy-tailed, so a normal "k sigma" threshold fires far more
often than its nominal rate. Following SPOT (Siffer et al., KDD 2017), the largest
`tail_fraction` of the residual history is modelled as a generalized Pareto distribution (GPD)
above the initial threshold `u`; the threshold for a per-step exceedance probability `rate` is
the GPD quantile

    z(rate) = u + sigma / xi * ((rate * n / k) ** -xi - 1)      (xi != 0; u - sigma * log(...) at 0)

with n residuals, k of them above u. The GPD is fitted by probability-weighted moments
(Hosking & Wallis 1987), which need no iteration and behave well for the 10-100 excesses a
rolling window holds. Pure Python: every rank computes the same threshold from the same numbers.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable

# The GPD shape is clamped to [0, 0.9]: a fitted bounded tail (xi < 0) is the finite-sample look
# of a normal tail and would put the threshold too low; at 1 and above the mean is infinite.
MIN_SHAPE, MAX_SHAPE = 0.0, 0.9
SHAPE_MARGIN = 1.0
IQR_TO_SIGMA = 1.349


def gpd_fit(excesses: list[float]) -> tuple[float, float]:
    """(shape xi, scale sigma) of a GPD fitted to non-negative `excesses` by PWM."""
    ordered = sorted(excesses)
    count = len(ordered)
    mean = sum(ordered) / count
    # a1 = E[Y (1 - F(Y))], plotting positions (i - 0.35) / k
    weighted = sum((1 - (i + 0.65) / count) * y for i, y in enumerate(ordered)) / count
    if mean <= 0:
        return 0.0, 0.0
    denominator = mean - 2 * weighted
    if denominator <= 0:  # an extremely heavy tail: take the heaviest shape allowed
        return MAX_SHAPE, mean * (1 - MAX_SHAPE)
    shape = 2 - mean / denominator  # xi = -k of Hosking & Wallis
    scale = 2 * mean * weighted / denominator
    shape = min(max(shape, MIN_SHAPE), MAX_SHAPE)
    return shape, max(scale, 0.0)


def gpd_quantile(*, shape: float, scale: float, probability: float) -> float:
    """The excess y with P(Y > y) = `probability` under GPD(shape, scale)."""
    if abs(shape) < 1e-9:
        return -scale * math.log(probability)
    return scale / shape * (probability**-shape - 1)


class TailThreshold:
    """A rolling residual history and its POT threshold for a target exceedance rate.

    Args:
        window: residuals kept (the oldest leaves when a new one comes).
        tail_fraction: share of the history above the initial threshold u (the fitted tail).
        min_excesses: fewest excesses the GPD is fitted to; fewer residuals: no threshold.
    """

    def __init__(self, *, window: int, tail_fraction: float = 0.05, min_excesses: int = 16) -> None:
        self.window, self.tail_fraction, self.min_excesses = window, tail_fraction, min_excesses
        self.history: deque[float] = deque()
        self._sorted: list[float] = []
        self._fitted: dict[float, tuple[tuple[float, ...], float]] = {}
        """rate -> (the tail it was fitted to, its quantile): most residuals fall below the
        tail and leave the fit unchanged, so a step refits only when the tail moved."""

    def __len__(self) -> int:
        return len(self.history)

    def add(self, residual: float) -> None:
        """Add a residual (dropping the oldest one beyond `window`)."""
        if len(self.history) == self.window:
            oldest = self.history.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, oldest)]
        self.history.append(residual)
        bisect.insort(self._sorted, residual)

    def extend(self, residuals: Iterable[float]) -> None:
        """Add several residuals in order."""
        for residual in residuals:
            self.add(residual)

    def ready(self) -> bool:
        """Whether enough residuals are held to fit the tail."""
        return len(self.history) * self.tail_fraction >= self.min_excesses

    def robust_sigma(self) -> tuple[float, float]:
        """Median and interquartile range / 1.349 (a normal's sigma) of the history."""
        count = len(self._sorted)
        median = self._sorted[count // 2]
        spread = self._sorted[(3 * count) // 4] - self._sorted[count // 4]
        return median, spread / IQR_TO_SIGMA

    def quantile(self, rate: float) -> float | None:
        """The residual exceeded with probability `rate` per step (None until `ready`)."""
        if not self.ready():
            return None
        count = len(self._sorted)
        excess_count = max(self.min_excesses, int(self.tail_fraction * count))
        initial = self._sorted[count - excess_count - 1]
        conditional = rate * count / excess_count
        if conditional >= 1:  # inside the data: the empirical quantile
            return self._sorted[min(count - 1, int((1 - rate) * count))]
        tail = (count, *self._sorted[count - excess_count - 1 :])
        fitted = self._fitted.get(rate)
        if fitted is None or fitted[0] != tail:
            fitted = self._fitted[rate] = tail, self._fit(initial, excess_count, conditional)
        return fitted[1]

    def _fit(self, initial: float, excess_count: int, conditional: float) -> float:
        """The POT quantile above `initial` for the conditional exceedance probability."""
        excesses = [value - initial for value in self._sorted[-excess_count:]]
        shape, scale = gpd_fit(excesses)
        # Extrapolate with the shape one standard error heavier ((1 + xi) / sqrt(k) for the
        # GPD): an underestimated tail would raise the false-alarm rate far above `rate`.
        shape = min(MAX_SHAPE, shape + SHAPE_MARGIN * (1 + shape) / math.sqrt(excess_count))
        return initial + gpd_quantile(shape=shape, scale=scale, probability=conditional)

    def state_dict(self) -> list[float]:
        """The residuals, oldest first."""
        return list(self.history)

    def load_state_dict(self, residuals: Iterable[float]) -> None:
        """Restore the residuals."""
        self.history, self._sorted = deque(), []
        self.extend(residuals)
