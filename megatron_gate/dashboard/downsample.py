"""Reduce a step range to what a chart can show, keeping the extremes that matter for stability.

Lines keep the minimum and the maximum of each bucket of steps (so a one-step loss spike survives
any zoom level); heatmaps keep each layer's maximum over a bucket (the worst value, which is what
a massive activation or an attention sink looks like). NaN means "not logged" and is ignored,
except that an all-NaN bucket stays NaN (a gap).
"""

from __future__ import annotations

import math

import numpy as np


def bucket_size(n: int, max_buckets: int) -> int:
    """Steps per bucket so that `n` steps make at most `max_buckets` buckets."""
    return max(1, math.ceil(n / max(1, max_buckets)))


def _pad_rows(a: np.ndarray, k: int) -> np.ndarray:
    """Pad axis 0 with NaN to a multiple of `k` and reshape to [buckets, k, ...]."""
    n = a.shape[0]
    buckets = math.ceil(n / k)
    padded = np.full((buckets * k, *a.shape[1:]), np.nan, dtype=a.dtype)
    padded[:n] = a
    return padded.reshape(buckets, k, *a.shape[1:])  # [n, ...] -> [buckets, k, ...]


def minmax_series(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points of (x, y): per bucket, the points holding its min and its max."""
    n = len(x)
    if n <= max_points:
        return x, y
    k = bucket_size(n, max_points // 2)
    rows = _pad_rows(y.astype(np.float64), k)  # [buckets, k]
    nan = np.isnan(rows)
    lowest = np.where(nan, np.inf, rows).argmin(axis=1)
    highest = np.where(nan, -np.inf, rows).argmax(axis=1)
    starts = np.arange(rows.shape[0]) * k
    # An all-NaN bucket yields index 0 for both: its NaN point is kept and draws as a gap.
    index = np.unique(np.concatenate([starts + lowest, starts + highest]))
    index = index[index < n]
    return x[index], y[index]


def bucket_max(
    steps: np.ndarray, matrix: np.ndarray, max_buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """[n, layers] -> ([buckets] first step of each bucket, [buckets, layers] max over the bucket)."""
    n = len(steps)
    if n <= max_buckets:
        return steps, matrix
    k = bucket_size(n, max_buckets)
    blocks = _pad_rows(matrix, k)  # [buckets, k, layers]
    return steps[::k], np.fmax.reduce(blocks, axis=1)  # fmax ignores NaN unless all are NaN


def rounded(values: np.ndarray, *, digits: int = 5) -> list[float | None]:
    """Values as a JSON-ready list: `digits` significant digits, None for NaN and +-Inf.

    Rounding keeps the page's transfer small (float32 values printed in full take ~18 chars).
    """
    a = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(a)
    out = np.where(finite, a, 0.0)
    with np.errstate(divide="ignore"):
        magnitude = np.floor(np.log10(np.abs(out), where=out != 0, out=np.zeros_like(out)))
    exponent = digits - 1 - magnitude
    # Multiply or divide by an exact power of ten so that e.g. 12345678 does not become 12345600.000000002.
    up = exponent >= 0
    with np.errstate(over="ignore", invalid="ignore"):  # the branch np.where does not take
        scale = 10.0 ** np.abs(exponent)
        rounded_values = np.where(up, np.round(out * scale) / scale, np.round(out / scale) * scale)
    # Near the float limits rounding can overflow (1.79769e308 -> 1.7977e308) or lose a
    # subnormal: keep the value as it is there.
    out = np.where(np.isfinite(rounded_values), rounded_values, out)
    result: list[float | None] = out.tolist()
    if not finite.all():
        for i in np.flatnonzero(~finite):
            result[i] = None
    return result
