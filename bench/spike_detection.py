"""Labelled spike-detection benchmark: precision, recall, false events and delay of every detector.

    .venv/bin/python bench/spike_detection.py            # writes bench/results/spike_detection.json
    .venv/bin/python bench/spike_detection.py --quick    # the test subset only (a few seconds)

Curves: (a) synthetic, from fixed seeds: warm-up and cosine LR schedule, a loss that falls with
the cumulative LR, multiplicative Student-t AR(1) noise, grad and update norms with their own
noise, benign level shifts and LR-schedule changes, and labelled faults: single-step spikes
(small 12-20 %, medium, large), bumps with slow recovery, divergences, NaN steps; (b) real traces
of the demo's tiny Megatron-Core GPT with injected faults (bench/spike_traces.py, cached in
bench/results/traces/).

Every detector sees every step's loss, grad norm, update norm and NaN/Inf flag, and yields
EVENTS (an event opens at a step; detectors that only alarm per step have consecutive alarm
steps merged into one event).

Matching (one fault f = labelled step, end e = last faulty step, K = `MATCH_STEPS`):
- a fault is found (recall) when an event opens in [f, f + K]; its delay is open step - f;
- an event is true when it opens in [f, max(e, f) + K] of some fault, benign when the detector
  itself classified it `level_shift`, false otherwise (precision = true / (true + false));
- false events per 10,000 healthy steps: false events / steps outside every fault's window.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import real_logs  # noqa: E402

from megatron_gate.monitor.config import MonitorConfig  # noqa: E402
from megatron_gate.monitor.detectors import DetectorSuite  # noqa: E402
from megatron_gate.monitor.guard_rule import SIGNALS as GUARD_SIGNALS  # noqa: E402
from megatron_gate.monitor.guard_rule import GuardRule  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "spike_detection.json"
TRACES = ROOT / "bench" / "results" / "traces"
MEGATRON_LM_TRACES = ROOT / "bench" / "results" / "traces_megatron_lm"
MATCH_STEPS = 10
SIGNALS = ("loss", "grad_norm", "update_norm")
ALARM_KINDS = ("spike", "bump", "divergence", "non_finite", "threshold")


# ---------------------------------------------------------------------- curves
@dataclass(kw_only=True)
class Curve:
    """One labelled run: per-step scalars (index i = step first_step + i) and its labels."""

    name: str
    scalars: dict[str, list[float | None]]
    labels: list[dict[str, Any]] = field(default_factory=list)
    """Faults: {"step", "kind", "end"}."""
    benign: list[dict[str, Any]] = field(default_factory=list)
    """Benign changes (level shifts, schedule changes): {"step", "kind"}; not faults."""
    first_step: int = 1

    @property
    def steps(self) -> int:
        return len(self.scalars["loss"])


def _student_t(rng: random.Random, dof: float) -> float:
    """A Student-t sample scaled to unit variance."""
    chi2 = rng.gammavariate(dof / 2, 2.0)
    return rng.gauss(0, 1) / math.sqrt(chi2 / dof) * math.sqrt((dof - 2) / dof)


class ArNoise:
    """AR(1) noise with Student-t innovations and stationary standard deviation `scale`."""

    def __init__(self, rng: random.Random, *, scale: float, phi: float, dof: float) -> None:
        self.rng, self.scale, self.phi, self.dof, self.value = rng, scale, phi, dof, 0.0

    def next(self) -> float:
        innovation = _student_t(self.rng, self.dof) * self.scale * math.sqrt(1 - self.phi**2)
        self.value = self.phi * self.value + innovation
        return self.value


def _schedule(step: int, *, steps: int, warmup: int, restart: int | None) -> float:
    """LR multiplier: linear warm-up, cosine to 0.1; a benign re-warm at `restart` (x1.5)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    lr = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * 1.5 if restart is not None and step >= restart else lr


def _place(rng: random.Random, count: int, *, low: int, high: int, gap: int) -> list[int]:
    """`count` sorted steps in [low, high) at least `gap` apart."""
    steps: list[int] = []
    while len(steps) < count:
        candidate = rng.randrange(low, high)
        if all(abs(candidate - s) >= gap for s in steps):
            steps.append(candidate)
    return sorted(steps)


def synthetic_curve(seed: int, *, steps: int = 4000, faults: bool = True) -> Curve:
    """One synthetic run from `seed` (module docstring: what it contains)."""
    rng = random.Random(seed)
    warmup = rng.choice((50, 100, 200))
    restart = rng.randrange(steps // 3, steps) if rng.random() < 0.3 else None
    loss_noise = ArNoise(rng, scale=rng.uniform(0.004, 0.01), phi=rng.uniform(0.2, 0.8),
                         dof=rng.uniform(4, 10))  # fmt: skip
    grad_noise = ArNoise(rng, scale=rng.uniform(0.05, 0.15), phi=rng.uniform(0.3, 0.8),
                         dof=rng.uniform(3, 8))  # fmt: skip
    update_noise = ArNoise(rng, scale=0.02, phi=0.5, dof=5)
    floor, start = rng.uniform(1.5, 3.5), rng.uniform(7, 11)
    rate = rng.uniform(200, 800)
    count = rng.randint(3, 6) if faults else 0
    fault_steps = _place(rng, count + 2, low=400, high=steps - 300, gap=150)
    shift_steps, fault_steps = fault_steps[:2], fault_steps[2:]
    shifts = [(s, rng.choice((-1, 1)) * rng.uniform(0.05, 0.25)) for s in shift_steps
              if rng.random() < 0.7]  # fmt: skip
    labels = []
    for step in fault_steps:
        kind = rng.choice(("spike_small", "spike", "spike_large", "bump", "non_finite"))
        labels.append({"step": step, "kind": kind, "end": step})
    if faults and rng.random() < 0.3:  # a divergence ends the run
        step = rng.randrange(steps - 250, steps - 100)
        labels = [label for label in labels if label["step"] < step - 150]
        labels.append({"step": step, "kind": "divergence", "end": steps - 1})
    taken = [*(label["step"] for label in labels), *shift_steps]
    bursts = _grad_bursts(seed, taken=taken, steps=steps) if faults else {}
    labels += [{"step": at + 1, "kind": "spike_after_grad_burst", "end": at + 1, "cause": at}
               for at in bursts]  # fmt: skip
    bumps = {}
    for label in labels:
        if label["kind"] == "bump":
            length = rng.randint(20, 120)
            label["end"] = label["step"] + length
            bumps[label["step"]] = (rng.uniform(0.15, 0.6), length / 3)
    size = {"spike_small": (0.12, 0.2), "spike": (0.2, 1.0), "spike_large": (1.0, 20.0)}
    jumps = {label["step"]: rng.uniform(*size[label["kind"]]) for label in labels
             if label["kind"] in size}  # fmt: skip
    nans = {label["step"] for label in labels if label["kind"] == "non_finite"}
    divergence = next((label["step"] for label in labels if label["kind"] == "divergence"), None)
    growth = rng.uniform(0.02, 0.1)
    scalars: dict[str, list[float | None]] = {name: [] for name in (*SIGNALS, "nan_or_inf")}
    progress, shift = 0.0, 0.0
    for step in range(steps):
        lr = _schedule(step, steps=steps, warmup=warmup, restart=restart)
        progress += lr
        shift += sum(size for at, size in shifts if at == step)
        level = (floor + (start - floor) * math.exp(-progress / rate)) * math.exp(shift)
        excess = 0.0
        for at, (height, tau) in bumps.items():
            if at <= step:  # rises over 3 steps, then decays with time constant tau
                excess += height * min(1.0, (step - at + 1) / 3) * math.exp(-(step - at) / tau)
        grad_factor = bursts[step][0] if step in bursts else 1.0
        if step - 1 in bursts:  # the loss reacts one step after the gradient burst
            excess += math.log1p(bursts[step - 1][1])
        if step in jumps:
            excess += math.log1p(jumps[step])
            grad_factor = (1 + jumps[step]) ** rng.uniform(1.0, 3.0)
        if divergence is not None and step >= divergence:
            excess += min(50.0, math.expm1(growth * (step - divergence)))
            grad_factor *= math.exp(min(50.0, 3 * growth * (step - divergence)))
        loss = level * math.exp(excess + loss_noise.next())
        grad = (0.5 + 2.0 * math.exp(-step / 150)) * grad_factor * math.exp(grad_noise.next())
        grad *= math.exp(0.5 * excess) if step not in jumps else 1.0
        update = 0.05 * lr * math.exp(update_noise.next()) * min(grad_factor, 1.0 + excess)
        bad = step in nans or loss > 1e6
        scalars["loss"].append(None if bad else loss)
        scalars["grad_norm"].append(None if bad else grad)
        scalars["update_norm"].append(None if bad else update)
        scalars["nan_or_inf"].append(1.0 if bad else 0.0)
    benign = [{"step": at, "kind": "level_shift", "size": size} for at, size in shifts]
    if restart is not None:
        benign.append({"step": restart, "kind": "lr_restart"})
    return Curve(name=f"synthetic_{seed}", scalars=scalars, labels=labels, benign=benign,
                 first_step=0)  # fmt: skip


def _grad_bursts(seed: int, *, taken: list[int], steps: int) -> dict[int, tuple[float, float]]:
    """0-2 gradient bursts (step -> (grad factor 3-20, loss rise 10-50 % one step later)), away
    from the other faults; from a stream of their own, so the other faults of a seed stay put."""
    rng = random.Random(f"grad-burst-{seed}")
    bursts: dict[int, tuple[float, float]] = {}
    for _ in range(rng.randint(0, 2)):
        for _attempt in range(50):
            at = rng.randrange(400, steps - 300)
            if all(abs(at - other) >= 150 for other in [*taken, *bursts]):
                bursts[at] = (rng.uniform(3.0, 20.0), rng.uniform(0.1, 0.5))
                break
    return bursts


def synthetic_curves(seeds: Iterable[int], *, healthy: Iterable[int] = ()) -> list[Curve]:
    """Faulty curves of `seeds` and healthy (fault-free) ones of `healthy`."""
    curves = [synthetic_curve(seed) for seed in seeds]
    return curves + [
        Curve(**{**vars(synthetic_curve(seed, faults=False)), "name": f"healthy_{seed}"})
        for seed in healthy
    ]


def real_curves(folder: Path = TRACES) -> list[Curve]:
    """The cached real traces of `folder` (bench/spike_traces.py writes bench/results/traces,
    bench/megatron_lm_traces.py bench/results/traces_megatron_lm)."""
    curves = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        curves.append(Curve(name=f"real_{path.stem}", scalars=data["scalars"],
                            labels=data["labels"], benign=data.get("benign", []),
                            first_step=data.get("first_step", 1)))  # fmt: skip
    return curves


# ---------------------------------------------------------------------- detectors
@dataclass(frozen=True, kw_only=True)
class Opening:
    """An event as the scoring sees it: where it opened, in which signal, its final kind."""

    step: int
    kind: str
    signal: str
    actionable: bool = True
    """Severity warning or critical (an `info` event only informs: not scored as an alarm)."""
    skip: bool = False
    """The guard skipped this step's update (not an event of a detector)."""


Detector = Callable[[Curve], list[Opening]]


def _guard_opening(step: int, evaluation: Any) -> Opening:
    """The opening that stands for a step the guard skipped."""
    non_finite = any(test.non_finite for test in evaluation.tests)
    signal = next((s for s, t in zip(GUARD_SIGNALS, evaluation.tests, strict=True)
                   if t.non_finite or t.spike), "loss")  # fmt: skip
    return Opening(step=step, kind="non_finite" if non_finite else "spike",
                   signal="nan_or_inf" if non_finite else signal, skip=True)  # fmt: skip


def _guard_values(scalars: dict[str, float | None]) -> list[float | None]:
    """(loss, grad norm) as the guard sees them: NaN where the curve flags a non-finite step."""
    flagged = (scalars.get("nan_or_inf") or 0.0) > 0
    return [math.nan if flagged and scalars.get(s) is None else scalars.get(s)
            for s in GUARD_SIGNALS]  # fmt: skip


def ours(config: MonitorConfig | None = None, *, guard: bool = True) -> Detector:
    """megatron-gate's monitor: the per-step guard (`GuardRule`, as `StabilityMonitor.end_step`
    runs it on the CPU) and the `DetectorSuite` (scalar detectors and the NaN/Inf flag)."""
    config = config or MonitorConfig()

    def run(curve: Curve) -> list[Opening]:
        suite, rule = DetectorSuite(config.detectors), GuardRule(config.guard)
        openings: list[Opening] = []
        current: dict[str, int] = {}  # detector -> index of its open episode in `openings`
        for index in range(curve.steps):
            step = curve.first_step + index
            scalars = {name: values[index] for name, values in curve.scalars.items()}
            if guard and config.guard.enabled:
                evaluation = rule.evaluate(_guard_values(scalars))
                accept = not any(evaluation.flags)
                rule.update(evaluation, accept)
                if not accept:
                    openings.append(_guard_opening(step, evaluation))
            for event in suite.check(step, scalars):
                if event.phase == "open":
                    current[event.detector] = len(openings)
                    openings.append(Opening(step=step, kind=event.kind, signal=event.metric,
                                            actionable=event.severity != "info"))  # fmt: skip
                elif event.detector in current:  # the final kind is known at close
                    at = current[event.detector]
                    openings[at] = replace(openings[at], kind=event.kind)
                    if event.phase == "close":
                        del current[event.detector]
        return openings

    return run


class Rule:
    """A per-step alarm rule on one signal; consecutive alarm steps form one event."""

    def __init__(self, signal: str) -> None:
        self.signal = signal

    def alarm(self, value: float) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, curve: Curve) -> list[Opening]:
        openings, previous = [], False
        flags = curve.scalars.get("nan_or_inf") or [0.0] * curve.steps
        for index, value in enumerate(curve.scalars.get(self.signal) or [None] * curve.steps):
            step = curve.first_step + index
            non_finite = (flags[index] or 0) > 0
            if value is None and not non_finite:  # the signal is not in this log
                previous = False
                continue
            fired = non_finite or self.alarm(value)
            if fired and not previous:
                openings.append(Opening(step=step, kind="non_finite" if non_finite else "spike",
                                        signal=self.signal))  # fmt: skip
            previous = fired
        return openings


class WindowRule(Rule):
    """A rule over the last `window` values with a `sigmas` multiplier."""

    def __init__(self, signal: str, *, window: int = 128, sigmas: float = 6.0) -> None:
        super().__init__(signal)
        self.window, self.sigmas = window, sigmas
        self.history: deque[float] = deque(maxlen=window)


class MeanStdRule(WindowRule):
    """OLMo-core style: value - mean > 6 std over the last 128 finite values (>= 64 of them)."""

    def alarm(self, value: float) -> bool:
        fired = False
        if len(self.history) >= self.window // 2:
            mean = statistics.fmean(self.history)
            fired = value - mean > self.sigmas * statistics.pstdev(self.history, mean)
        self.history.append(value)
        return fired


class MedianMadRule(WindowRule):
    """value - median > 6 x 1.4826 MAD over the last 128 values (>= 16), log scale for norms."""

    def __init__(self, signal: str, **options: Any) -> None:
        super().__init__(signal, **options)
        self.log = signal != "loss"

    def alarm(self, value: float) -> bool:
        if self.log and value <= 0:
            return False
        x = math.log(value) if self.log else value
        fired = False
        if len(self.history) >= 16:
            median = statistics.median(self.history)
            mad = statistics.median(abs(v - median) for v in self.history)
            fired = x - median > self.sigmas * 1.4826 * max(mad, 1e-12)
        self.history.append(x)
        return fired


class MegatronRule(Rule):
    """Megatron's --check-for-spiky-loss: loss > 10 x the max of the first 100 losses."""

    def __init__(self, *, ratio: float = 10.0, warmup: int = 100) -> None:
        super().__init__("loss")
        self.ratio, self.warmup, self.early = ratio, warmup, []

    def alarm(self, value: float) -> bool:
        if len(self.early) < self.warmup:
            self.early.append(value)
            return False
        return value > self.ratio * max(self.early)


class LightningRule(Rule):
    """Lightning's SpikeDetection defaults (mode min, window 10, rtol 2): the value rose since the
    last accepted one and |value - running mean of 10| >= 2 x the mean; a spike is not added."""

    def __init__(self, signal: str = "loss", *, window: int = 10, rtol: float = 2.0) -> None:
        super().__init__(signal)
        self.history: deque[float] = deque(maxlen=window)
        self.rtol, self.last = rtol, None

    def alarm(self, value: float) -> bool:
        if self.last is None or not self.history:
            self.history.append(value)
            self.last = value
            return False
        mean = statistics.fmean(self.history)
        fired = value > self.last and abs(value - mean) >= self.rtol * abs(mean)
        if not fired:
            self.history.append(value)
            self.last = value
        return fired


class ZClipRule(Rule):
    """ZClip's spike test (Kumar et al. 2025; defaults alpha 0.97, z 2.5, 25 warm-up steps): the
    z-score of the grad norm against an EMA of its mean and variance; a spike enters the EMA at
    its clipped value mean + z_max^2 / z x std, as ZClip clips it."""

    def __init__(self, *, alpha: float = 0.97, z_max: float = 2.5, warmup: int = 25) -> None:
        super().__init__("grad_norm")
        self.alpha, self.z_max, self.warmup = alpha, z_max, warmup
        self.early: list[float] = []
        self.mean = self.variance = 0.0

    def alarm(self, value: float) -> bool:
        if len(self.early) < self.warmup:
            self.early.append(value)
            if len(self.early) == self.warmup:
                self.mean = statistics.fmean(self.early)
                self.variance = statistics.pvariance(self.early, self.mean)
            return False
        std = math.sqrt(max(self.variance, 1e-24))
        z = (value - self.mean) / std
        fired = z > self.z_max
        entered = self.mean + self.z_max**2 / z * std if fired else value
        self.variance = self.alpha * self.variance + (1 - self.alpha) * (entered - self.mean) ** 2
        self.mean = self.alpha * self.mean + (1 - self.alpha) * entered
        return fired


class FixedThresholdRule(Rule):
    """Megatron-Core's `OptimizerConfig.grad_norm_skip_threshold`: skip above a fixed value."""

    def __init__(self, threshold: float) -> None:
        super().__init__("grad_norm")
        self.threshold = threshold

    def alarm(self, value: float) -> bool:
        return value > self.threshold


def union(*rules: Callable[[], Detector]) -> Detector:
    """A detector whose events are those of fresh `rules` on several signals."""

    def run(curve: Curve) -> list[Opening]:
        return sorted((o for make in rules for o in make()(curve)), key=lambda o: o.step)

    return run


GRAD_NORM_SKIP_THRESHOLD = 1.0  # the same value as the usual --clip-grad


def reference_detectors() -> dict[str, Detector]:
    """The reference rules (Megatron's and Lightning's on the loss only, ZClip's and the fixed
    threshold's on the grad norm only)."""
    return {
        "mean_std_6sigma_128 (OLMo-core SkipStep)": union(lambda: MeanStdRule("loss"),
                                                          lambda: MeanStdRule("grad_norm")),
        "median_mad_6sigma_128": union(lambda: MedianMadRule("loss"),
                                       lambda: MedianMadRule("grad_norm")),
        "zclip_z2.5_ema0.97": union(ZClipRule),
        f"grad_norm_skip_threshold_{GRAD_NORM_SKIP_THRESHOLD:g} (Megatron-Core)": union(
            lambda: FixedThresholdRule(GRAD_NORM_SKIP_THRESHOLD)),
        "megatron_10x_first_100": union(MegatronRule),
        "lightning_spike_detection": union(LightningRule),
    }  # fmt: skip


# ---------------------------------------------------------------------- scoring
@dataclass(kw_only=True)
class Tally:
    """Counts of one detector over a set of curves."""

    found: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    delays: dict[str, list[int]] = field(default_factory=dict)
    true_events: dict[str, int] = field(default_factory=dict)
    false_events: dict[str, int] = field(default_factory=dict)
    benign_events: int = 0
    healthy_steps: int = 0
    false_examples: list[str] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)


def score_curve(curve: Curve, openings: list[Opening], tally: Tally) -> None:
    """Add one curve's matches to `tally` (module docstring: the matching rule); `info` events
    only inform and are not scored."""
    openings = [opening for opening in openings if opening.actionable]
    spans = []
    for label in curve.labels:
        kind, step = label["kind"], label["step"]
        end = max(label.get("end", step), step) + MATCH_STEPS
        spans.append((min(label.get("cause", step), step), end))  # its cause's events are true
        tally.faults[kind] = tally.faults.get(kind, 0) + 1
        hits = [o.step - step for o in openings if step <= o.step <= step + MATCH_STEPS
                and o.kind != "level_shift"]  # fmt: skip
        if hits:
            tally.found[kind] = tally.found.get(kind, 0) + 1
            tally.delays.setdefault(kind, []).append(min(hits))
        else:
            tally.missed.append(f"{curve.name}@{step}:{kind}")
    covered = set()
    for start, end in spans:
        covered.update(range(start, end + 1))
    tally.healthy_steps += sum(1 for i in range(curve.steps) if curve.first_step + i not in covered)
    for opening in openings:
        if any(start <= opening.step <= end for start, end in spans):
            tally.true_events[opening.kind] = tally.true_events.get(opening.kind, 0) + 1
        elif opening.kind == "level_shift":
            tally.benign_events += 1
        else:
            tally.false_events[opening.kind] = tally.false_events.get(opening.kind, 0) + 1
            if len(tally.false_examples) < 20:
                tally.false_examples.append(f"{curve.name}@{opening.step}:{opening.signal}")


def summary(tally: Tally) -> dict[str, Any]:
    """Precision, recall, false events per 10k healthy steps, delays: overall and per kind."""
    true, false = sum(tally.true_events.values()), sum(tally.false_events.values())
    faults, found = sum(tally.faults.values()), sum(tally.found.values())
    delays = [d for values in tally.delays.values() for d in values]
    per_kind = {}
    for kind in sorted(tally.faults):
        kind_delays = tally.delays.get(kind, [])
        per_kind[kind] = {
            "faults": tally.faults[kind],
            "recall": _ratio(tally.found.get(kind, 0), tally.faults[kind]),
            "median_delay": statistics.median(kind_delays) if kind_delays else None,
            "max_delay": max(kind_delays) if kind_delays else None,
        }
    return {
        "precision": _ratio(true, true + false),
        "recall": _ratio(found, faults),
        "false_per_10k_healthy_steps": round(1e4 * false / max(1, tally.healthy_steps), 3),
        "median_delay": statistics.median(delays) if delays else None,
        "max_delay": max(delays) if delays else None,
        "faults": faults,
        "true_events": true,
        "false_events": false,
        "benign_level_shift_events": tally.benign_events,
        "healthy_steps": tally.healthy_steps,
        "per_fault_kind": per_kind,
        "events_by_kind": {"true": tally.true_events, "false": tally.false_events},
        "false_examples": tally.false_examples,
        "missed": tally.missed[:40],
    }


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def evaluate(detectors: dict[str, Detector], curves: list[Curve]) -> dict[str, Any]:
    """Summaries of every detector over `curves`."""
    results = {}
    for name, detector in detectors.items():
        tally = Tally()
        for curve in curves:
            score_curve(curve, detector(curve), tally)
        results[name] = summary(tally)
    return results


def all_detectors() -> dict[str, Detector]:
    """megatron-gate's suite (defaults) first, then the references."""
    return {"megatron_gate (defaults)": ours(), **reference_detectors()}


# ---------------------------------------------------------------------- real logs by others
def log_curve(log: real_logs.RealLog) -> Curve:
    """A real log as a curve (non-finite values: None, with the NaN/Inf flag set)."""

    def finite(values: list[float | None]) -> list[float | None]:
        return [v if v is not None and math.isfinite(v) else None for v in values]

    flags = [0.0 if math.isfinite(loss) and (grad is None or math.isfinite(grad)) else 1.0
             for loss, grad in zip(log.loss, log.grad_norm, strict=True)]  # fmt: skip
    scalars = {"loss": finite(log.loss), "grad_norm": finite(log.grad_norm), "nan_or_inf": flags}
    return Curve(name=log.name, scalars=scalars, first_step=0)


def on_logs(detector: Detector) -> real_logs.Detector:
    """`detector` as a real-log detector: openings at log rows -> marks at the logs' steps."""

    def run(log: real_logs.RealLog) -> list[real_logs.Mark]:
        return [real_logs.Mark(step=log.steps[o.step], signal=o.signal, actionable=o.actionable,
                               skip=o.skip)
                for o in detector(log_curve(log))]  # fmt: skip

    return run


def evaluate_real_logs() -> dict[str, Any]:
    """Every detector on the real logs, per kind (bench/real_logs.py: labels and figures)."""
    logs = real_logs.load_logs()
    detectors = {name: on_logs(detector) for name, detector in all_detectors().items()}
    return real_logs.evaluate_logs(detectors, logs)


def logs_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown tables per kind of the real-log figures."""
    lines = []
    for kind, by_detector in results.items():
        columns = [
            k
            for k in next(iter(by_detector.values()))
            if k not in ("logs", "false_examples", "missed")
        ]
        lines += [f"\n{kind}:\n", "| detector | " + " | ".join(columns) + " |",
                  "| --- |" + " --- |" * len(columns)]  # fmt: skip
        for name, figures in by_detector.items():
            lines.append(f"| {name} | " + " | ".join(str(figures[c]) for c in columns) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- report
QUICK_SEEDS, QUICK_HEALTHY = range(100, 106), range(200, 202)
FULL_SEEDS, FULL_HEALTHY = range(1000, 1060), range(2000, 2010)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of the overall figures."""
    rows = ["| detector | precision | recall | false / 10k healthy steps | median / max delay |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, r in results.items():
        rows.append(f"| {name} | {_fmt(r['precision'])} | {_fmt(r['recall'])} | "
                    f"{r['false_per_10k_healthy_steps']:g} | {r['median_delay']} / "
                    f"{r['max_delay']} |")  # fmt: skip
    return "\n".join(rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small subset the test scores")
    parser.add_argument("--sets", nargs="+", choices=("synthetic", "real", "megatron_lm", "real_logs"),
                        default=["synthetic", "real", "megatron_lm", "real_logs"],
                        help="curve sets to score; the others keep their figures in --output")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds, healthy = (QUICK_SEEDS, QUICK_HEALTHY) if args.quick else (FULL_SEEDS, FULL_HEALTHY)
    sets = {}
    if "synthetic" in args.sets:
        sets["synthetic"] = synthetic_curves(seeds, healthy=healthy)
    if "real" in args.sets and not args.quick:
        sets["real"] = real_curves()
    if "megatron_lm" in args.sets and not args.quick:
        sets["megatron_lm"] = real_curves(MEGATRON_LM_TRACES)
    report: dict[str, Any] = {"match_steps": MATCH_STEPS, "sets": {}}
    if args.output.exists() and not args.quick:
        report = json.loads(args.output.read_text())
    if "real_logs" in args.sets and not args.quick:
        start = time.process_time()
        report["real_logs"] = evaluate_real_logs()
        report["real_logs_cpu_seconds"] = round(time.process_time() - start, 1)
        print(
            "\n## real logs by others (bench/data/real_traces)\n" + logs_table(report["real_logs"])
        )
    for name, curves in sets.items():
        if not curves:
            continue
        start = time.process_time()
        results = evaluate(all_detectors(), curves)
        report["sets"][name] = {
            "curves": [curve.name for curve in curves],
            "steps": sum(curve.steps for curve in curves),
            "cpu_seconds": round(time.process_time() - start, 1),
            "detectors": results,
        }
        print(f"\n## {name}: {len(curves)} curves, {report['sets'][name]['steps']} steps\n")
        print(table(results))
    if not args.quick:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
