"""Detectors on synthetic series: episodes open and close with the right kind, per-layer
conditions give one event per episode, level shifts are benign, messages say what happened, and a
detector resumed from its state continues exactly."""

from __future__ import annotations

import json
import math
import random
import re

from megatron_gate.monitor.config import DetectorConfig, DetectorsConfig
from megatron_gate.monitor.detectors import (
    DetectorSuite,
    LayerThresholdDetector,
    LossSpikeDetector,
    NanInfDetector,
    OutlierDetector,
    RobustSpikeDetector,
    openings,
    series_events,
)
from megatron_gate.monitor.tail import TailThreshold, gpd_fit


def healthy_losses(steps: int, *, seed: int = 0) -> list[float]:
    """A decaying loss with 1% multiplicative noise and heavier-tailed wiggles."""
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        level = 2.0 + 8.0 * math.exp(-step / 300)
        noise = rng.gauss(0, 0.01) + (rng.gauss(0, 0.02) if rng.random() < 0.05 else 0.0)
        losses.append(level * math.exp(noise))
    return losses


def healthy_norms(steps: int, *, seed: int = 1) -> list[float]:
    """Log-normal gradient norms with a slow drift."""
    rng = random.Random(seed)
    return [math.exp(rng.gauss(0, 0.15)) * (1 + step / 2000) for step in range(steps)]


def loss_detector(**overrides: object) -> LossSpikeDetector:
    return LossSpikeDetector(DetectorConfig(window=1024, **overrides))


def test_spikes_open_and_close_healthy_series_quiet() -> None:
    losses = healthy_losses(2000)
    assert series_events(loss_detector(), losses) == []
    spiky = list(losses)
    for step in (400, 1200, 1700):
        spiky[step] *= 1.6
    events = series_events(loss_detector(), spiky)
    assert [(e.step, e.phase) for e in events] == [
        (step + offset, phase) for step in (400, 1200, 1700) for offset, phase in ((0, "open"), (1, "close"))
    ]  # fmt: skip
    for opened, closed in zip(events[::2], events[1::2], strict=True):
        assert opened.detector == "loss_spike" and opened.metric == "loss"
        assert opened.value > opened.threshold and "above the threshold" in opened.message
        assert opened.end_step is None and opened.action == "alert"
        assert closed.kind == "spike" and closed.duration == 1 and closed.action == "log"
        assert closed.start_step == closed.end_step == opened.step
        assert closed.peak == opened.value and closed.delay == 0


def test_bump_is_one_event_with_its_duration_and_peak() -> None:
    losses = healthy_losses(1500, seed=4)
    for offset in range(40):  # +40% that decays over ~40 steps
        losses[900 + offset] *= math.exp(0.4 * math.exp(-offset / 12))
    events = series_events(loss_detector(), losses)
    assert [e.phase for e in events] == ["open", "close"]
    closed = events[1]
    assert closed.kind == "bump" and closed.start_step == 900
    assert 10 <= closed.duration <= 40 and closed.end_step == 900 + closed.duration - 1
    assert closed.peak == max(losses[900:940])
    assert "back to its level" in closed.message


def test_level_shift_is_benign_and_becomes_the_new_level() -> None:
    losses = healthy_losses(2000, seed=5)
    shifted = losses[:1000] + [value * 1.3 for value in losses[1000:]]
    shifted[1600] *= 1.5  # a spike on the new level is still found
    events = series_events(loss_detector(), shifted)
    assert [(e.phase, e.kind) for e in events] == [
        ("open", "spike"), ("close", "level_shift"), ("open", "spike"), ("close", "spike"),
    ]  # fmt: skip
    shift = events[1]
    assert shift.severity == "info" and shift.action == "log" and shift.start_step == 1000
    assert re.search(r"\(\+2\d\.\d% vs its level", shift.message)  # ~+30 % on a falling loss
    assert "a level shift" in shift.message
    assert events[2].step == 1600


def test_falling_level_shift_raises_nothing() -> None:
    losses = healthy_losses(1500, seed=6)
    assert series_events(loss_detector(), losses[:800] + [v * 0.7 for v in losses[800:]]) == []


def test_divergence_and_non_finite_during_an_event() -> None:
    losses = healthy_losses(1200, seed=7)
    growing = losses[:1000] + [losses[1000 + i] * math.exp(0.05 * i * i) for i in range(20)]
    events = series_events(loss_detector(), growing)
    assert events[0].phase == "open"
    diverged = [e for e in events if e.kind == "divergence"]
    assert (
        diverged and diverged[0].severity == "critical" and "keeps growing" in diverged[0].message
    )
    suite = DetectorSuite(DetectorsConfig())
    for step, value in enumerate(losses[:1000] + [losses[1000] * 3]):
        suite.check(step, {"loss": value, "nan_or_inf": 0.0})
    events = suite.check(1001, {"loss": None, "nan_or_inf": 1.0})
    assert {(e.detector, e.kind) for e in events} == {
        ("nan_or_inf", "non_finite"), ("loss_spike", "divergence"),
    }  # fmt: skip


def test_megatron_rule_is_optional_and_blind_after_warmup() -> None:
    losses = healthy_losses(1000, seed=8)
    losses[700] *= 4  # 4x the level, but below 10x the (warm-up) max of the first 100 losses
    with_rule = loss_detector(ratio=10.0)
    found = openings(series_events(with_rule, losses))
    assert [(e.step, e.kind) for e in found] == [(700, "spike")]  # the tail test, not the rule
    rule_only = LossSpikeDetector(DetectorConfig(ratio=10.0, warmup_steps=5, min_history=64))
    events = series_events(rule_only, [3.0, 2.9, 3.1, 2.8, 2.7, 2.6, 25.0, 31.5, 33.0, 3.0])
    assert [(e.step, e.phase, e.kind) for e in events] == [(7, "open", "threshold"),
                                                          (9, "close", "threshold")]  # fmt: skip
    assert events[0].threshold == 31.0 and "10x the max of the first 5 losses" in events[0].message
    assert series_events(loss_detector(), [3.0] * 5 + [400.0]) == []  # no rule, no history: quiet


def test_grad_norm_spike_on_log_scale() -> None:
    norms = healthy_norms(1500)
    config = DetectorConfig(window=1024, min_relative_jump=0.5)
    detector = RobustSpikeDetector("grad_norm_spike", "grad_norm", config, log_scale=True)
    assert series_events(detector, norms) == []
    norms[900] *= 8
    detector = RobustSpikeDetector("grad_norm_spike", "grad_norm", config, log_scale=True)
    assert [(e.step, e.phase) for e in series_events(detector, norms)] == [
        (900, "open"), (901, "close"),
    ]  # fmt: skip


def test_corroborated_event_is_more_severe_and_takes_confirmed_action() -> None:
    config = DetectorsConfig(
        loss_spike=DetectorConfig(window=1024, confirmed_action="skip_step"),
        grad_norm_spike=DetectorConfig(window=1024, min_relative_jump=0.5),
    )
    suite = DetectorSuite(config)
    losses, norms = healthy_losses(800, seed=9), healthy_norms(800, seed=10)
    for step in range(700):
        assert suite.check(step, {"loss": losses[step], "grad_norm": norms[step]}) == []
    alone = suite.check(700, {"loss": losses[700] * 1.5, "grad_norm": norms[700]})
    assert [(e.signals, e.severity, e.action) for e in alone] == [(("loss",), "warning", "alert")]
    suite.check(701, {"loss": losses[701], "grad_norm": norms[701]})
    for step in range(702, 750):
        suite.check(step, {"loss": losses[step], "grad_norm": norms[step]})
    both = suite.check(750, {"loss": losses[750] * 1.5, "grad_norm": norms[750] * 10})
    loss_event = next(e for e in both if e.detector == "loss_spike")
    assert loss_event.signals == ("loss", "grad_norm")
    assert loss_event.severity == "critical" and loss_event.action == "skip_step"
    assert "corroborated by grad_norm" in loss_event.message


def test_nan_or_inf_episodes() -> None:
    detector = NanInfDetector(DetectorConfig(action="alert", severity="critical"))
    flags = [0.0, 1.0, 0.0, float("nan"), 1.0, 1.0, 1.0, 0.0, None]
    events = series_events(detector, flags)
    assert [(e.step, e.phase, e.kind) for e in events] == [
        (1, "open", "non_finite"), (2, "close", "non_finite"),
        (3, "open", "non_finite"), (5, "update", "divergence"), (7, "close", "divergence"),
    ]  # fmt: skip
    assert events[0].action == "alert" and events[1].action == "log"
    assert events[-1].duration == 4 and detector.state_dict()["count"] == 5
    skipper = NanInfDetector(DetectorConfig(action="skip_step"))
    skips = [e for e in series_events(skipper, [1.0, 1.0, 0.0]) if e.action == "skip_step"]
    assert [e.step for e in skips] == [0, 1]  # every non-finite step is skipped


def test_layer_condition_is_one_event_per_layer_episode() -> None:
    detector = LayerThresholdDetector(
        "massive_activation",
        "max_abs_residual",
        DetectorConfig(threshold=1e4, ratio=10.0, min_history=5),
    )
    events = []
    for step in range(20):
        events += detector.observe(step, [10.0 + step % 3, 20.0, None])
    assert events == []
    for step in range(20, 60):  # layer 1 at 25x its median for 20 steps; layer 3 over 1e4 for 40
        layer1 = 250.0 + step if step < 40 else 11.0
        events += detector.observe(step, [layer1, 21.0, 2e4 + step])
    events += detector.observe(60, [11.0, 20.0, 50.0])
    assert [(e.layer, e.phase, e.step) for e in events] == [
        (1, "open", 20), (3, "open", 20), (1, "close", 40), (3, "close", 60),
    ]  # fmt: skip
    ratio_open, absolute_open = events[0], events[1]
    assert "above 10x its running median" in ratio_open.message
    assert "above the absolute threshold 10000" in absolute_open.message
    assert absolute_open.threshold == 1e4
    closed = events[2]
    assert closed.peak == 250.0 + 39 and closed.duration == 20 and closed.end_step == 39
    assert "back below" in closed.message and closed.action == "log"
    skipper = LayerThresholdDetector(
        "massive_activation", "max_abs_residual", DetectorConfig(action="skip_step", threshold=1.0)
    )
    records = [e for step in range(3) for e in skipper.observe(step, [5.0])]
    assert [(e.step, e.phase, e.action) for e in records] == [
        (0, "open", "skip_step"), (1, "update", "skip_step"), (2, "update", "skip_step"),
    ]  # fmt: skip


def test_attention_sink_and_logit_growth() -> None:
    suite = DetectorSuite(DetectorsConfig())
    quiet = {"first_token_attention_share": [0.3, 0.5], "max_attention_logit": [8.0, 9.0]}
    for step in range(10):
        assert suite.check(step, {"loss": 2.0}, quiet) == []
    loud = {"first_token_attention_share": [0.95, 0.5], "max_attention_logit": [8.5, 60.0]}
    events = suite.check(10, {"loss": 2.0}, loud)
    found = {(event.detector, event.layer) for event in events}
    assert found == {("attention_sink", 1), ("attention_logit_growth", 2)}
    for step in range(11, 30):  # the condition lasts: no new event
        assert suite.check(step, {"loss": 2.0}, loud) == []


def test_state_dict_resumes_identically_mid_episode() -> None:
    losses = healthy_losses(1300, seed=3)
    for offset in range(30):
        losses[995 + offset] *= math.exp(0.3 * math.exp(-offset / 10))
    whole = series_events(loss_detector(), losses)
    first = loss_detector()
    series_events(first, losses[:1000])
    assert first.episode is not None  # stopped inside the bump
    resumed = loss_detector()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    after = series_events(resumed, losses[1000:], start=1000)
    assert after == [e for e in whole if e.step >= 1000] and after
    suite = DetectorSuite(DetectorsConfig())
    suite.check(0, {"loss": 2.0, "nan_or_inf": 1.0})
    copy = DetectorSuite(DetectorsConfig())
    copy.load_state_dict(json.loads(json.dumps(suite.state_dict())))
    assert copy.state_dict() == suite.state_dict()


def test_tail_threshold_matches_its_rate() -> None:
    rng = random.Random(0)
    shape, scale = gpd_fit([(rng.random() ** -0.25 - 1) / 0.25 for _ in range(20000)])
    assert abs(shape - 0.25) < 0.05 and abs(scale - 1.0) < 0.05
    exceeded = checked = 0
    tail = TailThreshold(window=1024)
    for _ in range(20000):  # Student-t(4): heavy tails, threshold for 1e-3 per step
        value = rng.gauss(0, 1) / math.sqrt(rng.gammavariate(2, 2.0) / 4)
        if tail.ready():
            checked += 1
            exceeded += value > tail.quantile(1e-3)
        tail.add(value)
    assert 0.2e-3 < exceeded / checked < 2e-3


def test_tail_quantile_refits_whenever_the_tail_moves() -> None:
    """The memoised POT quantile equals a fresh fit after every residual (window filling, full,
    outliers entering and leaving the tail), for both rates a detector asks for."""
    rng = random.Random(5)
    rolling = TailThreshold(window=400)
    for step in range(1500):
        rolling.add(rng.gauss(0, 1) * (1 if rng.random() < 0.9 else 4))
        fresh = TailThreshold(window=400)
        fresh.extend(rolling.state_dict())
        for rate in (1e-4, 0.05):
            assert rolling.quantile(rate) == fresh.quantile(rate), (step, rate)


def _micro_losses(steps: int, *, seed: int = 5) -> list[float]:
    """A micro-batch-like loss: 3 nats, +-0.06 noise."""
    rng = random.Random(seed)
    return [3.0 + rng.gauss(0, 0.06) for _ in range(steps)]


def test_one_step_outlier_is_an_info_episode_and_a_lasting_rise_is_one_episode() -> None:
    losses = _micro_losses(400)
    losses[200] += 0.9  # ~15 SD and > 0.5 nats: a person sees a spike
    losses[260] += 0.35  # 6 SD: inside the noise of a micro-batch loss, not an outlier
    for step in range(320, 330):
        losses[step] += 1.0  # a 10-step rise: one episode, not ten
    suite = DetectorSuite(DetectorsConfig(loss_spike=DetectorConfig(enabled=False)))
    events = [e for s, v in enumerate(losses) for e in suite.check(s, {"loss": v})]
    outliers = [e for e in openings(events) if e.detector == "loss_outlier"]
    assert [(e.step, e.severity, e.action) for e in outliers] == [
        (200, "info", "log"),
        (320, "info", "log"),
    ]
    closes = [e for e in events if e.detector == "loss_outlier" and e.phase == "close"]
    assert [(e.step, e.kind, e.duration) for e in closes] == [(201, "spike", 1), (330, "bump", 10)]


def test_outlier_already_reported_by_the_spike_test_is_not_repeated() -> None:
    losses = _micro_losses(1200)
    losses[1100] *= 3.0  # the spike test opens (a warning): no info event beside it
    suite = DetectorSuite(DetectorsConfig())
    events = [e for s, v in enumerate(losses) for e in suite.check(s, {"loss": v})]
    opened = [(e.step, e.detector) for e in openings(events) if e.step == 1100]
    assert opened == [(1100, "loss_spike")]


def test_loss_reaction_right_after_a_grad_norm_burst_is_found() -> None:
    losses, norms = healthy_losses(1500), healthy_norms(1500)
    for step in (900, 1200):
        losses[step + 1] *= 1.10  # +10%: below the usual threshold here, above the primed one
    norms[1200] *= 20.0  # a gradient burst one step before the second rise only

    def loss_openings() -> list[int]:
        suite = DetectorSuite(DetectorsConfig())
        events = [e for s in range(1500)
                  for e in suite.check(s, {"loss": losses[s], "grad_norm": norms[s]})]  # fmt: skip
        return [e.step for e in openings(events) if e.detector == "loss_spike"]

    assert loss_openings() == [1201]


def test_outlier_state_resumes_mid_episode() -> None:
    losses = _micro_losses(120)
    losses[100] += 2.0
    losses[101] += 2.0
    config = DetectorsConfig().loss_outlier
    whole = series_events(OutlierDetector("o", "loss", config), losses)
    first = OutlierDetector("o", "loss", config)
    events = series_events(first, losses[:101])
    second = OutlierDetector("o", "loss", config)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    events += series_events(second, losses[101:], start=101)
    assert events == whole and [e.phase for e in whole] == ["open", "close"]
