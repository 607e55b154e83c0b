"""Server-side downsampling against plain per-bucket loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_gate.dashboard.downsample import bucket_max, bucket_size, minmax_series, rounded


def _buckets(n: int, k: int) -> list[range]:
    return [range(s, min(s + k, n)) for s in range(0, n, k)]


@pytest.mark.parametrize("n, max_points", [(1000, 100), (1001, 64), (37, 10), (50, 50)])
def test_minmax_keeps_each_buckets_extremes(n: int, max_points: int) -> None:
    rng = np.random.default_rng(n)
    x = np.arange(n) * 10
    y = rng.normal(size=n)
    y[n // 3] = 50.0  # a one-step spike must survive
    y[rng.integers(0, n, size=n // 10)] = np.nan  # unlogged steps
    xs, ys = minmax_series(x, y, max_points)
    assert len(xs) <= max_points
    assert np.all(np.diff(xs) > 0)
    assert 50.0 in ys
    if n <= max_points:
        np.testing.assert_array_equal(xs, x)
        return
    kept = set(xs.tolist())
    for bucket in _buckets(n, bucket_size(n, max_points // 2)):
        values = [y[i] for i in bucket if not math.isnan(y[i])]
        if not values:
            continue
        kept_values = [y[i] for i in bucket if x[i] in kept]
        assert min(values) in kept_values and max(values) in kept_values


def test_bucket_max_matches_a_loop() -> None:
    rng = np.random.default_rng(0)
    n, layers = 997, 5
    matrix = rng.random((n, layers)).astype(np.float32)
    matrix[:, 2] = np.nan  # an ungated layer: no gate statistics
    matrix[100:140, 0] = np.nan
    steps = np.arange(1, n + 1)
    xs, z = bucket_max(steps, matrix, 40)
    k = bucket_size(n, 40)
    assert z.shape == (len(_buckets(n, k)), layers) and len(xs) == z.shape[0]
    for b, bucket in enumerate(_buckets(n, k)):
        assert xs[b] == steps[bucket.start]
        for layer in range(layers):
            values = [matrix[i, layer] for i in bucket if not np.isnan(matrix[i, layer])]
            expected = max(values) if values else np.nan
            np.testing.assert_equal(z[b, layer], np.float32(expected))


def test_rounded_significant_digits_and_gaps() -> None:
    values = np.array([1.23456789e-8, 12345678.0, 0.0, np.nan, np.inf, -3.14159265, 0.1 + 0.2])
    assert rounded(values) == [1.2346e-08, 12346000.0, 0.0, None, None, -3.1416, 0.3]
    assert rounded(np.array([987.654]), digits=3) == [988.0]


def test_rounded_stays_finite_at_the_float_limits() -> None:
    import sys

    values = np.array([sys.float_info.max, -sys.float_info.max, 5e-324, 1e-310, np.inf, np.nan])
    result = rounded(values)
    assert result[:4] == [sys.float_info.max, -sys.float_info.max, 5e-324, 1e-310]
    assert result[4:] == [None, None]
