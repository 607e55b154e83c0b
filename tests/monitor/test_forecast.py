"""The divergence forecast: its episodes on labelled curves, its config, and the LR back-off it
asks for, on a tiny Megatron GPT in a plain loop."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityMonitor
from megatron_gate.monitor.config import ForecastConfig, MonitorConfigError
from megatron_gate.monitor.detectors import DetectorSuite
from megatron_gate.monitor.forecast import DivergenceForecast, log_slope
from megatron_gate.monitor.sinks import read_records

from .conftest import batch_at, lm_loss, tiny_gated_gpt

ONSET = 200  # the step where the diverging curve starts to grow


def curve(steps: int, *, seed: int, onset: int | None = None, growth: float = 0.02,
          reverse_at: int | None = None) -> list[tuple[int, dict[str, float]]]:  # fmt: skip
    """Noisy falling loss and flat grad norm; from `onset` both grow by `growth` per step (log);
    from `reverse_at` they fall back."""
    rng = random.Random(seed)
    rows, excess = [], 0.0
    for step in range(1, steps + 1):
        if onset is not None and step >= onset:
            excess += -growth if reverse_at is not None and step >= reverse_at else growth
            excess = max(excess, 0.0)
        loss = (2.0 + 3.0 * math.exp(-step / 40)) * math.exp(excess + rng.gauss(0, 0.05))
        grad = 0.5 * math.exp(2 * excess + rng.gauss(0, 0.2))
        rows.append((step, {"loss": loss, "grad_norm": grad, "nan_or_inf": 0.0}))
    return rows


def feed(detector: DivergenceForecast, rows: list, layers_at: dict | None = None) -> list:
    events = []
    for step, scalars in rows:
        events += detector.observe(step, scalars, (layers_at or {}).get(step))
    return events


def test_log_slope_matches_a_line_and_its_noise() -> None:
    slope, t = log_slope([(x, 0.5 + 0.25 * x) for x in range(10)])
    assert slope == pytest.approx(0.25) and t > 1e5
    rng = random.Random(0)
    slope, t = log_slope([(x, rng.gauss(0, 1)) for x in range(200)])
    assert abs(t) < 4  # pure noise is not a trend


@pytest.mark.parametrize("seed", range(5))
def test_healthy_curves_never_warn(seed: int) -> None:
    assert feed(DivergenceForecast(ForecastConfig()), curve(2000, seed=seed)) == []


def test_diverging_curve_warns_ahead_with_evidence_and_estimate() -> None:
    rows = curve(400, seed=1, onset=ONSET)
    events = feed(DivergenceForecast(ForecastConfig()), rows)
    [opened] = [e for e in events if e.phase == "open"]
    crossing = next(s for s, v in rows if s > ONSET and v["loss"] > 2 * 2.0 * math.exp(0.1))
    assert ONSET < opened.step < crossing - 10
    assert (opened.detector, opened.kind, opened.severity) == (
        "divergence_forecast", "forecast", "warning")  # fmt: skip
    assert "loss" in opened.message and "grad_norm" in opened.message
    estimate = int(opened.message.split("in ~")[1].split(" steps")[0])
    assert 0.3 * (crossing - opened.step) < estimate < 3 * (crossing - opened.step)


def test_episode_closes_when_the_trend_reverses() -> None:
    rows = curve(600, seed=2, onset=ONSET, reverse_at=ONSET + 40)
    events = feed(DivergenceForecast(ForecastConfig()), rows)
    assert [e.phase for e in events] == ["open", "close"]
    assert "trend reversed" in events[1].message and events[1].action == "log"
    assert events[1].end_step is not None and events[1].step > events[0].step


def test_non_finite_loss_closes_the_episode() -> None:
    rows = curve(400, seed=3, onset=ONSET)
    detector = DivergenceForecast(ForecastConfig())
    events = feed(detector, rows[:300])
    assert detector.episode is not None
    events += detector.observe(301, {"loss": math.nan, "nan_or_inf": 1.0})
    assert events[-1].phase == "close" and "non-finite" in events[-1].message
    assert detector.episode is None


def test_rising_loss_alone_is_not_enough() -> None:
    rows = curve(400, seed=4, onset=ONSET)
    loss_only = [(s, {"loss": v["loss"], "grad_norm": 0.5}) for s, v in rows]
    assert feed(DivergenceForecast(ForecastConfig()), loss_only) == []


def test_growing_layer_statistic_is_evidence_and_named() -> None:
    rows = curve(400, seed=5, onset=ONSET)
    flat_grad = [(s, {**v, "grad_norm": 0.5}) for s, v in rows]
    layers_at = {
        step: {"max_attention_logit": [10.0, 10.0 * math.exp(0.03 * max(0, step - ONSET))]}
        for step in range(10, 401, 10)
    }
    events = feed(DivergenceForecast(ForecastConfig()), flat_grad, layers_at)
    [opened] = [e for e in events if e.phase == "open"]
    assert "layer 2 max_attention_logit" in opened.message and "grad_norm" not in opened.message


@pytest.mark.parametrize("growing", [2, 3])
def test_layers_alone_need_three_growing_statistics(growing: int) -> None:
    """The loss settles 20% above its best (high, not rising) and from step 250 `growing` layer
    statistics run away: the max attention logit and max |h| together (one piece of evidence)
    are not enough, a third (the layers' update norm) is."""
    rng = random.Random(8)
    rows = [(step, {"loss": (2.0 if step < 150 else 2.4) * math.exp(rng.gauss(0, 0.03)),
                    "grad_norm": 0.5}) for step in range(1, 401)]  # fmt: skip
    names = ("max_attention_logit", "max_abs_residual", "update_norm")[:growing]
    layers_at = {
        step: {name: [10.0, 10.0 * math.exp(0.03 * max(0, step - 250))] for name in names}
        for step in range(10, 401, 10)
    }
    events = feed(DivergenceForecast(ForecastConfig()), rows, layers_at)
    opened = [e for e in events if e.phase == "open"]
    if growing == 2:
        assert opened == []
    else:
        assert len(opened) == 1 and 250 < opened[0].step < 320
        assert all(f"layer 2 {name}" in opened[0].message for name in names)


def test_state_dict_resumes_mid_episode() -> None:
    rows = curve(400, seed=6, onset=ONSET)
    whole = DivergenceForecast(ForecastConfig())
    expected = feed(whole, rows)
    first = DivergenceForecast(ForecastConfig())
    got = feed(first, rows[:280])
    second = DivergenceForecast(ForecastConfig())
    second.load_state_dict(first.state_dict())
    got += feed(second, rows[280:])
    assert got == expected


def test_config_section_and_errors() -> None:
    config = MonitorConfig.from_dict({"detectors": {"divergence_forecast": {"action": "lr_backoff",
                                                                            "confirm": 2}}})  # fmt: skip
    assert config.detectors.divergence_forecast.action == "lr_backoff"
    assert MonitorConfig().detectors.divergence_forecast.action == "alert"
    with pytest.raises(MonitorConfigError, match="divergence_forecast.layer_ratio"):
        MonitorConfig.from_dict({"detectors": {"divergence_forecast": {"layer_ratio": 0.5}}})
    with pytest.raises(MonitorConfigError, match="divergence_forecast.action"):
        MonitorConfig.from_dict({"detectors": {"divergence_forecast": {"action": "panic"}}})


def test_suite_runs_the_forecast() -> None:
    suite = DetectorSuite(MonitorConfig().detectors)
    events = []
    for step, scalars in curve(400, seed=1, onset=ONSET):
        events += suite.check(step, scalars)
    assert any(e.detector == "divergence_forecast" and e.phase == "open" for e in events)
    assert "divergence_forecast" in suite.state_dict()


def test_forecast_lr_backoff_in_a_real_loop(one_rank_world: None, tmp_path: Path) -> None:
    """A tiny gated GPT trains while the reported loss and grad norm follow a diverging curve:
    the forecast's `lr_backoff` halves the optimizer's learning rate from the step it opens."""
    model = tiny_gated_gpt()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = MonitorConfig.from_dict({
        "log_interval": 1, "layer_interval": 50, "lr_backoff_steps": 50,
        "sinks": {"console": False, "tensorboard": False},
        "detectors": {"divergence_forecast": {"action": "lr_backoff", "min_history": 20}},
    })  # fmt: skip
    monitor = StabilityMonitor(config, models=[model], run_dir=tmp_path, optimizer=optimizer)
    onset = 80  # short: a step of even this model costs ~0.1 s on a loaded CPU
    rows = curve(120, seed=1, onset=onset, growth=0.03)
    used, opened = [], None
    for step, scalars in rows:
        monitor.start_step(step)
        loss = lm_loss(model, batch_at(step % 7))
        loss.backward()
        decision = monitor.end_step(step, loss=scalars["loss"], grad_norm=scalars["grad_norm"])
        if opened is None and any(e.detector == "divergence_forecast" for e in decision.events):
            opened = step
        used.append(optimizer.param_groups[0]["lr"])
        monitor.step_optimizer(optimizer, decision)
        optimizer.zero_grad()
    monitor.close()
    assert opened is not None and onset < opened < 110
    assert set(used[: opened - 1]) == {1e-3} and set(used[opened - 1 :]) == {5e-4}
    events = [r for r in read_records(tmp_path) if r["kind"] == "event"
              and r["detector"] == "divergence_forecast"]  # fmt: skip
    assert events[0]["action"] == "lr_backoff" and events[0]["episode"]["kind"] == "forecast"


def test_loading_a_state_replaces_what_the_detector_saw_since() -> None:
    # A rollback loads an older state into a detector that has run on: the windows are the saved
    # ones, not the saved ones appended to the newer ones.
    from megatron_gate.monitor.config import DetectorsConfig
    from megatron_gate.monitor.forecast import DivergenceForecast

    detector = DivergenceForecast(DetectorsConfig().divergence_forecast)
    for step in range(1, 5):
        detector.observe(step, {"loss": 3.0 - 0.1 * step, "grad_norm": 1.0}, None)
    saved = detector.state_dict()
    for step in range(5, 9):
        detector.observe(step, {"loss": 3.0 - 0.1 * step, "grad_norm": 1.0}, None)
    detector.load_state_dict(saved)
    assert detector.state_dict() == saved
