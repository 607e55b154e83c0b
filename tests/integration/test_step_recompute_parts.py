"""The pieces of the Megatron-LM step recompute that need no training run: the replaying data
iterator and the comparison handed to Megatron's rerun state machine."""

from __future__ import annotations

import math

import torch

from megatron_gate.megatron_lm.step_recompute import (
    ReplayingIterator,
    relative_difference,
    values,
)


def test_replaying_iterator_gives_the_same_micro_batches_again() -> None:
    source = iter([{"tokens": i} for i in range(10)])
    replaying = ReplayingIterator(source)
    first = [next(replaying), next(replaying)]
    replaying.rewind()
    assert [next(replaying), next(replaying)] == first
    assert all(a is b for a, b in zip(first, replaying.kept, strict=True))  # no copies
    replaying.new_step()
    assert next(replaying) == {"tokens": 2} and len(replaying.kept) == 1


def test_relative_difference_of_loss_and_grad_norm() -> None:
    first = values(torch.tensor(2.0), 10.0)
    assert relative_difference(first, values(2.0, 10.0)) == 0.0
    assert math.isclose(relative_difference(first, values(2.0, 10.05)), 0.05 / 10.05)
    assert relative_difference(values(math.nan, 1.0), values(math.nan, 1.0)) == 0.0  # NaN again
    assert relative_difference(values(math.nan, 1.0), values(2.0, 1.0)) == math.inf
    assert relative_difference(values(None, math.inf), values(None, 3.0)) == math.inf
