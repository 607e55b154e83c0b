"""Detectors: pure functions over numbers (no torch, no torch.distributed).

Every rank runs the same detectors on the same reduced numbers, so every rank reaches the same
decision without another collective. Each detector returns `Event`s (the schema's `event` record).

- `RobustSpikeDetector`: a robust z-score (median and 1.4826 x MAD over a rolling window) of the
  jump of a value above its recent level (optionally on log values, for norms); used for the
  loss, grad norm and update norm.
- `LossSpikeDetector`: the robust z-score plus Megatron's rule (loss > ratio x the max of the
  first `warmup_steps` losses).
- `NanInfDetector`: the device-side NaN/Inf flag.
- `LayerThresholdDetector`: a per-layer value over an absolute threshold or over ratio x its own
  running median (massive activations, attention sinks, attention-logit growth).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from megatron_gate.monitor.config import DetectorConfig, DetectorsConfig

# Scale that makes the MAD of a normal distribution an estimate of its standard deviation.
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True, kw_only=True)
class Event:
    """One detection: the fields of the schema's `event` record (without `time`)."""

    step: int
    detector: str
    severity: str
    metric: str
    value: float
    threshold: float
    layer: int | None
    action: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields."""
        return asdict(self)


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


class RobustSpikeDetector:
    """Fires when a value jumps more than `z_threshold` robust sigmas above its recent level.

    The level is the median of the last `LEVEL_WINDOW` values, so a falling loss (a trend)
    does not count as noise; the window holds the innovations (value - level) of the last
    `window` steps, and their median and 1.4826 x MAD give the robust z-score.
    """

    LEVEL_WINDOW = 8

    def __init__(
        self, name: str, metric: str, config: DetectorConfig, *, log_scale: bool = False
    ) -> None:
        self.name, self.metric, self.config, self.log_scale = name, metric, config, log_scale
        self.recent: deque[float] = deque(maxlen=self.LEVEL_WINDOW)
        self.window: deque[float] = deque(maxlen=config.window)

    def _transform(self, value: float) -> float | None:
        if not self.log_scale:
            return value
        return math.log(value) if value > 0 else None

    def _inverse(self, value: float) -> float:
        return math.exp(value) if self.log_scale else value

    def observe(self, step: int, value: float | None) -> list[Event]:
        """Check `value` against the recent level and the innovation window, then add it."""
        if not self.config.enabled or not _finite(value):
            return []
        transformed = self._transform(value)
        if transformed is None:
            return []
        if not self.recent:
            self.recent.append(transformed)
            return []
        level = statistics.median(self.recent)
        innovation = transformed - level
        events: list[Event] = []
        if len(self.window) >= self.config.min_history:
            center, sigma = robust_center_scale(self.window, level=level)
            z_score = (innovation - center) / sigma
            if z_score > self.config.z_threshold:
                threshold = self._inverse(level + center + self.config.z_threshold * sigma)
                events.append(
                    self._event(
                        step,
                        value,
                        threshold,
                        f"{self.metric} {value:.4g} is {z_score:.1f} robust sigmas above its "
                        f"recent level {self._inverse(level):.4g} "
                        f"(sigma from {len(self.window)} steps)",
                    )
                )
        self.recent.append(transformed)
        self.window.append(innovation)
        return events

    def _event(self, step: int, value: float, threshold: float, message: str) -> Event:
        return make_event(
            self.config,
            step=step,
            detector=self.name,
            metric=self.metric,
            value=value,
            threshold=threshold,
            message=message,
        )

    def state_dict(self) -> dict[str, Any]:
        """Recent values and the innovation window (plain floats)."""
        return {"recent": list(self.recent), "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the windows."""
        self.recent = deque(state.get("recent", []), maxlen=self.LEVEL_WINDOW)
        self.window = deque(state.get("window", []), maxlen=self.config.window)


class LossSpikeDetector(RobustSpikeDetector):
    """Robust z-score on the loss plus Megatron's rule: loss > ratio x max(first losses)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__("loss_spike", "loss", config)
        self.early: list[float] = []

    def observe(self, step: int, value: float | None) -> list[Event]:
        """Check the loss of `step`."""
        if not self.config.enabled or not _finite(value):
            return []
        events = super().observe(step, value)
        ratio = self.config.ratio
        if len(self.early) >= self.config.warmup_steps and ratio is not None:
            limit = ratio * max(self.early)
            if value > limit and not events:
                events.append(
                    self._event(
                        step,
                        value,
                        limit,
                        f"loss {value:.4g} > {ratio:g} x the max of the first "
                        f"{len(self.early)} losses ({max(self.early):.4g})",
                    )
                )
        elif len(self.early) < self.config.warmup_steps:
            self.early.append(value)
        return events

    def state_dict(self) -> dict[str, Any]:
        """Window and the early losses."""
        return {**super().state_dict(), "early": list(self.early)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore window and early losses."""
        super().load_state_dict(state)
        self.early = list(state.get("early", []))


class NanInfDetector:
    """Fires on a step whose NaN/Inf flag (loss, grad norm) is set."""

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.count = 0

    def observe(self, step: int, flag: float | None) -> list[Event]:
        """`flag` > 0 (or NaN itself) means a non-finite loss or gradient norm on some rank."""
        if not self.config.enabled or flag is None or not (flag > 0 or math.isnan(flag)):
            return []
        self.count += 1
        return [
            make_event(
                self.config,
                step=step,
                detector="nan_or_inf",
                metric="nan_or_inf",
                value=1.0,
                threshold=0.0,
                message=f"non-finite loss or gradient norm at step {step} "
                f"({self.count} such steps so far)",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        """The count of non-finite steps."""
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the count."""
        self.count = int(state.get("count", 0))


class LayerThresholdDetector:
    """Per layer: value > `threshold`, or value > `ratio` x the median of its own history."""

    def __init__(self, name: str, metric: str, config: DetectorConfig) -> None:
        self.name, self.metric, self.config = name, metric, config
        self.history: dict[int, deque[float]] = {}

    def observe(self, step: int, values: Sequence[float | None]) -> list[Event]:
        """`values[i]` is the metric of layer i + 1 (None where not measured)."""
        if not self.config.enabled:
            return []
        events = []
        for index, value in enumerate(values):
            if not _finite(value):
                continue
            event = self._check(step, index + 1, value)
            if event is not None:
                events.append(event)
            self._history(index + 1).append(value)
        return events

    def _history(self, layer: int) -> deque[float]:
        return self.history.setdefault(layer, deque(maxlen=self.config.window))

    def _check(self, step: int, layer: int, value: float) -> Event | None:
        threshold, ratio = self.config.threshold, self.config.ratio
        if threshold is not None and value > threshold:
            reason = f"above the absolute threshold {threshold:g}"
            limit = threshold
        else:
            history = self._history(layer)
            if ratio is None or len(history) < self.config.min_history:
                return None
            median = statistics.median(history)
            limit = ratio * median
            if median <= 0 or value <= limit:
                return None
            reason = f"{value / median:.1f}x its running median {median:.4g}"
        return make_event(
            self.config,
            step=step,
            detector=self.name,
            metric=self.metric,
            value=value,
            threshold=limit,
            layer=layer,
            message=f"layer {layer} {self.metric} {value:.4g} is {reason}",
        )

    def state_dict(self) -> dict[str, Any]:
        """Histories by layer."""
        return {"history": {str(layer): list(values) for layer, values in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore histories."""
        self.history = {
            int(layer): deque(values, maxlen=self.config.window)
            for layer, values in state.get("history", {}).items()
        }


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

    def _named(self) -> dict[str, Any]:
        return {
            "loss_spike": self.loss,
            "grad_norm_spike": self.grad_norm,
            "update_norm_spike": self.update_norm,
            "nan_or_inf": self.nan_or_inf,
            "massive_activation": self.massive_activation,
            "attention_sink": self.attention_sink,
            "attention_logit_growth": self.attention_logit_growth,
        }

    def check(
        self,
        step: int,
        scalars: dict[str, float | None],
        layers: dict[str, Sequence[float | None]] | None = None,
    ) -> list[Event]:
        """Events for one step. `scalars` by `schema.SCALARS`, `layers` by `schema.LAYER_METRICS`."""
        events = self.nan_or_inf.observe(step, scalars.get("nan_or_inf"))
        events += self.loss.observe(step, scalars.get("loss"))
        events += self.grad_norm.observe(step, scalars.get("grad_norm"))
        events += self.update_norm.observe(step, scalars.get("update_norm"))
        for detector in (
            self.massive_activation,
            self.attention_sink,
            self.attention_logit_growth,
        ):
            if layers and detector.metric in layers:
                events += detector.observe(step, layers[detector.metric])
        return events

    def state_dict(self) -> dict[str, Any]:
        """Every detector's windows and counters (plain Python values)."""
        return {name: detector.state_dict() for name, detector in self._named().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        for name, detector in self._named().items():
            if name in state:
                detector.load_state_dict(state[name])


def series_events(detector: Any, values: Iterable[float | None], *, start: int = 0) -> list[Event]:
    """Feed a series to a scalar detector (tests, offline analysis); events of every step."""
    events: list[Event] = []
    for offset, value in enumerate(values):
        events += detector.observe(start + offset, value)
    return events
