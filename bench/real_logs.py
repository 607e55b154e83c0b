"""Real training logs by others, labelled, and the monitor's figures on them (issue: calibration).

    .venv/bin/python bench/spike_detection.py --sets real_logs     # scores them (with the references)

The logs are in bench/data/real_traces/ (NOTICE.md: sources and licences). Labels, fixed in advance
from the logs alone (none of them comes from a detector):

- `clean` (a healthy full-batch run): no loss event and no skipped update is right, except at the
  grad-norm-only blips that index.tsv names ("... at step N ..."): those a grad-norm detector should
  report (and skipping them is not a fault).
- `micro` (one rank's micro-batch loss): an UNMISTAKABLE one-step outlier is a step whose loss is
  above the median of the previous 50 losses by more than max(0.5 nats, 10 robust SD), the robust SD
  being 1.4826 x their MAD. A person looking at the curve sees a spike at each.
- `nan`: the first non-finite row is the fault; it must be caught on that row.

A detector is a function from a log to its `Mark`s: an event that opened or a step it skipped, with
its signal and whether it is actionable (severity warning or critical, or a skip). Matching: an
outlier or blip at step s is found by a mark in [s, s + 1] (one row later: a loss reaction).
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "real_traces"
OUTLIER_WINDOW, OUTLIER_NATS, OUTLIER_SIGMAS = 50, 0.5, 10.0
MAD_TO_SIGMA = 1.4826
MATCH_ROWS = 1


@dataclass(frozen=True, kw_only=True)
class RealLog:
    """One real log: its rows (step, loss, grad norm or None) and labels."""

    name: str
    kind: str
    steps: list[int]
    loss: list[float]
    grad_norm: list[float | None]
    blips: tuple[int, ...] = ()
    """Documented grad-norm-only blips (steps)."""


@dataclass(frozen=True, kw_only=True)
class Mark:
    """What a detector did at a step: an event opened, or the update skipped."""

    step: int
    signal: str
    """loss | grad_norm | nan_or_inf | ..."""
    actionable: bool
    skip: bool = False


Detector = Callable[[RealLog], list[Mark]]


def _number(text: str | None) -> float | None:
    return None if text in (None, "") else float(text)


def load_logs(root: Path = DATA) -> list[RealLog]:
    """Every log of `root`/index.tsv, in name order."""
    logs = []
    with open(root / "index.tsv", newline="") as index:
        for entry in csv.DictReader(index, delimiter="\t"):
            with open(root / "csv" / f"{entry['name']}.csv", newline="") as file:
                rows = list(csv.DictReader(file))
            blips = tuple(int(step) for step in re.findall(r"at step (\d+)", entry["note"]))
            logs.append(RealLog(
                name=entry["name"], kind=entry["kind"], steps=[int(r["step"]) for r in rows],
                loss=[float(r["loss"]) for r in rows],
                grad_norm=[_number(r.get("grad_norm")) for r in rows], blips=blips,
            ))  # fmt: skip
    return sorted(logs, key=lambda log: log.name)


def unmistakable_outliers(log: RealLog) -> list[int]:
    """Steps whose loss is an unmistakable one-step outlier (module docstring)."""
    found = []
    for index in range(OUTLIER_WINDOW, len(log.loss)):
        previous = [x for x in log.loss[index - OUTLIER_WINDOW : index] if math.isfinite(x)]
        if len(previous) < OUTLIER_WINDOW or not math.isfinite(log.loss[index]):
            continue
        median = statistics.median(previous)
        sigma = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in previous)
        if log.loss[index] > median + max(OUTLIER_NATS, OUTLIER_SIGMAS * sigma):
            found.append(log.steps[index])
    return found


def first_non_finite(log: RealLog) -> int | None:
    """The step of the first row whose loss or grad norm is NaN/Inf."""
    for step, loss, grad in zip(log.steps, log.loss, log.grad_norm, strict=True):
        if not math.isfinite(loss) or (grad is not None and not math.isfinite(grad)):
            return step
    return None


# ---------------------------------------------------------------------- scoring
def _near(marks: list[Mark], step: int, *, before: int = 0) -> list[Mark]:
    return [m for m in marks if step - before <= m.step <= step + MATCH_ROWS]


def _per_10k(count: int, steps: int) -> float:
    return round(1e4 * count / max(1, steps), 3)


def score_clean(logs: list[RealLog], detector: Detector) -> dict[str, Any]:
    """Healthy full-batch logs: skips, actionable loss/grad events, documented blips found."""
    steps = skips = loss_events = grad_events = blips = found = 0
    examples: list[str] = []
    for log in logs:
        marks = detector(log)
        steps += len(log.steps)
        blips += len(log.blips)
        found += sum(1 for b in log.blips if any(m.signal == "grad_norm" for m in _near(marks, b)))
        for mark in marks:
            at_blip = any(b <= mark.step <= b + MATCH_ROWS for b in log.blips)
            if at_blip or not (mark.actionable or mark.skip):
                continue
            skips += mark.skip
            loss_events += mark.signal == "loss" and not mark.skip
            grad_events += mark.signal == "grad_norm" and not mark.skip
            if len(examples) < 10:
                examples.append(f"{log.name}@{mark.step}:{mark.signal}{':skip' * mark.skip}")
    return {
        "logs": len(logs), "steps": steps,
        "healthy_skips_per_10k": _per_10k(skips, steps),
        "actionable_loss_events_per_10k": _per_10k(loss_events, steps),
        "actionable_grad_norm_events_per_10k_outside_blips": _per_10k(grad_events, steps),
        "blips_found": f"{found}/{blips}", "false_examples": examples,
    }  # fmt: skip


def score_micro(logs: list[RealLog], detector: Detector) -> dict[str, Any]:
    """Micro-batch logs: unmistakable outliers found; other actionable events per 10k steps."""
    steps = outliers = found = other = 0
    missed: list[str] = []
    for log in logs:
        marks, labelled = detector(log), unmistakable_outliers(log)
        steps += len(log.steps)
        outliers += len(labelled)
        for step in labelled:
            if _near(marks, step):
                found += 1
            elif len(missed) < 20:
                missed.append(f"{log.name}@{step}")
        other += sum(
            1 for m in marks
            if (m.actionable or m.skip) and not any(s - 1 <= m.step <= s + MATCH_ROWS for s in labelled)
        )  # fmt: skip
    return {
        "logs": len(logs), "steps": steps, "outliers": outliers,
        "outlier_recall": round(found / outliers, 4) if outliers else None,
        "other_actionable_per_10k": _per_10k(other, steps), "missed": missed,
    }  # fmt: skip


def score_nan(logs: list[RealLog], detector: Detector) -> dict[str, Any]:
    """NaN runs: caught on the first non-finite row."""
    caught = 0
    for log in logs:
        first = first_non_finite(log)
        caught += any(m.step == first and (m.actionable or m.skip) for m in detector(log))
    return {"logs": len(logs), "caught_on_first_row": f"{caught}/{len(logs)}"}


SCORES = {"clean": score_clean, "micro": score_micro, "nan": score_nan}


def evaluate_logs(detectors: dict[str, Detector], logs: list[RealLog]) -> dict[str, Any]:
    """Per kind, per detector: the figures of `SCORES`."""
    return {
        kind: {name: score([log for log in logs if log.kind == kind], detector)
               for name, detector in detectors.items()}
        for kind, score in SCORES.items()
    }  # fmt: skip
