"""Detectors on synthetic series: spikes are found, a noisy healthy run raises nothing."""

from __future__ import annotations

import math
import random

from megatron_gate.monitor.config import DetectorConfig, DetectorsConfig
from megatron_gate.monitor.detectors import (
    DetectorSuite,
    LayerThresholdDetector,
    LossSpikeDetector,
    NanInfDetector,
    RobustSpikeDetector,
    series_events,
)


def healthy_losses(steps: int, *, seed: int = 0) -> list[float]:
    """A decaying loss with 2% multiplicative noise and heavier-tailed wiggles."""
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        level = 2.0 + 8.0 * math.exp(-step / 300)
        noise = rng.gauss(0, 0.02) + (rng.gauss(0, 0.04) if rng.random() < 0.05 else 0.0)
        losses.append(level * (1 + noise))
    return losses


def healthy_norms(steps: int, *, seed: int = 1) -> list[float]:
    """Log-normal gradient norms with a slow drift."""
    rng = random.Random(seed)
    return [math.exp(rng.gauss(0, 0.15)) * (1 + step / 2000) for step in range(steps)]


def test_loss_spike_found_and_healthy_series_quiet() -> None:
    losses = healthy_losses(2000)
    assert series_events(LossSpikeDetector(DetectorConfig(ratio=10.0)), losses) == []
    spiky = list(losses)
    for step in (400, 1200, 1700):
        spiky[step] *= 1.6
    events = series_events(LossSpikeDetector(DetectorConfig(ratio=10.0)), spiky)
    assert [event.step for event in events] == [400, 1200, 1700]
    assert all(event.detector == "loss_spike" and event.metric == "loss" for event in events)
    assert all(event.value > event.threshold for event in events)


def test_megatron_rule_fires_without_history_window() -> None:
    # A window too short for the z-score (min_history not reached): only the 10x rule can fire.
    config = DetectorConfig(ratio=10.0, warmup_steps=5, window=64, min_history=64)
    detector = LossSpikeDetector(config)
    events = series_events(detector, [3.0, 2.9, 3.1, 2.8, 2.7, 2.6, 25.0, 31.5])
    assert [event.step for event in events] == [7]
    assert events[0].threshold == 31.0


def test_grad_norm_spike_on_log_scale() -> None:
    norms = healthy_norms(1500)
    detector = RobustSpikeDetector("grad_norm_spike", "grad_norm", DetectorConfig(), log_scale=True)
    assert series_events(detector, norms) == []
    norms[900] *= 8
    detector = RobustSpikeDetector("grad_norm_spike", "grad_norm", DetectorConfig(), log_scale=True)
    assert [event.step for event in series_events(detector, norms)] == [900]


def test_nan_or_inf_flag() -> None:
    detector = NanInfDetector(DetectorConfig(action="skip_step", severity="critical"))
    events = series_events(detector, [0.0, 0.0, 1.0, 0.0, float("nan"), None])
    assert [event.step for event in events] == [2, 4]
    assert events[0].action == "skip_step" and events[0].severity == "critical"
    assert detector.state_dict() == {"count": 2}


def test_massive_activation_threshold_and_ratio() -> None:
    detector = LayerThresholdDetector(
        "massive_activation",
        "max_abs_residual",
        DetectorConfig(threshold=1e4, ratio=10.0, min_history=5),
    )
    quiet = [[10.0 + i, 20.0 - i, None] for i in range(20)]
    events = [e for step, values in enumerate(quiet) for e in detector.observe(step, values)]
    assert events == []
    events = detector.observe(20, [250.0, 21.0, 2e4])
    assert [(event.layer, event.detector) for event in events] == [
        (1, "massive_activation")
    ] * 1 + [(3, "massive_activation")]
    assert events[1].threshold == 1e4


def test_attention_sink_and_logit_growth() -> None:
    suite = DetectorSuite(DetectorsConfig())
    quiet = {"first_token_attention_share": [0.3, 0.5], "max_attention_logit": [8.0, 9.0]}
    for step in range(10):
        assert suite.check(step, {"loss": 2.0}, quiet) == []
    events = suite.check(
        10,
        {"loss": 2.0},
        {"first_token_attention_share": [0.95, 0.5], "max_attention_logit": [8.5, 60.0]},
    )
    found = {(event.detector, event.layer) for event in events}
    assert found == {("attention_sink", 1), ("attention_logit_growth", 2)}


def test_state_dict_resumes_identically() -> None:
    losses = healthy_losses(600, seed=3)
    losses[505] *= 1.8
    whole = series_events(LossSpikeDetector(DetectorConfig(ratio=10.0)), losses)
    first = LossSpikeDetector(DetectorConfig(ratio=10.0))
    series_events(first, losses[:500])
    resumed = LossSpikeDetector(DetectorConfig(ratio=10.0))
    resumed.load_state_dict(first.state_dict())
    after = series_events(resumed, losses[500:], start=500)
    assert [e.step for e in after] == [e.step for e in whole if e.step >= 500] == [505]
    fresh = series_events(LossSpikeDetector(DetectorConfig(ratio=10.0)), losses[500:], start=500)
    assert fresh == []  # 5 values < min_history: without the restored window it is missed
