"""Sink-formation and BOS massive-activation detectors: one episode each, at the right place."""

from __future__ import annotations

import json

from megatron_gate.monitor import MonitorConfig
from megatron_gate.monitor.config import DetectorsConfig
from megatron_gate.monitor.detectors import openings
from megatron_gate.monitor.sink_detectors import SinkDetectors


def _heads(unflagged: list[list[float | None]]) -> dict[str, list[list[float | None]]]:
    everything = [[None if v is None else v / 2 for v in row] for row in unflagged]
    return {"first_token_share": everything, "first_token_share_unflagged": unflagged,
            "first_token_share_flagged": [[0.0] * len(row) for row in unflagged]}  # fmt: skip


def _layers(ratios: list[float | None]) -> dict[str, list[float | None]]:
    return {"residual_norm_ratio_first_token": ratios}


def test_a_sink_forming_in_one_head_is_one_episode_with_layer_head_and_step() -> None:
    detectors = SinkDetectors(DetectorsConfig())
    # layer 2, head 1 rises to a sink at step 30, hovers around the threshold, then stays
    series = [0.1, 0.2, 0.3, 0.55, 0.45, 0.52, 0.9, 0.97, 0.98]
    events = []
    for index, share in enumerate(series):
        step = 10 * (index + 1)
        events += detectors.check(step, None, _heads([[0.1, 0.1], [0.1, share]]))
    opened = openings(events)
    assert len(opened) == 1 and not [e for e in events if e.phase == "close"]
    event = opened[0]
    assert (event.detector, event.layer, event.head, event.step) == ("sink_formation", 2, 1, 40)
    assert event.metric == "first_token_share_unflagged"
    assert event.message.startswith("layer 2 head 1: first_token_share_unflagged 0.55 is above")
    record = event.to_dict()
    assert record["head"] == 1 and record["layer"] == 2
    json.dumps(record)  # a plain JSON record


def test_the_episode_closes_below_the_release_level_and_can_reopen() -> None:
    detectors = SinkDetectors(DetectorsConfig())
    events = []
    for step, share in enumerate([0.9, 0.9, 0.2, 0.2, 0.8]):
        events += detectors.check(step, None, _heads([[share]]))
    assert [(e.phase, e.step) for e in events] == [("open", 0), ("close", 2), ("open", 4)]


def test_without_flags_the_share_of_all_queries_is_read() -> None:
    detectors = SinkDetectors(DetectorsConfig())
    heads = {"first_token_share": [[0.7]], "first_token_share_unflagged": [[None]]}
    (event,) = detectors.check(5, None, heads)
    assert event.metric == "first_token_share" and event.layer == 1 and event.head == 0


def test_massive_activation_growth_is_one_episode_per_layer() -> None:
    detectors = SinkDetectors(DetectorsConfig())
    events = []
    ratios = [(1.1, 1.0), (1.2, 1.0), (1.5, 1.1), (2.5, 1.2), (3.5, 1.1), (5.0, 1.2), (2.9, 1.1)]
    for step, pair in enumerate(ratios):
        events += detectors.check(step * 25, _layers(list(pair)), None)
    opened = openings(events)
    assert [(e.detector, e.layer, e.step) for e in opened] == [("bos_massive_activation", 1, 100)]
    assert "early value 1.15" in opened[0].message  # the median of the first two values
    assert not [e for e in events if e.phase == "close"]  # 2.9 is above the release level


def test_growth_relative_to_an_already_large_start() -> None:
    """A layer that starts at 4x needs 2x its start (8x), not just the absolute 3x."""
    detectors = SinkDetectors(DetectorsConfig())
    events = []
    for step, ratio in enumerate([4.0, 4.0, 6.0, 8.5]):
        events += detectors.check(step, _layers([ratio]), None)
    assert [(e.phase, e.step, e.threshold) for e in events] == [("open", 3, 8.0)]


def test_state_round_trip_keeps_the_open_episodes() -> None:
    detectors = SinkDetectors(DetectorsConfig())
    detectors.check(1, _layers([1.0]), _heads([[0.9, 0.1]]))
    detectors.check(2, _layers([1.0]), _heads([[0.9, 0.1]]))
    restored = SinkDetectors(DetectorsConfig())
    restored.load_state_dict(json.loads(json.dumps(detectors.state_dict())))
    events = restored.check(3, _layers([9.0]), _heads([[0.95, 0.1]]))
    assert [(e.detector, e.phase) for e in events] == [("bos_massive_activation", "open")]


def test_detectors_are_configured_and_can_be_turned_off() -> None:
    config = MonitorConfig.from_dict({"detectors": {"sink_formation": {"enabled": False},
                                                    "bos_massive_activation": {"threshold": 5}}})  # fmt: skip
    detectors = SinkDetectors(config.detectors)
    assert detectors.check(1, None, _heads([[0.99]])) == []
    assert detectors.massive_activation_growth.config.threshold == 5
