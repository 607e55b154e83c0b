"""Labelled benchmark of the divergence forecast: warned share, lead time, false warnings.

    nice -n 10 .venv/bin/python bench/forecast_traces.py        # cached traces (training, CPU)
    .venv/bin/python bench/divergence_forecast.py               # scores them -> results JSON + table
    nice -n 10 .venv/bin/python bench/divergence_forecast.py --backoff   # + live lr_backoff reruns

The detector (`megatron_gate.monitor.forecast.DivergenceForecast`, its defaults) is fed the
cached traces step by step, as the monitor feeds it: every step's scalars, per-layer statistics
on per-layer steps. Divergence step (fixed in advance, `forecast_traces.divergence_step`): the first
non-finite loss, or the first of 20 steps in a row with the loss above 2x its best so far.

- A diverging run is *warned* when a forecast opens in [d - MAX_LEAD, d]; lead = d - its step.
  A forecast opening earlier than that counts as a false warning.
- Healthy runs (no divergence): every forecast is a false warning; rate per 10,000 steps.
- Real logs by others (`real_traces`, loss and sometimes grad norm only): the `nan` runs are
  diverging (d = the first non-finite row), `clean` and `micro` runs healthy.
- `--backoff`: every diverging held-out setting is trained again with
  `detectors.divergence_forecast.action=lr_backoff`; saved = it no longer diverges.

Settings are split in advance: the `tune` set chose the detector's constants, the `heldout` set
(other model sizes, other learning rates) is reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "divergence_forecast.json"
REAL_TRACE_DIRS = (HERE / "data" / "real_traces", Path("/work/shared/real_traces"))
MAX_LEAD = 250
EVIDENCE = re.compile(r"([a-z_]+) [0-9]+\.[0-9]+x, ")
"""An evidence item of a forecast's message: `<signal> <ratio>x, <growth>%/step`."""


# ---------------------------------------------------------------------- running the detector
def run_detector(records: list[tuple[int, dict, dict | None]], config: Any = None) -> list[Any]:
    """Opening events of a fresh `DivergenceForecast` fed `(step, scalars, layers)` in order."""
    from megatron_gate.monitor.config import ForecastConfig
    from megatron_gate.monitor.forecast import DivergenceForecast

    detector = DivergenceForecast(config or ForecastConfig())
    opened = []
    for step, scalars, layers in records:
        opened += [e for e in detector.observe(step, scalars, layers) if e.phase == "open"]
    return opened


def trace_records(trace: dict[str, Any], *, with_layers: bool = True) -> list[tuple]:
    """A cached trace as the monitor's `(step, scalars, layers or None)` sequence."""
    layer_rows = {step: row for row, step in enumerate(trace["layer_steps"])}
    records = []
    for row, step in enumerate(trace["steps"]):
        scalars = {name: column[row] for name, column in trace["scalars"].items()}
        layers = None
        if with_layers and step in layer_rows:
            layers = {name: grid[layer_rows[step]] for name, grid in trace["layers"].items()}
        records.append((step, scalars, layers))
    return records


def signals_of(message: str | None) -> list[str]:
    """The signals named as evidence in a forecast's message (which signals fired)."""
    return sorted(set(EVIDENCE.findall(message or "")))


def score_run(opened: list[Any], *, divergence: int | None, steps: int) -> dict[str, Any]:
    """Warned / lead / false warnings of one run's forecast openings."""
    if divergence is None:
        return {"diverged": False, "steps": steps, "false": len(opened),
                "false_steps": [e.step for e in opened]}  # fmt: skip
    early = [e.step for e in opened if e.step < divergence - MAX_LEAD]
    inside = [e.step for e in opened if divergence - MAX_LEAD <= e.step <= divergence]
    return {"diverged": True, "divergence_step": divergence, "warned": bool(inside),
            "lead": divergence - inside[0] if inside else None, "false": len(early),
            "false_steps": early, "steps": max(0, divergence - MAX_LEAD)}  # fmt: skip


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Warned share, lead median / 10th percentile, false warnings per 10k healthy steps."""
    diverged = [r for r in rows if r["diverged"]]
    leads = [r["lead"] for r in diverged if r["warned"]]
    healthy_steps = sum(r["steps"] for r in rows)
    false = sum(r["false"] for r in rows)
    return {
        "runs": len(rows), "diverging": len(diverged),
        "warned": sum(r["warned"] for r in diverged),
        "warned_share": (sum(r["warned"] for r in diverged) / len(diverged)) if diverged else None,
        "lead_median": percentile(leads, 0.5), "lead_p10": percentile(leads, 0.1),
        "false_warnings": false, "healthy_steps": healthy_steps,
        "false_before_near_divergence": sum(
            1 for r in rows for peak in r.get("peak_after_false", []) if peak and peak >= 2),
        "false_per_10k": 1e4 * false / healthy_steps if healthy_steps else None,
    }  # fmt: skip


# ---------------------------------------------------------------------- the demo's traces
def load_traces() -> list[dict[str, Any]]:
    from forecast_traces import TRACES  # noqa: PLC0415 - bench/ sibling module

    return [json.loads(path.read_text()) for path in sorted(TRACES.glob("*.json"))]


def score_traces(traces: list[dict[str, Any]], config: Any = None, *,
                 with_layers: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for trace in traces:
        opened = run_detector(trace_records(trace, with_layers=with_layers), config)
        row = score_run(opened, divergence=label(trace), steps=trace["steps_done"])
        first = opened[0].message if opened else None
        rows.append({"name": _name(trace), "split": trace["setting"]["split"],
                     "setting": trace["setting"], **row, "first_message": first,
                     "signals": signals_of(first),
                     "peak_after_false": [peak_ratio(trace, s) for s in row["false_steps"]]})  # fmt: skip
    return rows


def peak_ratio(trace: dict[str, Any], step: int) -> float | None:
    """After a false warning at `step`: the highest 10-step mean loss from there on over the
    best 10-step mean before it (a value >= 2 is a near-divergence the run survived)."""
    from forecast_traces import SMOOTH  # noqa: PLC0415

    losses = [(s, v) for s, v in zip(trace["steps"], trace["scalars"]["loss"], strict=True)
              if v is not None and math.isfinite(v)]  # fmt: skip
    means = [(losses[i][0], sum(v for _, v in losses[i - SMOOTH + 1 : i + 1]) / SMOOTH)
             for i in range(SMOOTH - 1, len(losses))]  # fmt: skip
    before = [m for s, m in means if s < step]
    after = [m for s, m in means if s >= step]
    return round(max(after) / min(before), 2) if before and after else None


def by_schedule(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`summarise` per LR schedule (the issue's "per setting")."""
    schedules = sorted({r["setting"]["schedule"] for r in rows})
    return {name: summarise([r for r in rows if r["setting"]["schedule"] == name])
            for name in schedules}  # fmt: skip


def label(trace: dict[str, Any]) -> int | None:
    """The divergence step of a trace, recomputed from its losses (the rule of the bench)."""
    from forecast_traces import divergence_step  # noqa: PLC0415

    return divergence_step(trace["steps"], trace["scalars"]["loss"])


def _name(trace: dict[str, Any]) -> str:
    from forecast_traces import Setting  # noqa: PLC0415

    return Setting(**trace["setting"]).name


def monitor_reference(traces: list[dict[str, Any]]) -> dict[str, Any]:
    """What the shipped detectors said (events recorded live, the forecast's own left out):
    the first event in the window before each divergence, and events in healthy runs."""
    leads, healthy_events, healthy_steps = [], 0, 0
    for trace in traces:
        divergence = label(trace)
        events = [s for s, detector, _kind in trace["monitor_events"]
                  if detector not in ("divergence_forecast", "guard")]  # fmt: skip
        if divergence is None:
            healthy_events += len(events)
            healthy_steps += trace["steps_done"]
            continue
        before = [s for s in events if divergence - MAX_LEAD <= s <= divergence]
        leads.append(divergence - before[0] if before else None)
    found = [lead for lead in leads if lead is not None]
    return {"diverging": len(leads), "any_event_before": len(found),
            "lead_median": percentile(found, 0.5), "lead_p10": percentile(found, 0.1),
            "healthy_events": healthy_events, "healthy_steps": healthy_steps,
            "healthy_events_per_10k": 1e4 * healthy_events / healthy_steps
            if healthy_steps else None}  # fmt: skip


def spike_trace_healthy(config: Any = None) -> list[dict[str, Any]]:
    """The healthy runs of bench/spike_traces.py (same model, plain loop, scalars only)."""
    rows = []
    for path in sorted((HERE / "results" / "traces").glob("healthy_*.json")):
        trace = json.loads(path.read_text())
        scalars = trace["scalars"]
        records = [(trace["first_step"] + i, {k: v[i] for k, v in scalars.items()}, None)
                   for i in range(len(scalars["loss"]))]  # fmt: skip
        opened = run_detector(records, config)
        rows.append({"name": path.stem, **score_run(opened, divergence=None, steps=len(records))})
    return rows


# ---------------------------------------------------------------------- real logs
def real_trace_dir() -> Path | None:
    return next((d for d in REAL_TRACE_DIRS if (d / "index.tsv").exists()), None)


def read_real(directory: Path) -> list[dict[str, Any]]:
    """Rows of `index.tsv` with their `(step, scalars)` records."""
    with open(directory / "index.tsv", encoding="utf-8") as file:
        index = list(csv.DictReader(file, delimiter="\t"))
    runs = []
    for entry in index:
        records = []
        with open(directory / "csv" / f"{entry['name']}.csv", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                scalars = {"loss": float(row["loss"])}
                if row.get("grad_norm") not in (None, ""):
                    scalars["grad_norm"] = float(row["grad_norm"])
                records.append((int(row["step"]), scalars, None))
        runs.append({"name": entry["name"], "kind": entry["kind"], "records": records})
    return runs


def score_real(runs: list[dict[str, Any]], config: Any = None) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        records = run["records"]
        divergence = next((s for s, sc, _ in records if not math.isfinite(sc["loss"])), None)
        opened = run_detector(records, config)
        # Steps are counted as logged values (some logs print every 10 or 50 steps).
        row = score_run(opened, divergence=divergence, steps=len(records))
        if divergence is not None:
            row["steps"] = sum(1 for s, _, _ in records if s < divergence - MAX_LEAD)
        has_grad = any("grad_norm" in scalars for _, scalars, _ in records)
        rows.append({"name": run["name"], "kind": run["kind"], "grad_norm": has_grad, **row})
    return rows


# ---------------------------------------------------------------------- live lr_backoff reruns
def backoff_runs(traces: list[dict[str, Any]], done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train every diverging held-out setting again with the forecast's `lr_backoff` on (the
    runs in `done`, earlier results, are kept when the forecast's defaults are the same)."""
    import dataclasses

    from forecast_traces import Setting, train  # noqa: PLC0415

    from megatron_gate.monitor.config import ForecastConfig

    defaults = dataclasses.asdict(ForecastConfig())
    rows = [row for row in done if row.get("forecast") == defaults]
    for trace in traces:
        setting = Setting(**trace["setting"])
        if label(trace) is None or setting.split != "heldout":
            continue
        if any(row["name"] == setting.name for row in rows):
            continue
        with tempfile.TemporaryDirectory(prefix="forecast-backoff-") as tmp:
            outcome = train(setting, Path(tmp), forecast_action="lr_backoff")
        rows.append({"name": setting.name, "diverged_without": label(trace),
                     "diverged_with": outcome["divergence_step"],
                     "saved": outcome["divergence_step"] is None,
                     "backoff_steps": outcome["lr_backoff_steps"], "forecast": defaults})  # fmt: skip
        print(f"{setting.name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- tuning (tune split only)
TUNE_GRID: dict[str, tuple] = {
    "loss_rise": (0.05, 0.1, 0.2),
    "confirm": (3, 5),
    "layer_ratio": (2.0, 4.0),
    "min_layer_signals": (2, 3, 4),
    "layer_points": (4, 6),
}


def tune(traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every grid point on the tune split: warned share and false warnings (held-out unseen)."""
    import itertools

    from megatron_gate.monitor.config import ForecastConfig

    tune_set = [t for t in traces if t["setting"]["split"] == "tune"]
    points = []
    for values in itertools.product(*TUNE_GRID.values()):
        changes = dict(zip(TUNE_GRID, values, strict=True))
        summary = summarise(score_traces(tune_set, ForecastConfig(**changes)))
        points.append({**changes, **summary})
    return points


# ---------------------------------------------------------------------- report
def table(summaries: dict[str, dict[str, Any]]) -> str:
    def cell(value: Any, digits: str = ".2f") -> str:
        return "-" if value is None else format(value, digits)

    lines = ["| set | runs | diverging | warned | lead median / p10 (steps) | "
             "false warnings / 10k healthy steps |", "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['runs']} | {s['diverging']} | {s['warned']} "
            f"({cell(s['warned_share'], '.0%')}) | {cell(s['lead_median'], '.0f')} / "
            f"{cell(s['lead_p10'], '.0f')} | {cell(s['false_per_10k'])} "
            f"({s['false_warnings']} in {s['healthy_steps']}{_near(s)}) |"
        )
    return "\n".join(lines)


def _near(summary: dict[str, Any]) -> str:
    near = summary.get("false_before_near_divergence")
    return f"; {near} before a near-divergence" if near else ""


def run_table(rows: list[dict[str, Any]]) -> str:
    """One line per demo run: its setting, divergence step, forecast step, lead."""
    lines = ["| run | split | diverged at | forecast at (lead) | false warnings at "
             "(peak loss after / best) | evidence of the first forecast |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        diverged = r.get("divergence_step")
        lead = f"{diverged - r['lead']} ({r['lead']})" if r.get("lead") is not None else "-"
        false = ", ".join(f"{s} ({p}x)" for s, p in zip(r["false_steps"], r["peak_after_false"],
                                                        strict=True))  # fmt: skip
        lines.append(f"| {r['name'].split('_', 1)[1]} | {r['split']} | {diverged or '-'} | "
                     f"{lead} | {false or '-'} | {', '.join(r['signals']) or '-'} |")  # fmt: skip
    return "\n".join(lines)


PREVIOUS_DEFAULTS = {"min_layer_signals": 2}
"""The constants before the enlarged benchmark (for the before/after rows)."""


def evaluate(*, with_tuning: bool) -> dict[str, Any]:
    from megatron_gate.monitor.config import ForecastConfig

    traces = load_traces()
    rows = score_traces(traces)
    loss_grad = score_traces(traces, with_layers=False)
    summaries = {}
    for split in ("heldout", "tune"):
        summaries[f"{split} (all signals)"] = summarise([r for r in rows if r["split"] == split])
        summaries[f"{split} (loss + grad norm only)"] = summarise(
            [r for r in loss_grad if r["split"] == split])  # fmt: skip
    previous = score_traces(traces, ForecastConfig(**PREVIOUS_DEFAULTS))
    for split in ("heldout", "tune"):
        summaries[f"{split} (all signals), previous defaults"] = summarise(
            [r for r in previous if r["split"] == split])  # fmt: skip
    result: dict[str, Any] = {"summaries": summaries, "runs": rows, "by_schedule": {
                                  split: by_schedule([r for r in rows if r["split"] == split])
                                  for split in ("heldout", "tune")},
                              "runs_loss_grad_only": loss_grad,
                              "monitor_reference": monitor_reference(traces)}  # fmt: skip
    result["spike_traces_healthy"] = spike_trace_healthy()
    summaries["spike_traces healthy (loss + grad norm)"] = summarise(result["spike_traces_healthy"])
    directory = real_trace_dir()
    if directory is not None:
        real = score_real(read_real(directory))
        result["real_traces_dir"] = str(directory).replace(str(HERE.parent) + "/", "")
        result["real"] = real
        summaries["real logs: nan (loss only)"] = summarise([r for r in real if r["kind"] == "nan"])
        healthy = [r for r in real if r["kind"] != "nan"]
        summaries["real logs: clean + micro, with grad norm"] = summarise(
            [r for r in healthy if r["grad_norm"]])  # fmt: skip
        summaries["real logs: clean + micro, loss only"] = summarise(
            [r for r in healthy if not r["grad_norm"]])  # fmt: skip
    if with_tuning:
        result["tuning"] = tune(traces)
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backoff", action="store_true", help="live lr_backoff reruns (slow)")
    parser.add_argument("--tune", action="store_true", help="also score the tuning grid")
    args = parser.parse_args(argv)
    result = evaluate(with_tuning=args.tune)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if args.backoff:
        from forecast_traces import one_process_world  # noqa: PLC0415

        one_process_world()
        result["backoff"] = backoff_runs(load_traces(), previous.get("backoff", []))
    elif "backoff" in previous:
        result["backoff"] = previous["backoff"]
    if "backoff" in result:
        saved = sum(r["saved"] for r in result["backoff"])
        result["backoff_summary"] = {"diverging": len(result["backoff"]), "saved": saved}
    RESULTS.write_text(json.dumps(result, indent=1))
    schedules = {f"{split}: {name}": summary for split, table_ in result["by_schedule"].items()
                 for name, summary in table_.items()}  # fmt: skip
    markdown = (f"{table(result['summaries'])}\n\nPer LR schedule (all signals):\n\n"
                f"{table(schedules)}\n\n{run_table(result['runs'])}\n")  # fmt: skip
    RESULTS.with_suffix(".md").write_text(markdown)
    print(markdown)
    print("monitor's shipped detectors:", result["monitor_reference"])
    if "backoff_summary" in result:
        print("lr_backoff:", result["backoff_summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
