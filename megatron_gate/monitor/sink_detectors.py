"""Sink detectors: episodes of attention-sink formation and of a growing massive activation at BOS.

Pure functions over the reduced numbers of per-layer steps (no torch), like `detectors.py`:

- `SinkFormationDetector` (`sink_formation`): per layer AND head, the first-token share of the
  queries the loop did not flag (all queries when it flags none) rises above `threshold`: one
  episode, which closes only when the share falls below `RELEASE_FRACTION` x `threshold` (so a
  share that hovers at the threshold is still one episode). The event names the layer and head.
- `MassiveActivationGrowthDetector` (`bos_massive_activation`): per layer, the BOS residual
  ratio (norm at position 0 over the median position) rises above both `threshold` and `ratio`
  x its reference, the median of the layer's first `min_history` values: one episode.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, fields
from typing import Any

from megatron_gate.monitor.config import DetectorConfig, DetectorsConfig
from megatron_gate.monitor.detectors import Event, ThresholdEpisodes

RELEASE_FRACTION = 0.75
"""An open episode closes when its value falls below this fraction of the opening threshold."""
SHARE_METRICS = ("first_token_share_unflagged", "first_token_share")
"""Per-head share the sink test reads: the unflagged queries' when measured, else all queries'."""
RESIDUAL_METRIC = "residual_norm_ratio_first_token"


@dataclass(frozen=True, kw_only=True)
class HeadEvent(Event):
    """An `Event` about one attention head (its `head` joins the event record)."""

    head: int | None = None
    """0-based head index within the layer (all tensor-parallel ranks)."""


def _with_head(event: Event, head: int) -> HeadEvent:
    values = {field.name: getattr(event, field.name) for field in fields(Event)}
    where = f"layer {event.layer} "
    values["message"] = event.message.replace(where, f"layer {event.layer} head {head}: ", 1)
    return HeadEvent(**values, head=head)


def _limit(episodes: ThresholdEpisodes, layer: int, threshold: float) -> float:
    """The threshold to open an episode, the lower release level while one is open."""
    return threshold * RELEASE_FRACTION if episodes.is_open(layer) else threshold


class SinkFormationDetector:
    """Per (layer, head): first-token share above `threshold` (see the module docstring)."""

    name = "sink_formation"

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.episodes: dict[int, ThresholdEpisodes] = {}
        """Per head: its episodes, keyed by layer."""

    def observe(self, step: int, heads: dict[str, list[list[float | None]]]) -> list[Event]:
        """`heads[metric][layer_index][head]` (a step record's `heads`)."""
        threshold = self.config.threshold
        if not self.config.enabled or threshold is None:
            return []
        metric = next((m for m in SHARE_METRICS if _measured(heads.get(m))), None)
        if metric is None:
            return []
        events: list[Event] = []
        for index, per_head in enumerate(heads[metric]):
            for head, value in enumerate(per_head):
                if value is None:
                    continue
                episodes = self.episodes.setdefault(
                    head, ThresholdEpisodes(self.name, metric, self.config)
                )
                limit = _limit(episodes, index + 1, threshold)
                reason = f"the sink threshold {threshold:g}"
                event = episodes.update(step, index + 1, value, limit, reason)
                if event is not None:
                    events.append(_with_head(event, head))
        return events

    def state_dict(self) -> dict[str, Any]:
        """Open episodes per head."""
        return {str(head): episodes.state_dict() for head, episodes in self.episodes.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (the metric is re-chosen at the next step)."""
        self.episodes = {}
        for head, episodes in state.items():
            restored = ThresholdEpisodes(self.name, SHARE_METRICS[0], self.config)
            restored.load_state_dict(episodes)
            self.episodes[int(head)] = restored


def _measured(grid: list[list[float | None]] | None) -> bool:
    return bool(grid) and any(v is not None for row in grid for v in row)


class MassiveActivationGrowthDetector:
    """Per layer: BOS residual ratio above `threshold` and `ratio` x its early reference."""

    name = "bos_massive_activation"

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.early: dict[int, list[float]] = {}
        self.episodes = ThresholdEpisodes(self.name, RESIDUAL_METRIC, config)

    def observe(self, step: int, values: list[float | None] | None) -> list[Event]:
        """`values[i]`: the BOS residual ratio of layer i + 1 (None where not measured)."""
        if not self.config.enabled or not values:
            return []
        events: list[Event] = []
        for index, value in enumerate(values):
            if value is None:
                continue
            layer = index + 1
            early = self.early.setdefault(layer, [])
            if len(early) < self.config.min_history:
                early.append(value)
                continue
            limit, reason = self._limit(layer, statistics.median(early))
            event = self.episodes.update(step, layer, value, limit, reason)
            if event is not None:
                events.append(event)
        return events

    def _limit(self, layer: int, reference: float) -> tuple[float, str]:
        threshold = self.config.threshold or 0.0
        ratio = self.config.ratio or 1.0
        limit = max(threshold, ratio * reference)
        reason = (
            f"max({threshold:g}, {ratio:g}x its early value {reference:.3g}): the residual at "
            "position 0 outgrows the other positions"
        )
        return _limit(self.episodes, layer, limit), reason

    def state_dict(self) -> dict[str, Any]:
        """Early references and open episodes by layer."""
        early = {str(layer): list(values) for layer, values in self.early.items()}
        return {"early": early, "episodes": self.episodes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.early = {int(layer): list(v) for layer, v in state.get("early", {}).items()}
        self.episodes.load_state_dict(state.get("episodes", {}))


class SinkDetectors:
    """The sink detectors of a config, fed with per-layer steps' records."""

    def __init__(self, config: DetectorsConfig) -> None:
        self.sink_formation = SinkFormationDetector(config.sink_formation)
        self.massive_activation_growth = MassiveActivationGrowthDetector(
            config.bos_massive_activation
        )

    def check(
        self,
        step: int,
        layers: dict[str, list[float | None]] | None,
        heads: dict[str, list[list[float | None]]] | None,
    ) -> list[Event]:
        """Events of one step (nothing on steps without per-layer statistics)."""
        events: list[Event] = []
        if heads:
            events += self.sink_formation.observe(step, heads)
        if layers:
            events += self.massive_activation_growth.observe(step, layers.get(RESIDUAL_METRIC))
        return events

    def state_dict(self) -> dict[str, Any]:
        """Both detectors' state (plain Python values)."""
        return {"sink_formation": self.sink_formation.state_dict(),
                "bos_massive_activation": self.massive_activation_growth.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.sink_formation.load_state_dict(state.get("sink_formation", {}))
        self.massive_activation_growth.load_state_dict(state.get("bos_massive_activation", {}))
