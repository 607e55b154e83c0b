"""Recompute a step the guard rejected in Megatron-LM's loop, on the same batch.

    train_step(n)  -> the guard rejects (nothing applied, Megatron counts a skipped iteration)
    train_step(n) again, on the replayed micro-batches and the random state of the first run
                   -> the guard re-tests: transient (the update is applied) | reproducible

Megatron's rerun state machine (`megatron/core/rerun_state_machine.py`) does the replay where
the user runs it (`--rerun-mode validate_results`, the default of megatron-core 0.19): its
`RerunDataIterator` already keeps the step's micro-batches and its saved random state (CPU,
CUDA, the model-parallel RNG tracker) is the step's. The second run is the machine's own
"rerun in place": the step is handed to it as a failed validation (`MESSAGE`, not fatal), it
restores, rewinds, reruns, compares the first and second (loss, grad norm) within
`TOLERANCE`, logs and writes its tracker file as for its own checks; its checkpoint-and-exit
path (exit 16, rerun on another GPU; 17, failed validation) stays with its own fatal checks
(`--check-for-nan-in-loss-and-grad` where kept, a script's spiky-loss check). With
`--rerun-mode disabled` the same replay is done here: the micro-batches by reference, the
random state with the machine's own save/restore.

Nothing is copied on an accepted step: the references to this step's micro-batches are dropped
at the next step, and the random state is a few host bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

MESSAGE = "megatron-gate stability guard rejected the step"
TOLERANCE = 1.0e-3
"""Relative difference of the (loss, grad norm) of the two runs that still counts as the same
result (Megatron's own for its gradient checks: non-deterministic kernels)."""


def _machine() -> Any:
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    return get_rerun_state_machine()


def machine_validates() -> bool:
    """Whether Megatron's rerun state machine runs (`--rerun-mode validate_results`)."""
    from megatron.core.rerun_state_machine import RerunMode

    return _machine().get_mode() == RerunMode.VALIDATE_RESULTS


class ReplayingIterator:
    """A data iterator that keeps the current step's micro-batches (references) to replay them."""

    def __init__(self, source: Iterator[Any]) -> None:
        self.source = source
        self.kept: list[Any] = []
        self.position: int | None = None
        """Next micro-batch to replay; None while reading from the source."""

    def __iter__(self) -> ReplayingIterator:
        return self

    def __next__(self) -> Any:
        if self.position is not None and self.position < len(self.kept):
            self.position += 1
            return self.kept[self.position - 1]
        item = next(self.source)
        self.kept.append(item)
        return item

    def new_step(self) -> None:
        self.kept, self.position = [], None

    def rewind(self) -> None:
        self.position = 0


class StepReplay:
    """What one training step needs to run again, and how the second run is set up."""

    def __init__(self) -> None:
        self._iterators: list[ReplayingIterator] = []
        self._by_source: dict[int, ReplayingIterator] = {}

    def begin(self, data_iterator: Any) -> Any:
        """At the start of a train step: the data iterator to use (replaying where Megatron's
        machine does not keep the micro-batches) and the random state to come back to."""
        if machine_validates():
            return data_iterator  # its RerunDataIterator keeps them; it saved the random state
        _machine()._save_state()  # noqa: SLF001 - the machine's own RNG save (also the tracker's)
        if isinstance(data_iterator, list):
            return [self._replaying(item) for item in data_iterator]
        return self._replaying(data_iterator)

    def _replaying(self, source: Any) -> Any:
        if source is None:
            return None
        replaying = self._by_source.get(id(source))
        if replaying is None or replaying.source is not source:
            replaying = self._by_source[id(source)] = ReplayingIterator(source)
        replaying.new_step()
        return replaying

    def prepare_rerun(self, first: torch.Tensor) -> None:
        """Before the second `train_step`: hand the step to the machine as a failed validation
        (its rerun in place), or rewind the micro-batches and restore the random state here.

        `first`: the first run's `values` (compared with the rerun's by the machine)."""
        from megatron.core.rerun_state_machine import Call, Caller, RerunState

        machine = _machine()
        if machine_validates():
            machine.state = RerunState.INITIAL_RUN
            machine.rerun_requested = True
            machine.failed_validation_call = Call(Caller(MESSAGE, _rank()), 1)
            machine.initial_result = first
            return
        machine.current_iteration -= 1  # the second `train_step` counts the iteration again
        machine._restore_state()  # noqa: SLF001
        for replaying in self._by_source.values():
            replaying.rewind()

    def validate_rerun(self, values: torch.Tensor) -> None:
        """In the machine's rerun (every rank): compare with the first run, as its checks do."""
        from megatron.core.rerun_state_machine import RerunState

        machine = _machine()
        if machine_validates() and machine.state == RerunState.RERUNNING_IN_PLACE:
            machine.validate_result(
                result=values, rejection_func=lambda _value: True, message=MESSAGE,
                comparison_func=relative_difference, tolerance=TOLERANCE, fatal=False,
            )  # fmt: skip


def values(loss: Any, grad_norm: Any) -> torch.Tensor:
    """(loss, grad norm) as the machine's result (NaN where a rank has no value)."""
    as_float = [math.nan if v is None else float(v) for v in (loss, grad_norm)]
    return torch.tensor(as_float, dtype=torch.float64)


def relative_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    """The largest relative difference of two `values` (NaN equals NaN, Inf equals Inf)."""
    worst = 0.0
    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        if a == b or (math.isnan(a) and math.isnan(b)):
            continue
        if not (math.isfinite(a) and math.isfinite(b)):
            return math.inf
        worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-30))
    return worst


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
