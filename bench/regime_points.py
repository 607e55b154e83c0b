"""The regime search's points and its statistics: the layer below `regime_search.py` (runs
them) and `regime_report.py` (tables and figures of their results)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

# One point of the search: the TrainConfig fields that differ from BASE, plus the data options.
BASE: dict[str, Any] = dict(
    layers=4, hidden=128, heads=4, seq_len=128, batch_size=4, steps=100, lr=1e-1,
    weight_decay=0.1, log_interval=20, eval_interval=50, eval_batches=4,
    checkpoint_interval=10**9, write_checkpoints=False,
)  # fmt: skip
LONG: dict[str, Any] = dict(steps=2000, batch_size=8, log_interval=50, eval_interval=500)
"""The second round's training length: 2000 steps of 8 x 128 tokens (2M tokens)."""
SEARCH: dict[str, dict[str, Any]] = {
    # The demo's regime (no BOS), then the factors the literature ties to sinks, one at a time
    # (most informative first: an interrupted search still covers them).
    "demo": {},
    "bos": {"bos": True},
    "bos_lr0.01": {"bos": True, "lr": 1e-2},
    "bos_lr1": {"bos": True, "lr": 1.0},
    "bos_8layers": {"bos": True, "layers": 8},
    "bos_long": {"bos": True, "steps": 400},
    "bos_lr3": {"bos": True, "lr": 3.0},
    "bos_wd0": {"bos": True, "weight_decay": 0.0},
    "bos_warmup0": {"bos": True, "warmup_steps": 1},
    "bos_seq256": {"bos": True, "seq_len": 256, "batch_size": 2},
    "bos_lr0.3": {"bos": True, "lr": 0.3},
    "bos_8layers_lr0.01": {"bos": True, "layers": 8, "lr": 1e-2},
    "bos_long_lr0.01": {"bos": True, "steps": 400, "lr": 1e-2},
    # Second round (idle machine): moderate LRs trained 5-20x longer at batch 8, where the sink
    # literature (Xiao et al. 2023; Gu et al. 2024) sees sinks grow; then depth, width,
    # sequence, weight decay, warm-up and the BOS control around the best of them.
    "bos_2k_lr1e-3": {"bos": True, "lr": 1e-3, **LONG},
    # The final comparison at a moderate LR: a quarter of bos_2k_lr3e-3 (12 runs fit the budget).
    "bos_500_lr3e-3": {"bos": True, "lr": 3e-3, **LONG, "steps": 500, "eval_interval": 250},
    "bos_2k_lr3e-3": {"bos": True, "lr": 3e-3, **LONG},
    "bos_2k_lr1e-2": {"bos": True, "lr": 1e-2, **LONG},
    "bos_2k_lr3e-3_8layers": {"bos": True, "lr": 3e-3, **LONG, "layers": 8},
    "bos_2k_lr3e-3_h256": {"bos": True, "lr": 3e-3, **LONG, "hidden": 256},
    "bos_2k_lr3e-3_seq256": {"bos": True, "lr": 3e-3, **LONG, "seq_len": 256, "batch_size": 4},
    "bos_2k_lr3e-3_wd0": {"bos": True, "lr": 3e-3, **LONG, "weight_decay": 0.0},
    "bos_2k_lr3e-3_wd1": {"bos": True, "lr": 3e-3, **LONG, "weight_decay": 1.0},
    "bos_4k_lr3e-3": {"bos": True, "lr": 3e-3, **LONG, "steps": 4000},
    "bos_2k_lr3e-3_warmup0": {"bos": True, "lr": 3e-3, **LONG, "warmup_steps": 1},
    "nobos_2k_lr3e-3": {"lr": 3e-3, **LONG},
}
VARIANT_ORDER = ("baseline", "qk_layernorm", "gated_headwise", "gated_elementwise")
DATA_KEYS = ("bos", "doc_split")


# ---------------------------------------------------------------------- statistics
def bootstrap_ci(
    values: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap over the values (seeds), resampled with
    replacement. With 3 seeds it is coarse (10 distinct resample means); it is what we have."""
    values = list(values)
    if not values:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return sum(values) / len(values), low, high


__all__ = ["BASE", "DATA_KEYS", "LONG", "SEARCH", "VARIANT_ORDER", "bootstrap_ci"]
