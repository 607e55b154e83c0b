"""Regime search: where do baseline attention sinks, massive activations and spikes appear?

    python bench/regime_search.py search  --out bench/results/evidence      # the search grid
    python bench/regime_search.py search  --final bos --final-seeds 0,1,2   # + 4-variant comparison
    python bench/regime_search.py summary --final bos,bos_2k_lr3e-3        # tables + figures

Every run is the demo's trainer (`megatron_gate.demo.trainer.train_variant`, monitor on) in a
child process under `nice -n 19` with one thread, at most `--jobs` at a time (the machine is
shared). A run's directory holds the monitor JSONL; `run.json` beside it records the point, the
wall and CPU seconds and the estimated FLOPs. Finished runs are skipped, so the search resumes.
Per run the summary reports: first-token attention share per layer (at the end and the peak
over the run), peak max|h| per layer, the max attention logit, the monitor's detector events,
the final validation loss and the compute. The final comparison adds bootstrap confidence
intervals over seeds (docs/evidence.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regime_points import BASE, DATA_KEYS, SEARCH, VARIANT_ORDER
from regime_report import write_finals, write_summary, write_sweep_summary


# ---------------------------------------------------------------------- one run (child process)
def run_one(point: dict[str, Any], variant: str, seed: int, run_dir: Path) -> None:
    """Train one variant of one point here, then write `run.json` (last, so it marks done)."""
    import torch

    torch.set_num_threads(1)
    from megatron_gate.demo.data import DataSource
    from megatron_gate.demo.trainer import VARIANTS, RunPlan, TrainConfig, execute

    fields = {k: v for k, v in {**BASE, **point}.items() if k not in DATA_KEYS}
    config = TrainConfig(**fields, seed=seed)
    data = DataSource(bos=bool(point.get("bos")), doc_split=point.get("doc_split", "file"))
    start = time.time()
    [result] = execute(RunPlan(runs=[(VARIANTS[variant], config, str(run_dir))], data=data,
                               progress="off"))  # fmt: skip
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "point": point, "variant": variant, "seed": seed, "status": result.status,
        "config": dataclasses.asdict(config), "wall_seconds": time.time() - start,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "train_flops": train_flops(config, variant, steps_done=result.steps_done),
    }  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(record, indent=1))


def train_flops(config: Any, variant: str, *, steps_done: int) -> float:
    """Estimated training FLOPs: 6 x parameters x tokens plus the attention-score matmuls
    (6 x layers x seq x hidden per token, fwd + bwd); the gate's few rows are included."""
    hidden, layers = config.hidden, config.layers
    gate_rows = {"gated_headwise": config.heads, "gated_elementwise": hidden}.get(variant, 0)
    per_layer = 4 * hidden * hidden + gate_rows * hidden + 2 * hidden * 4 * hidden
    params = layers * per_layer + 384 * hidden
    tokens = steps_done * config.batch_size * config.seq_len
    return 6.0 * params * tokens + 6.0 * layers * config.seq_len * hidden * tokens


# ---------------------------------------------------------------------- scheduling
def run_dir_of(out: Path, name: str, variant: str, seed: int) -> Path:
    return out / "runs" / name / f"{variant}_seed{seed}"


def schedule(out: Path, jobs: list[tuple[str, dict, str, int]], *, parallel: int) -> None:
    """Run every not-yet-finished job as a niced one-thread child, `parallel` at a time."""
    todo = [j for j in jobs if not (run_dir_of(out, j[0], j[2], j[3]) / "run.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TORCHDYNAMO_DISABLE": "1"}  # fmt: skip
    running: list[tuple[subprocess.Popen, str]] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the children too
    try:
        while todo or running:
            while todo and len(running) < parallel:
                name, point, variant, seed = todo.pop(0)
                run_dir = run_dir_of(out, name, variant, seed)
                if run_dir.exists():  # a killed earlier attempt: start it again from scratch
                    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
                run_dir.mkdir(parents=True)
                command = ["nice", "-n", "19", sys.executable, __file__, "one",
                           "--point", json.dumps(point), "--variant", variant,
                           "--seed", str(seed), "--run-dir", str(run_dir)]  # fmt: skip
                log = open(run_dir / "child.log", "w")  # noqa: SIM115 - closed with the child
                running.append((subprocess.Popen(command, env=env, stdout=log, stderr=log),
                                f"{name}/{variant}_seed{seed}"))  # fmt: skip
                print(f"{time.strftime('%H:%M:%S')} start {running[-1][1]}", flush=True)
            time.sleep(2)
            for process, label in list(running):
                if process.poll() is not None:
                    running.remove((process, label))
                    print(f"{time.strftime('%H:%M:%S')} done  {label} rc {process.returncode}",
                          flush=True)  # fmt: skip
    finally:
        for process, _label in running:  # children never outlive the search
            process.terminate()
            process.wait()


# ---------------------------------------------------------------------- reading results
def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def per_layer_peak(grid: list[list[float]]) -> list[float]:
    """Max over logged steps of each layer's value (NaN where a layer never had one)."""
    if not grid:
        return []
    columns = zip(*grid, strict=True)
    return [max(_finite(col), default=math.nan) for col in columns]


def read_run(run_dir: Path, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run's row: the point, the per-layer sink and activation numbers, events, loss, cost
    (`record`: what `run.json` would say, for runs that have none, e.g. a sweep's)."""
    from megatron_gate.demo.report import load_run

    record = record or json.loads((run_dir / "run.json").read_text())
    run = load_run(run_dir)
    record.setdefault("status", run.status)
    share = run.layers.get("first_token_attention_share", [])
    events: dict[str, int] = {}
    for event in run.events:
        events[event["detector"]] = events.get(event["detector"], 0) + 1
    losses = _finite(run.scalars.get("loss", []))
    return {
        **record,
        "first_token_share_final": run.final_layers("first_token_attention_share"),
        "first_token_share_peak": per_layer_peak(share),
        # (step, largest share of any layer) at every logged step: does a sink grow with training?
        "first_token_share_trajectory": [
            [step, max(_finite(row), default=math.nan)]
            for step, row in zip(run.layer_steps, share, strict=True)
        ],
        "max_abs_residual_peak": per_layer_peak(run.layers.get("max_abs_residual", [])),
        "max_attention_logit": max(
            _finite([v for row in run.layers.get("max_attention_logit", []) for v in row]),
            default=math.nan,
        ),
        "events": events,
        "final_validation_loss": run.final_validation_loss()
        if run.status == "completed"
        else math.nan,
        "max_loss_jump": max_loss_jump(losses),
    }


def max_loss_jump(losses: list[float], window: int = 20) -> float:
    """Largest rise of the loss above the running minimum of the previous `window` steps after
    the first 10% of training: a spike measure independent of the monitor's thresholds."""
    start = max(window, len(losses) // 10)
    jumps = [losses[i] - min(losses[i - window : i]) for i in range(start, len(losses))]
    return max(jumps, default=math.nan)


def read_all(out: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted((out / "runs").glob("*/*/run.json")):
        row = read_run(path.parent)
        row["name"] = path.parent.parent.name
        rows.append(row)
    return rows


def read_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """The rows of a `megatron-gate sweep --out` folder's runs, one point `sweep_lr<lr>` per LR."""
    rows = []
    for path in sorted((sweep_dir / "runs").glob("*/lr*_seed*/stability.jsonl")):
        lr, seed = path.parent.name.removeprefix("lr").split("_seed")
        record = {"point": {"lr": float(lr)}, "variant": path.parent.parent.name,
                  "seed": int(seed)}  # fmt: skip
        rows.append({**read_run(path.parent, record), "name": f"sweep_lr{lr}"})
    return rows


# ---------------------------------------------------------------------- command line
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("one", help="(internal) one run in this process")
    one.add_argument("--point", required=True)
    one.add_argument("--variant", required=True)
    one.add_argument("--seed", type=int, required=True)
    one.add_argument("--run-dir", type=Path, required=True)
    for name in ("search",):
        command = sub.add_parser(name)
        command.add_argument("--out", type=Path, default=Path("bench/results/evidence"))
        command.add_argument("--jobs", type=int, default=2)
        command.add_argument("--points", default=",".join(SEARCH))
        command.add_argument("--variants", default="baseline")
        command.add_argument("--seeds", default="0")
        command.add_argument("--final", default=None, help="point of the 4-variant comparison")
        command.add_argument("--final-seeds", default="0,1,2")
        command.add_argument("--final-variants", default=",".join(VARIANT_ORDER))
    summary = sub.add_parser("summary")
    summary.add_argument("--out", type=Path, default=Path("bench/results/evidence"))
    summary.add_argument("--final", default="", help="points of final comparisons (a,b,...)")
    summary.add_argument("--sweep", type=Path, default=None,
                         help="a `megatron-gate sweep --out` folder: its tables with CIs")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.command == "one":
        run_one(json.loads(args.point), args.variant, args.seed, args.run_dir)
        return 0
    if args.command == "summary":
        finals = [name for name in args.final.split(",") if name]
        write_summary(args.out, read_all(args.out), finals=finals)
        if args.sweep:
            write_sweep_summary(args.sweep)
            rows = read_sweep(args.sweep)
            write_finals(args.sweep, rows, sorted({r["name"] for r in rows}))
        return 0
    names = [n for n in args.points.split(",") if n]  # "" runs only the final comparison
    unknown = [n for n in names if n not in SEARCH]
    if unknown:
        print(f"regime_search: error: unknown points {unknown} (--points)", file=sys.stderr)
        return 2
    jobs = [
        (name, SEARCH[name], variant, int(seed))
        for seed in args.seeds.split(",")
        for name in names
        for variant in args.variants.split(",")
    ]
    if args.final:
        final = [
            (args.final, SEARCH[args.final], variant, int(seed))
            for seed in args.final_seeds.split(",")
            for variant in args.final_variants.split(",")
        ]
        jobs = interleave(jobs, final, group=len(args.final_variants.split(",")))
    schedule(args.out, jobs, parallel=args.jobs)
    return 0


def interleave(
    search: list[tuple], final: list[tuple], *, group: int, chunk: int = 1
) -> list[tuple]:
    """One seed's final comparison (`group` variants) alternating with `chunk` search points, so
    that a search cut short by the time budget still holds complete seeds of the comparison."""
    ordered: list[tuple] = []
    groups = [final[i : i + group] for i in range(0, len(final), group)]
    pairs = [search[i : i + chunk] for i in range(0, len(search), chunk)]
    for index in range(max(len(groups), len(pairs))):
        for part in (groups, pairs):
            ordered += part[index] if index < len(part) else []
    unique = {(name, variant, seed): job for name, _point, variant, seed in ordered
              for job in [(name, _point, variant, seed)]}  # fmt: skip
    return list(unique.values())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
