"""Detectors: pure functions over numbers (no torch, no torch.distributed).

Every rank runs the same detectors on the same reduced numbers, so every rank reaches the same
decision without another collective. Detectors report EPISODES, not alarms: an event opens
(`phase` "open", the configured action), may be updated (`phase` "update": a divergence, or a
further step to skip), and closes (`phase` "close", action "log") with its kind, peak, duration
and detection delay. Feed them step by step, in step order; a batch of buffered steps is a loop
over `DetectorSuite.check` (`check_steps`).

- `RobustSpikeDetector`: loss (log scale), grad norm and update norm (log scale). The level is
  the median of the last `level_window` non-event values; the residual (value - level) opens an
  event above the quantile of rate `false_alarm_rate` of the residual history's generalized
  Pareto tail (`tail.TailThreshold`), floored by `min_relative_jump`. Kinds at close: spike (one
  step), bump (several steps, back to the level), level_shift (stayed `level_shift_steps` at a
  new, stable level: benign, the level moves), divergence (growing 3 steps in a row and at least
  2x the opening residual, or non-finite while open).
- `LossSpikeDetector`: that test on the loss, plus Megatron's rule (loss > ratio x the max of the
  first `warmup_steps` losses) when `ratio` is set (off by default).
- `OutlierDetector`: one-step outliers a person sees on the curve, on the linear value: above
  the median of the previous `window` values by more than max(`min_absolute_jump`,
  `z_threshold` x 1.4826 MAD). Severity info by default: it informs where the spike test stays
  silent (a micro-batch loss has real one-step data outliers that need no action).
- `NanInfDetector`: the device-side NaN/Inf flag; 3 non-finite steps in a row are a divergence.
- `LayerThresholdDetector`: per layer, value > `threshold` or > `ratio` x its own running median
  (massive activations, attention sinks, attention-logit growth): one event per layer and episode.
- `DetectorSuite`: all of them; an event seen in two of loss, grad norm and update norm within
  `CORROBORATION_STEPS` steps is corroborated (severity one level up, `confirmed_action`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from megatron_gate.monitor.config import DetectorConfig, DetectorsConfig
from megatron_gate.monitor.tail import TailThreshold

# Scale that makes the MAD of a normal distribution an estimate of its standard deviation.
MAD_TO_SIGMA = 1.4826
# A residual joins the tail history this many steps late: the first, still sub-threshold steps of
# a slowly rising bump must not raise the threshold that is about to catch it.
QUARANTINE_STEPS = 16
# Upper bound of the tail-fit threshold in robust sigmas (IQR / 1.349) of the residuals: a
# Student-t(3) tail needs ~10 at 1e-4; residuals of an undetected shift can push the fit to 50.
MAX_ROBUST_SIGMAS = 20.0
# An open scalar event closes when its residual falls below this rate's quantile.
RELEASE_RATE = 0.02
# Divergence: this many rising residuals in a row, and the value 2x its opening value ...
DIVERGENCE_RISING_STEPS = 3
DIVERGENCE_GROWTH = math.log(2.0)
# ... or, rising or not, 10x its opening value after that many steps.
DIVERGENCE_RUNAWAY = math.log(10.0)
# Level shift: the later half of the last `level_shift_steps` residuals keeps at least this share
# of the earlier half's (a bump recovers faster; a new level does not).
LEVEL_SHIFT_RETAINED = 0.8
# Steps within which events of two signals corroborate each other (an LR jump shows in the update
# at step t and in the loss at t + 1).
CORROBORATION_STEPS = 2
# A loss value within this many steps after a grad-norm event opened is "primed": a loss reaction to
# a gradient burst is likely, so its threshold is the quantile of a PRIMED_RATE_FACTOR x higher
# false-alarm rate, floored at half the usual jump.
PRIMED_STEPS = 1
PRIMED_RATE_FACTOR = 100.0
# Steps of consecutive NaN/Inf after which the non-finite episode is a divergence.
NON_FINITE_DIVERGENCE_STEPS = 3
# A per-layer condition whose action is one of these asks for it on every step it lasts (log and
# alert: one event per episode).
REPEATED_ACTIONS = ("skip_step", "lr_backoff", "rollback", "abort")
SEVERITY_UP = {"info": "warning", "warning": "critical", "critical": "critical"}
EPISODE_FIELDS = ("kind", "phase", "start_step", "end_step", "peak", "duration", "delay", "signals")


@dataclass(frozen=True, kw_only=True)
class Event:
    """One record of an episode: the fields of the schema's `event` record (without `time`)."""

    step: int
    """The step of this record (open: the detection step; close: the first step back to normal)."""
    detector: str
    severity: str
    metric: str
    value: float
    """The metric at `step`."""
    threshold: float
    """The limit in the metric's units (open: the one crossed)."""
    layer: int | None
    action: str
    message: str
    kind: str = "threshold"
    """spike | bump | level_shift | divergence | non_finite | threshold (provisional until close)."""
    phase: str = "open"
    """open | update | close."""
    start_step: int | None = None
    """Estimated first step of the episode (at or before the detection step)."""
    end_step: int | None = None
    """Last elevated step; None while the episode is open."""
    peak: float | None = None
    """Largest value of the episode so far."""
    duration: int = 1
    """Steps from `start_step` to the last elevated step, inclusive."""
    delay: int = 0
    """Detection step - `start_step`."""
    signals: tuple[str, ...] = ()
    """Scalar signals in which the episode is seen (two or more: corroborated)."""
    attribution: str | None = None
    """A rejected step recomputed on the same batch: transient | reproducible (attribution.py)."""
    samples: tuple[int, ...] | None = None
    """The sample indices of that step's batch, where the loop knows them."""

    def to_dict(self) -> dict[str, Any]:
        """The `event` record's fields: the flat ones, and `episode` {kind, phase, start_step,
        end_step, peak, duration, delay, signals} (nested: a record's own `kind` is "event")."""
        data = asdict(self)
        episode = {name: data.pop(name) for name in EPISODE_FIELDS}
        episode["signals"] = list(self.signals)
        for name in ("attribution", "samples"):  # only on attributed guard events
            if data[name] is None:
                del data[name]
        if self.samples is not None:
            data["samples"] = list(self.samples)
        return {**data, "episode": episode}


def make_event(
    config: DetectorConfig,
    *,
    step: int,
    detector: str,
    metric: str,
    value: float,
    threshold: float,
    message: str,
    layer: int | None = None,
    **episode: Any,
) -> Event:
    """An `Event` carrying the severity and action that `config` sets for its detector."""
    return Event(
        step=step,
        detector=detector,
        severity=config.severity,
        metric=metric,
        value=value,
        threshold=threshold,
        layer=layer,
        action=config.action,
        message=message,
        **episode,
    )


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def robust_center_scale(values: Sequence[float], *, level: float = 0.0) -> tuple[float, float]:
    """Median and a robust standard deviation (1.4826 x MAD, floored to stay positive)."""
    center = statistics.median(values)
    mad = statistics.median(abs(value - center) for value in values)
    # A flat window (MAD 0) would make any wiggle infinite sigmas: floor relative to the level.
    floor = 1e-3 * max(abs(level), abs(center), 1e-8)
    return center, max(MAD_TO_SIGMA * mad, floor)


@dataclass(kw_only=True)
class Episode:
    """An open event: where it started, its reference level and thresholds, what it reached."""

    start_step: int
    open_step: int
    level: float
    """Level before the episode (transformed scale)."""
    threshold: float
    """Residual threshold that opened it."""
    release: float
    """Residual below which it closes."""
    peak: float
    peak_step: int
    last_step: int
    kind: str
    opening: float = 0.0
    """Residual at the detection step."""
    residuals: list[float] = field(default_factory=list)
    """The latest residuals (at most `keep` of them: an episode may last the whole run)."""
    transformed: list[float] = field(default_factory=list)

    def add(self, residual: float, transformed: float, *, keep: int) -> None:
        """Append one step's residual and transformed value, keeping the last `keep`."""
        self.residuals.append(residual)
        self.transformed.append(transformed)
        del self.residuals[:-keep], self.transformed[:-keep]

    @classmethod
    def begin(
        cls, step: int, *, kind: str, peak: float, level: float = 0.0, threshold: float = 0.0,
        release: float = 0.0, start_step: int | None = None,
    ) -> Episode:  # fmt: skip
        """An episode detected at `step` (started at `start_step`, default `step`)."""
        return cls(
            start_step=step if start_step is None else start_step, open_step=step, level=level,
            threshold=threshold, release=release, peak=peak, peak_step=step, last_step=step,
            kind=kind,
        )  # fmt: skip

    @property
    def duration(self) -> int:
        return self.last_step - self.start_step + 1

    def fields(self, *, phase: str, end: bool = False) -> dict[str, Any]:
        """The episode fields of an `Event`."""
        return {
            "kind": self.kind,
            "phase": phase,
            "start_step": self.start_step,
            "end_step": self.last_step if end else None,
            "peak": self.peak,
            "duration": self.duration,
            "delay": self.open_step - self.start_step,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RobustSpikeDetector:
    """Episodes of a scalar rising above its recent level (module docstring: the exact test)."""

    def __init__(
        self, name: str, metric: str, config: DetectorConfig, *, log_scale: bool = False
    ) -> None:
        self.name, self.metric, self.config, self.log_scale = name, metric, config, log_scale
        self.recent: deque[float] = deque(maxlen=config.level_window)
        self.tail = TailThreshold(window=config.window)
        self.pending: deque[float] = deque()
        """The latest residuals, not yet in the tail history (see `QUARANTINE_STEPS`)."""
        self.episode: Episode | None = None

    @property
    def _keep(self) -> int:
        """Residuals an episode keeps: enough for the level-shift and divergence tests."""
        config = self.config
        return max(config.level_shift_steps, config.level_window, DIVERGENCE_RISING_STEPS + 1)

    # ------------------------------------------------------------------ scales
    def _transform(self, value: float) -> float | None:
        if not self.log_scale:
            return value
        return math.log(value) if value > 0 else None

    def _inverse(self, value: float) -> float:
        return math.exp(value) if self.log_scale else value

    def _jump(self, residual: float, level: float) -> str:
        """A residual in words: '1.32x' (log scale) or '+0.41' (linear)."""
        if self.log_scale:
            return f"{math.exp(residual):.3g}x"
        return f"{residual:+.4g} from"

    # ------------------------------------------------------------------ thresholds
    def residual_threshold(self, level: float, *, primed: bool = False) -> float | None:
        """The residual above which an event opens now (None: not enough history); `primed`:
        right after a grad-norm event (see `PRIMED_RATE_FACTOR`)."""
        if len(self.tail) + len(self.pending) < self.config.min_history:
            return None
        rate = min(0.5, self.config.false_alarm_rate * (PRIMED_RATE_FACTOR if primed else 1.0))
        quantile = self.tail.quantile(rate)
        if quantile is None:  # too few residuals for a tail fit: a conservative robust z-score
            center, sigma = robust_center_scale([*self.tail.history, *self.pending])
            quantile = center + self.config.z_threshold * sigma
        else:  # a sub-threshold level shift or bump in the history must not inflate the tail
            center, sigma = self.tail.robust_sigma()
            quantile = min(quantile, center + MAX_ROBUST_SIGMAS * sigma)
        return max(quantile, self._floor(level) / (2.0 if primed else 1.0))

    def _floor(self, level: float) -> float:
        if self.log_scale:
            return math.log1p(self.config.min_relative_jump)
        return self.config.min_relative_jump * abs(level)

    def _release(self, threshold: float) -> float:
        quantile = self.tail.quantile(RELEASE_RATE)
        if quantile is None:
            center, sigma = robust_center_scale([*self.tail.history, *self.pending])
            quantile = center + 2 * sigma
        return min(quantile, 0.5 * threshold)

    # ------------------------------------------------------------------ stepping
    def observe(self, step: int, value: float | None, *, primed: bool = False) -> list[Event]:
        """Check `value` of `step` (steps in order); returns the records this step produced.
        `primed`: a lower threshold (`residual_threshold`)."""
        if not self.config.enabled or value is None:
            return []
        if not math.isfinite(value):
            return self._non_finite(step, value)
        transformed = self._transform(value)
        if transformed is None:
            return []
        if self.episode is not None:
            return self._track(step, value, transformed)
        if not self.recent:
            self.recent.append(transformed)
            return []
        level = statistics.median(self.recent)
        residual = transformed - level
        threshold = self.residual_threshold(level, primed=primed)
        if threshold is not None and residual > threshold:
            rate = self.config.false_alarm_rate * (PRIMED_RATE_FACTOR if primed else 1.0)
            return [self._open(step, value, transformed, level, residual, threshold, rate)]
        self._accept(transformed, residual)
        return []

    def _accept(self, transformed: float, residual: float) -> None:
        self.recent.append(transformed)
        self.pending.append(residual)
        if len(self.pending) > QUARANTINE_STEPS:
            self.tail.add(self.pending.popleft())

    def _open(
        self, step: int, value: float, transformed: float, level: float, residual: float,
        threshold: float, rate: float,
    ) -> Event:  # fmt: skip
        release = self._release(threshold)
        # Onset: the steps just before that were already above the release level belong to it.
        onset = 0
        for earlier in reversed(self.pending):
            if earlier <= release:
                break
            onset += 1
        self.episode = Episode.begin(
            step,
            kind="spike",
            peak=value,
            level=level,
            threshold=threshold,
            release=release,
            start_step=step - onset,
        )
        self.episode.opening = residual
        self.episode.add(residual, transformed, keep=self._keep)
        message = (
            f"{self.metric} {value:.4g} is {self._jump(residual, level)} its recent level "
            f"{self._inverse(level):.4g}, above the threshold {self._inverse(level + threshold):.4g}"
            f" (false-alarm rate {rate:g} per step"
            f"{', right after a grad-norm event' if rate > self.config.false_alarm_rate else ''}, "
            f"{len(self.tail) + len(self.pending)} steps of history)"
        )
        return self._event(step, value, level + threshold, message, phase="open")

    def _track(self, step: int, value: float, transformed: float) -> list[Event]:
        episode = self.episode
        assert episode is not None
        residual = transformed - episode.level
        if residual <= episode.release:
            return [self._close(step, value, transformed, residual)]
        episode.last_step = step
        episode.add(residual, transformed, keep=self._keep)
        if value > episode.peak:
            episode.peak, episode.peak_step = value, step
        if episode.kind != "divergence" and self._diverging(episode):
            episode.kind = "divergence"
            detected = self._inverse(episode.level + episode.opening)
            message = (
                f"{self.metric} keeps growing: {value:.4g} is "
                f"{self._jump(residual - episode.opening, episode.level)} its value at detection "
                f"({detected:.4g}) and {self._jump(residual, episode.level)} its level "
                f"{self._inverse(episode.level):.4g} (event since step {episode.start_step})"
            )
            event = self._event(step, value, episode.level + episode.threshold, message)
            return [replace(event, severity="critical")]
        if episode.kind != "divergence" and self._settled(episode):
            return [self._level_shift(step, value)]
        if episode.kind == "spike":
            episode.kind = "bump"
        if self.config.action == "skip_step":  # every elevated step is to be skipped
            message = (
                f"{self.metric} {value:.4g} still elevated (event since step {episode.start_step})"
            )
            return [self._event(step, value, episode.level + episode.threshold, message)]
        return []

    @staticmethod
    def _diverging(episode: Episode) -> bool:
        residuals = episode.residuals
        if len(residuals) <= DIVERGENCE_RISING_STEPS:
            return False
        rising = residuals[-DIVERGENCE_RISING_STEPS - 1 :]
        climbing = all(b > a for a, b in zip(rising, rising[1:], strict=False))
        grown = residuals[-1] - episode.opening
        return (climbing and grown > DIVERGENCE_GROWTH) or grown > DIVERGENCE_RUNAWAY

    def _settled(self, episode: Episode) -> bool:
        window = self.config.level_shift_steps
        if len(episode.residuals) < window:
            return False
        last = episode.residuals[-window:]
        early = statistics.median(last[: window // 2])
        late = statistics.median(last[window // 2 :])
        return early > 0 and LEVEL_SHIFT_RETAINED * early <= late <= early / LEVEL_SHIFT_RETAINED

    def _close(self, step: int, value: float, transformed: float, residual: float) -> Event:
        episode = self.episode
        assert episode is not None
        if episode.kind in ("spike", "bump"):
            episode.kind = "spike" if episode.duration == 1 else "bump"
        message = (
            f"{self.metric} back to its level {self._inverse(episode.level):.4g} at step {step}: "
            f"{episode.kind} from step {episode.start_step} to {episode.last_step} "
            f"({episode.duration} steps), peak {episode.peak:.4g} at step {episode.peak_step}"
        )
        event = self._event(step, value, episode.level + episode.release, message, phase="close")
        self.episode = None
        self._accept(transformed, residual)
        return event

    def _level_shift(self, step: int, value: float) -> Event:
        episode = self.episode
        assert episode is not None
        episode.kind = "level_shift"
        old = self._inverse(episode.level)
        self.recent.clear()
        self.recent.extend(episode.transformed[-self.config.level_window :])
        new = self._inverse(statistics.median(self.recent))
        change = f"{new / old - 1:+.1%}" if self.log_scale else f"{new - old:+.4g}"
        message = (
            f"{self.metric} stayed near {new:.4g} ({change} vs its level {old:.4g}) for "
            f"{episode.duration} steps since step {episode.start_step}: a level shift, taken as "
            "the new level"
        )
        event = self._event(step, value, episode.level + episode.threshold, message, phase="close")
        self.episode = None
        return replace(event, severity="info", action="log")

    def non_finite(self, step: int, value: float = math.nan) -> list[Event]:
        """A NaN/Inf value (or flag): `NanInfDetector` reports it; an open episode diverged."""
        return self._non_finite(step, value) if self.config.enabled else []

    def _non_finite(self, step: int, value: float) -> list[Event]:
        episode = self.episode
        if episode is None or episode.kind == "divergence":
            return []
        episode.kind, episode.last_step = "divergence", step
        message = f"{self.metric} became {value} during the event since step {episode.start_step}"
        event = self._event(step, value, episode.level + episode.threshold, message)
        return [replace(event, severity="critical")]

    def _event(
        self, step: int, value: float, threshold: float, message: str, *, phase: str = "update"
    ) -> Event:
        assert self.episode is not None
        event = make_event(
            self.config,
            step=step,
            detector=self.name,
            metric=self.metric,
            value=value,
            threshold=self._inverse(threshold),
            message=message,
            signals=(self.metric,),
            **self.episode.fields(phase=phase, end=phase == "close"),
        )
        # A closing record only reports: its actions were taken when the event opened.
        return replace(event, action="log") if phase == "close" else event

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Recent values, the residual history and the open episode (plain Python values)."""
        return {
            "recent": list(self.recent),
            "residuals": self.tail.state_dict(),
            "pending": list(self.pending),
            "episode": None if self.episode is None else self.episode.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.recent = deque(state.get("recent", []), maxlen=self.config.level_window)
        self.tail.load_state_dict(state.get("residuals", []))
        self.pending = deque(state.get("pending", []))
        episode = state.get("episode")
        self.episode = None if episode is None else Episode(**episode)


class ThresholdEpisodes:
    """Episodes of "value above a limit", one per key (a layer, or None for a scalar)."""

    def __init__(self, name: str, metric: str, config: DetectorConfig) -> None:
        self.name, self.metric, self.config = name, metric, config
        self.open: dict[int | None, Episode] = {}

    def is_open(self, key: int | None) -> bool:
        """Whether `key` has an open episode."""
        return key in self.open

    def update(
        self, step: int, key: int | None, value: float, limit: float | None, reason: str
    ) -> Event | None:
        """`limit` None or not exceeded: close an open episode; exceeded: open or track one."""
        where = f"layer {key} " if key is not None else ""
        episode = self.open.get(key)
        if limit is not None and value > limit:
            if episode is None:
                self.open[key] = Episode.begin(
                    step, kind="threshold", peak=value, level=limit, threshold=limit, release=limit
                )
                message = f"{where}{self.metric} {value:.4g} is above {reason}"
                return self._event(step, key, value, limit, message, phase="open")
            episode.last_step = step
            if value > episode.peak:
                episode.peak, episode.peak_step = value, step
            if self.config.action not in REPEATED_ACTIONS:
                return None
            message = f"{where}{self.metric} {value:.4g} still above {reason}"
            return self._event(step, key, value, limit, message, phase="update")
        if episode is None:
            return None
        message = (
            f"{where}{self.metric} {value:.4g} back below {episode.threshold:.4g} at step {step} "
            f"after {episode.duration} steps (from step {episode.start_step}, peak "
            f"{episode.peak:.4g} at step {episode.peak_step})"
        )
        event = self._event(step, key, value, episode.threshold, message, phase="close")
        del self.open[key]
        return replace(event, action="log")

    def _event(
        self, step: int, key: int | None, value: float, limit: float, message: str, *, phase: str
    ) -> Event:
        episode = self.open[key]
        return make_event(
            self.config,
            step=step,
            detector=self.name,
            metric=self.metric,
            value=value,
            threshold=limit,
            layer=key,
            message=message,
            **episode.fields(phase=phase, end=phase == "close"),
        )

    def state_dict(self) -> dict[str, Any]:
        """Open episodes by key."""
        return {str(key): episode.to_dict() for key, episode in self.open.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore open episodes."""
        self.open = {
            (None if key == "None" else int(key)): Episode(**episode)
            for key, episode in state.items()
        }


class LossSpikeDetector(RobustSpikeDetector):
    """The spike test on log(loss), plus Megatron's rule when `ratio` is set."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__("loss_spike", "loss", config, log_scale=True)
        self.early: list[float] = []
        self.megatron = ThresholdEpisodes("loss_spike", "loss", config)

    def observe(self, step: int, value: float | None, *, primed: bool = False) -> list[Event]:
        """Check the loss of `step` (`primed`: right after a grad-norm event)."""
        if not self.config.enabled or value is None:
            return []
        events = super().observe(step, value, primed=primed)
        if not math.isfinite(value):
            return events
        ratio = self.config.ratio
        if ratio is not None and len(self.early) >= self.config.warmup_steps:
            limit = ratio * max(self.early)
            reason = (
                f"{ratio:g}x the max of the first {len(self.early)} losses ({max(self.early):.4g})"
            )
            # Megatron's rule only reports what the spike test has not already opened.
            already = any(event.phase == "open" for event in events)
            rule = self.megatron.update(step, None, value, None if already else limit, reason)
            events += [] if rule is None else [rule]
        elif len(self.early) < self.config.warmup_steps:
            self.early.append(value)
        return events

    def state_dict(self) -> dict[str, Any]:
        """Spike-test state, the early losses and an open Megatron-rule episode."""
        return {
            **super().state_dict(),
            "early": list(self.early),
            "megatron": self.megatron.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        super().load_state_dict(state)
        self.early = list(state.get("early", []))
        self.megatron.load_state_dict(state.get("megatron", {}))


class OutlierDetector:
    """Episodes of a value far above the median of its previous `window` values (linear scale).

    The history keeps every finite value, outliers included (the median ignores them), so a new
    level is absorbed within half a window instead of being reported for ever.
    """

    def __init__(self, name: str, metric: str, config: DetectorConfig) -> None:
        self.name, self.metric, self.config = name, metric, config
        self.history: deque[float] = deque(maxlen=config.window)
        self.episode: Episode | None = None

    def limit(self) -> tuple[float, float] | None:
        """(level, threshold) now; None before `min_history` values."""
        if len(self.history) < self.config.min_history:
            return None
        level, sigma = robust_center_scale(self.history)
        jump = max(self.config.min_absolute_jump, self.config.z_threshold * sigma)
        return level, level + jump

    def observe(self, step: int, value: float | None, *, reported: bool = False) -> list[Event]:
        """Check `value` of `step`; `reported`: another detector already reports this step (no
        episode opens here)."""
        if not self.config.enabled or not _finite(value):
            return []
        assert value is not None
        limit = self.limit()
        self.history.append(value)
        if limit is None:
            return []
        level, threshold = limit
        if self.episode is not None:
            return self._track(step, value, level, threshold)
        if value <= threshold or reported:
            return []
        self.episode = Episode.begin(step, kind="spike", peak=value, level=level,
                                     threshold=threshold)  # fmt: skip
        message = (
            f"{self.metric} {value:.4g} is {value - level:+.3g} above the median {level:.4g} of "
            f"the last {self.config.window} steps (outlier threshold {threshold:.4g}: "
            f"{self.config.z_threshold:g} robust SD, at least {self.config.min_absolute_jump:g})"
        )
        return [self._event(step, value, threshold, message, phase="open")]

    def _track(self, step: int, value: float, level: float, threshold: float) -> list[Event]:
        episode = self.episode
        assert episode is not None
        if value > threshold:
            episode.last_step, episode.kind = step, "bump"
            if value > episode.peak:
                episode.peak, episode.peak_step = value, step
            return []
        message = (
            f"{self.metric} back near its median {level:.4g} at step {step}: {episode.kind} from "
            f"step {episode.start_step} ({episode.duration} steps), peak {episode.peak:.4g}"
        )
        event = self._event(step, value, threshold, message, phase="close")
        self.episode = None
        return [replace(event, action="log")]

    def _event(
        self, step: int, value: float, threshold: float, message: str, *, phase: str
    ) -> Event:
        assert self.episode is not None
        return make_event(
            self.config, step=step, detector=self.name, metric=self.metric, value=value,
            threshold=threshold, message=message, signals=(self.metric,),
            **self.episode.fields(phase=phase, end=phase == "close"),
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """The value history and an open episode."""
        episode = None if self.episode is None else self.episode.to_dict()
        return {"history": list(self.history), "episode": episode}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.history = deque(state.get("history", []), maxlen=self.config.window)
        episode = state.get("episode")
        self.episode = None if episode is None else Episode(**episode)


class NanInfDetector:
    """Episodes of steps whose NaN/Inf flag (loss, grad norm) is set."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.count = 0
        self.episode: Episode | None = None

    def observe(self, step: int, flag: float | None) -> list[Event]:
        """`flag` > 0 (or NaN itself) means a non-finite loss or gradient norm on some rank."""
        if not self.config.enabled or flag is None:
            return []
        if not (flag > 0 or math.isnan(flag)):
            return self._close(step)
        self.count += 1
        episode = self.episode
        if episode is None:
            self.episode = Episode.begin(step, kind="non_finite", peak=1.0)
            return [self._event(step, "open", f"non-finite loss or gradient norm at step {step}")]
        episode.last_step = step
        if episode.kind == "non_finite" and episode.duration >= NON_FINITE_DIVERGENCE_STEPS:
            episode.kind = "divergence"
            message = (
                f"non-finite for {episode.duration} steps in a row since step {episode.start_step}"
            )
            return [replace(self._event(step, "update", message), severity="critical")]
        if self.config.action == "skip_step":  # each non-finite step is skipped and recorded
            return [self._event(step, "update", f"non-finite again at step {step}")]
        return []

    def _close(self, step: int) -> list[Event]:
        if self.episode is None:
            return []
        episode = self.episode
        message = (
            f"finite again at step {step} after {episode.duration} non-finite steps "
            f"from step {episode.start_step} ({self.count} such steps so far)"
        )
        event = replace(self._event(step, "close", message), action="log", value=0.0)
        self.episode = None
        return [event]

    def _event(self, step: int, phase: str, message: str) -> Event:
        assert self.episode is not None
        return make_event(
            self.config,
            step=step,
            detector="nan_or_inf",
            metric="nan_or_inf",
            value=1.0,
            threshold=0.0,
            message=message,
            **self.episode.fields(phase=phase, end=phase == "close"),
        )

    def state_dict(self) -> dict[str, Any]:
        """The count of non-finite steps and an open episode."""
        return {
            "count": self.count,
            "episode": None if self.episode is None else self.episode.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.count = int(state.get("count", 0))
        episode = state.get("episode")
        self.episode = None if episode is None else Episode(**episode)


class LayerThresholdDetector:
    """Per layer: value > `threshold`, or value > `ratio` x the median of its own history.

    One event per layer and episode: it opens when the condition starts and closes when it ends.
    While an episode is open the layer's history is frozen, so the median stays the pre-episode
    reference.
    """

    def __init__(self, name: str, metric: str, config: DetectorConfig) -> None:
        self.name, self.metric, self.config = name, metric, config
        self.history: dict[int, deque[float]] = {}
        self.episodes = ThresholdEpisodes(name, metric, config)

    def observe(self, step: int, values: Sequence[float | None]) -> list[Event]:
        """`values[i]` is the metric of layer i + 1 (None where not measured)."""
        if not self.config.enabled:
            return []
        events = []
        for index, value in enumerate(values):
            if not _finite(value):
                continue
            layer = index + 1
            limit, reason = self._limit(layer, value)
            event = self.episodes.update(step, layer, value, limit, reason)
            if event is not None:
                events.append(event)
            if not self.episodes.is_open(layer):
                self._history(layer).append(value)
        return events

    def _history(self, layer: int) -> deque[float]:
        return self.history.setdefault(layer, deque(maxlen=self.config.window))

    def _limit(self, layer: int, value: float) -> tuple[float | None, str]:
        """The limit that `value` is compared with, and how to say it."""
        threshold, ratio = self.config.threshold, self.config.ratio
        if threshold is not None and value > threshold:
            return threshold, f"the absolute threshold {threshold:g}"
        history = self._history(layer)
        if ratio is None or len(history) < self.config.min_history:
            return threshold, f"the absolute threshold {threshold:g}"
        median = statistics.median(history)
        if median <= 0:
            return threshold, f"the absolute threshold {threshold:g}"
        limit = ratio * median if threshold is None else min(threshold, ratio * median)
        return limit, f"{ratio:g}x its running median {median:.4g} ({value / median:.1f}x)"

    def state_dict(self) -> dict[str, Any]:
        """Histories and open episodes by layer."""
        return {
            "history": {str(layer): list(values) for layer, values in self.history.items()},
            "episodes": self.episodes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore histories and open episodes."""
        self.history = {
            int(layer): deque(values, maxlen=self.config.window)
            for layer, values in state.get("history", {}).items()
        }
        self.episodes.load_state_dict(state.get("episodes", {}))


class DetectorSuite:
    """All detectors of a config, fed with one step's scalars and (optionally) per-layer values."""

    def __init__(self, config: DetectorsConfig) -> None:
        self.loss = LossSpikeDetector(config.loss_spike)
        self.grad_norm = RobustSpikeDetector(
            "grad_norm_spike", "grad_norm", config.grad_norm_spike, log_scale=True
        )
        self.update_norm = RobustSpikeDetector(
            "update_norm_spike", "update_norm", config.update_norm_spike, log_scale=True
        )
        self.loss_outlier = OutlierDetector("loss_outlier", "loss", config.loss_outlier)
        self.nan_or_inf = NanInfDetector(config.nan_or_inf)
        self.massive_activation = LayerThresholdDetector(
            "massive_activation", "max_abs_residual", config.massive_activation
        )
        self.attention_sink = LayerThresholdDetector(
            "attention_sink", "first_token_attention_share", config.attention_sink
        )
        self.attention_logit_growth = LayerThresholdDetector(
            "attention_logit_growth", "max_attention_logit", config.attention_logit_growth
        )
        from megatron_gate.monitor.forecast import DivergenceForecast  # imports this module

        self.divergence_forecast = DivergenceForecast(config.divergence_forecast)
        self.last_open: dict[str, int] = {}
        """Scalar signal -> step of its latest opened event (for corroboration)."""

    def _named(self) -> dict[str, Any]:
        return {
            "loss_spike": self.loss,
            "loss_outlier": self.loss_outlier,
            "grad_norm_spike": self.grad_norm,
            "update_norm_spike": self.update_norm,
            "nan_or_inf": self.nan_or_inf,
            "massive_activation": self.massive_activation,
            "attention_sink": self.attention_sink,
            "attention_logit_growth": self.attention_logit_growth,
            "divergence_forecast": self.divergence_forecast,
        }

    def _scalar(self) -> dict[str, RobustSpikeDetector]:
        return {"loss": self.loss, "grad_norm": self.grad_norm, "update_norm": self.update_norm}

    def check(
        self,
        step: int,
        scalars: dict[str, float | None],
        layers: dict[str, Sequence[float | None]] | None = None,
    ) -> list[Event]:
        """Events for one step. `scalars` by `schema.SCALARS`, `layers` by `schema.LAYER_METRICS`."""
        flag = scalars.get("nan_or_inf")
        events = self.nan_or_inf.observe(step, flag)
        spikes: list[Event] = []
        # The grad norm first: a burst at this step primes this step's loss test.
        for signal in ("grad_norm", "loss", "update_norm"):
            detector, value = self._scalar()[signal], scalars.get(signal)
            if value is None and flag is not None and (flag > 0 or math.isnan(flag)):
                spikes += detector.non_finite(step)  # the value is null because it was NaN/Inf
            elif signal == "loss":
                spikes += detector.observe(step, value, primed=self._primed(step, spikes))
            else:
                spikes += detector.observe(step, value)
        events += self._corroborate(step, spikes)
        reported = self.loss.episode is not None or any(e.metric == "loss" for e in spikes)
        events += self.loss_outlier.observe(step, scalars.get("loss"), reported=reported)
        for detector in (
            self.massive_activation,
            self.attention_sink,
            self.attention_logit_growth,
        ):
            if layers and detector.metric in layers:
                events += detector.observe(step, layers[detector.metric])
        events += self.divergence_forecast.observe(step, scalars, layers)
        return events

    def check_steps(
        self, records: Iterable[tuple[int, dict[str, float | None], Any]]
    ) -> list[Event]:
        """`check` for a batch of `(step, scalars, layers or None)`, in step order."""
        events: list[Event] = []
        for step, scalars, layers in records:
            events += self.check(step, scalars, layers)
        return events

    def _primed(self, step: int, events: list[Event]) -> bool:
        """Whether a grad-norm event opened at this step or within `PRIMED_STEPS` before it."""
        opened = [e.step for e in events if e.metric == "grad_norm" and e.phase == "open"]
        last = max(opened, default=self.last_open.get("grad_norm", -(10**9)))
        return step - last <= PRIMED_STEPS

    def _corroborate(self, step: int, events: list[Event]) -> list[Event]:
        """Opened events seen in another signal too: severity up, `confirmed_action`."""
        for event in events:
            if event.phase == "open" and event.kind != "threshold":
                self.last_open[event.metric] = step
        result = []
        for event in events:
            others = tuple(
                signal
                for signal, detector in self._scalar().items()
                if signal != event.metric
                and (
                    detector.episode is not None
                    or step - self.last_open.get(signal, -(10**9)) <= CORROBORATION_STEPS
                )
            )
            if event.phase == "open" and event.kind != "threshold" and others:
                config = self._scalar()[event.metric].config
                event = replace(
                    event,
                    signals=(event.metric, *others),
                    severity=SEVERITY_UP[event.severity],
                    action=config.confirmed_action or event.action,
                    message=f"{event.message}; corroborated by {', '.join(others)}",
                )
            result.append(event)
        return result

    def state_dict(self) -> dict[str, Any]:
        """Every detector's windows, counters and open episodes (plain Python values)."""
        state = {name: detector.state_dict() for name, detector in self._named().items()}
        return {**state, "last_open": dict(self.last_open)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        for name, detector in self._named().items():
            if name in state:
                detector.load_state_dict(state[name])
        self.last_open = {k: int(v) for k, v in state.get("last_open", {}).items()}


def series_events(detector: Any, values: Iterable[float | None], *, start: int = 0) -> list[Event]:
    """Feed a series to a scalar detector (tests, offline analysis); events of every step."""
    events: list[Event] = []
    for offset, value in enumerate(values):
        events += detector.observe(start + offset, value)
    return events


def openings(events: Iterable[Event]) -> list[Event]:
    """The events that opened an episode (one per episode)."""
    return [event for event in events if event.phase == "open"]
