"""`GuardRule`: the guard's rule on host numbers, for CPU runs and as the reference.

`StepGuard` (guard.py) evaluates the rule with tensor ops on the device, so that a CUDA step
never waits for a host read. Where the values already live on the host (a CPU run: reading a
CPU tensor waits for nothing), the same rule is cheaper in plain Python: two reads and a few
sorts of at most `window` floats, against ~80 dispatched tensor ops. The tests hold the two
paths to the same decisions and records.

The rule, per signal s in (loss, grad norm), is stated in guard.py's docstring.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from megatron_gate.monitor.config import GuardConfig

MAD_TO_SIGMA = 1.4826
SIGNALS: tuple[str, ...] = ("loss", "grad_norm")

# Columns of a guard record (one row per step in the monitor's step buffer). Flags are the
# decision's (identical on every rank); values are this rank's, -inf where a signal is absent.
RECORD_COLUMNS: tuple[str, ...] = (
    "accepted",
    "non_finite_loss",
    "non_finite_grad_norm",
    "loss_spike",
    "grad_norm_spike",
    "loss",
    "grad_norm",
    "loss_center",
    "grad_norm_center",
    "loss_scale",
    "grad_norm_scale",
    "loss_z",
    "grad_norm_z",
)


def lower_median(values: Sequence[float]) -> float:
    """The lower median (as `torch.nanmedian`), NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class SignalTest:
    """One signal's test on one step."""

    present: bool
    value: float
    log: float | None
    """log(value) when the value is finite and positive (it may enter the history)."""
    center: float
    scale: float
    z: float
    non_finite: bool
    spike: bool
    new_level: bool


@dataclass(frozen=True)
class Evaluation:
    """Both signals' tests on one step, before the ranks' flags are combined."""

    tests: tuple[SignalTest, SignalTest]

    @property
    def flags(self) -> list[float]:
        """[non-finite loss, non-finite grad norm, loss spike, grad norm spike] as 0/1."""
        return [float(t.non_finite) for t in self.tests] + [float(t.spike) for t in self.tests]

    def record(self, accept: bool, flags: Sequence[float]) -> list[float]:
        """The step's `RECORD_COLUMNS` (with the combined `flags`)."""
        details = [
            [t.value, t.center, t.scale, t.z][column] if t.present else -math.inf
            for column in range(4)
            for t in self.tests
        ]
        return [float(accept), *flags, *details]


class GuardRule:
    """The guard's running state and rule in plain Python (see guard.py for the rule)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self.history: list[deque[float]] = [deque(maxlen=config.window) for _ in SIGNALS]
        """Accepted log-values per signal, oldest first."""
        self.streak = [0, 0]
        self._tested = (config.skip_loss_spikes, config.skip_grad_norm_spikes)
        self._jumps = tuple(config.relative_jump(signal) for signal in SIGNALS)

    def evaluate(self, values: Sequence[float | None]) -> Evaluation:
        """Test (loss, grad norm) against the accepted history (no state change)."""
        tests = [self._test(s, value) for s, value in enumerate(values)]
        return Evaluation(tests=(tests[0], tests[1]))

    def _test(self, signal: int, value: float | None) -> SignalTest:
        config, history = self.config, self.history[signal]
        present = value is not None
        value = 1.0 if value is None else float(value)
        finite = math.isfinite(value)
        positive = present and finite and value > 0
        log = math.log(value) if positive else 0.0
        center, scale = self._center_scale(history)
        z = (log - center) / scale
        tested = positive and self._tested[signal] and len(history) >= config.min_history
        jump = math.expm1(log - center)
        spike = tested and z > config.z_threshold and jump > self._jumps[signal]
        new_level = spike and self.streak[signal] >= config.max_consecutive_skips
        return SignalTest(
            present=present, value=value, log=log if positive else None, center=center,
            scale=scale, z=z, non_finite=present and not finite and config.skip_non_finite,
            spike=spike and not new_level, new_level=new_level,
        )  # fmt: skip

    def _center_scale(self, history: Sequence[float]) -> tuple[float, float]:
        """Median and robust scale (1.4826 MAD, at least `scale_floor`) of a history."""
        center = lower_median(history)
        deviation = lower_median([abs(h - center) for h in history])
        if math.isnan(deviation):
            return center, self.config.scale_floor
        return center, max(MAD_TO_SIGMA * deviation, self.config.scale_floor)

    def update(self, evaluation: Evaluation, accept: bool) -> None:
        """Enter the step's values when it was accepted (a new level restarts its history)."""
        for signal, test in enumerate(evaluation.tests):
            history = self.history[signal]
            if accept and test.new_level:
                history.clear()
            if accept and test.log is not None:
                history.append(test.log)
            self.streak[signal] = self.streak[signal] + 1 if test.spike else 0

    def decide(self, values: Sequence[float | None]) -> bool:
        """Evaluate and update for one rank alone: accept (True) or skip."""
        evaluation = self.evaluate(values)
        accept = not any(evaluation.flags)
        self.update(evaluation, accept)
        return accept

    # ------------------------------------------------------------------ checkpoint state
    def ring_state(self) -> dict[str, list]:
        """The state in `StepGuard`'s ring-buffer form (one checkpoint format for both paths)."""
        window = self.config.window
        history = [list(h) + [math.nan] * (window - len(h)) for h in self.history]
        counts = [len(h) for h in self.history]
        return {
            "history": history,
            "count": counts,
            "position": [count % window for count in counts],
            "streak": list(self.streak),
        }

    def load_ring_state(self, state: dict[str, list]) -> None:
        """Restore `ring_state()` (or `StepGuard.state_dict()`) output; the oldest value first."""
        window = self.config.window
        for signal in range(len(SIGNALS)):
            ring, count = state["history"][signal], int(state["count"][signal])
            oldest = (int(state["position"][signal]) - count) % window
            values = [ring[(oldest + i) % window] for i in range(count)]
            self.history[signal] = deque(values, maxlen=window)
        self.streak = [int(s) for s in state["streak"]]
