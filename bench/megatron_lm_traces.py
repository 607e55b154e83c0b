"""Traces of Megatron-LM's own training loop for bench/spike_detection.py: healthy and faulty runs.

    nice -n 10 .venv/bin/python bench/megatron_lm_traces.py [--only NAME] [--force]
        # writes bench/results/traces_megatron_lm/NAME.json (and layers/NAME.json)

Each run is `python -m megatron_gate.run bench/megatron_lm_fault_script.py <flags>`: the 0.19.2
wheel's `megatron.training.pretrain` on the CPU (gloo, one process), a 4-layer GPT on the demo's
byte-level text, AdamW with warm-up + cosine decay and gradient clipping at 1.0. The per-step
values come from the stability monitor's own JSONL (`log_interval: 1`): the loss, the global grad
norm Megatron computes (before clipping), the learning rate the optimizer ran with. The monitor
only watches: its guard skips non-finite steps only (as Megatron's own NaN check would, without
stopping the run) and every detector's action is `log`, so the trace shows what a fault does to an
unguarded run. The update norm of step n is measured in the optimizer step of n and written
with step n + 1's record (`layer_interval: 1`); a skipped step's update is 0.

Output: the format of bench/results/traces/*.json (bench/spike_traces.py): `run`, `first_step`,
`scalars` {loss, grad_norm, update_norm, learning_rate, nan_or_inf} (null where not finite),
`labels` [{step, kind, end}], `benign`, `cpu_seconds`. Existing traces are kept unless --force.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "megatron_lm_fault_script.py"
TRACES = ROOT / "bench" / "results" / "traces_megatron_lm"
LAYERS = TRACES / "layers"
SCALARS = ("loss", "grad_norm", "update_norm", "learning_rate", "nan_or_inf")
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--no-rope-fusion",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
]  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TraceRun:
    """One traced Megatron-LM run: model, batch, schedule, seed and the fault (None: healthy)."""

    name: str
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    seq_len: int = 64
    global_batch: int = 16
    micro_batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    steps: int = 320
    seed: int = 0
    fault: str | None = None
    fault_step: int = 0
    fault_length: int = 1
    fault_factor: float = 1.0
    layer_interval: int = 1

    def __post_init__(self) -> None:
        if self.fault_length != 1 and self.fault != "lr_jump":
            raise ValueError(f"{self.name}: only an lr_jump lasts more than one step")


def plan() -> list[TraceRun]:
    """Each fault once (lr 1e-3, after warm-up, 100+ steps to recover), healthy runs at
    three learning rates, then 4-layer runs (two healthy, the scaled weight again), in the order
    they were recorded.

    Sized for the shared 2-core build machine under load (6 engineers; this job got ~16% of a
    core at times): 1,024 tokens a step (8x the demo's), 2 layers of hidden 128 (4 for the first
    and the last runs), about 0.2-0.5 CPU s a step with per-layer statistics every step.
    """
    faults = [
        TraceRun(name="mlm_nan_batch", fault="nan_batch", layers=4, steps=400, fault_step=250,
                 seed=11),
        TraceRun(name="mlm_corrupted_batch", fault="corrupted_batch", fault_step=200, seed=12),
        TraceRun(name="mlm_lr_jump", fault="lr_jump", fault_step=205, fault_length=10,
                 fault_factor=15.0, seed=13),
        TraceRun(name="mlm_scaled_weight", fault="scaled_weight", fault_step=210,
                 fault_factor=8.0, seed=14),
        TraceRun(name="mlm_bitflip_weight", fault="bitflip_weight", fault_step=215, seed=15),
    ]  # fmt: skip
    healthy = [
        TraceRun(name=f"mlm_healthy_lr{label}", lr=lr, seed=seed)
        for seed, (label, lr) in enumerate((("3e-3", 3e-3), ("3e-4", 3e-4), ("1e-3", 1e-3)))
    ]
    longer = [  # recorded last, as the machine had time left: the 4-layer model
        TraceRun(name="mlm_l4_healthy_lr3e-3", layers=4, lr=3e-3, steps=600, seed=21),
        TraceRun(name="mlm_l4_healthy_lr1e-3", layers=4, lr=1e-3, steps=500, seed=22),
        TraceRun(name="mlm_l4_scaled_weight", layers=4, steps=400, fault="scaled_weight",
                 fault_step=250, fault_factor=8.0, seed=23),
    ]  # fmt: skip
    return [*faults, *healthy, *longer]


def megatron_flags(run: TraceRun) -> list[str]:
    """Megatron-LM's flags for `run` (and the fault script's own `--trace-*` flags)."""
    flags = [
        "--num-layers", run.layers, "--hidden-size", run.hidden,
        "--num-attention-heads", run.heads, "--seq-length", run.seq_len,
        "--max-position-embeddings", run.seq_len, "--position-embedding-type", "rope",
        "--micro-batch-size", run.micro_batch, "--global-batch-size", run.global_batch,
        "--train-iters", run.steps, "--lr", run.lr, "--min-lr", run.lr / 10,
        "--lr-decay-style", "cosine", "--lr-warmup-iters", run.warmup,
        "--lr-decay-iters", run.steps, "--clip-grad", "1.0", "--weight-decay", "0.1",
        "--adam-beta2", "0.95", "--init-method-std", "0.02",
        "--seed", 1000 + run.seed,  # Megatron wants a positive seed
        "--attention-dropout", "0", "--hidden-dropout", "0",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--num-workers", "0",
        "--eval-iters", "0", "--eval-interval", run.steps + 1, "--log-interval", "50",
        "--trace-corpus-seed", run.seed,
    ]  # fmt: skip
    if run.fault is not None:
        flags += ["--trace-fault", run.fault, "--trace-fault-step", run.fault_step,
                  "--trace-fault-length", run.fault_length,
                  "--trace-fault-factor", run.fault_factor]  # fmt: skip
    return [*map(str, flags), *CPU_FLAGS]


def _environment() -> dict[str, str]:
    from megatron_gate.distributed import free_port

    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }  # fmt: skip


def monitor_config(*, layer_interval: int) -> dict[str, Any]:
    """Watch only: every step read, per-layer statistics every step, no action but the NaN skip.

    Written out in full: a detector given in part in a monitor YAML gets `DetectorConfig`'s class
    defaults for the keys it leaves out, not that detector's own defaults.
    """
    from megatron_gate.monitor.config import MonitorConfig

    config = MonitorConfig().to_dict()
    config.update(log_interval=1, layer_interval=layer_interval)
    config["guard"].update(skip_loss_spikes=False, skip_grad_norm_spikes=False)
    for detector in config["detectors"].values():
        detector.update(action="log", confirmed_action=None)
    config["sinks"].update(tensorboard=False, console=False)
    return config


def run_megatron(run: TraceRun, workdir: Path, *, timeout: float) -> list[dict[str, Any]]:
    """Train `run` through `megatron_gate.run` in a child process; its monitor records."""
    from megatron_gate.monitor.sinks import read_records
    from megatron_gate.worker_lifetime import children_die_with_me

    config = monitor_config(layer_interval=run.layer_interval)
    (workdir / "monitor.yaml").write_text(json.dumps(config))  # JSON is YAML
    command = [sys.executable, "-m", "megatron_gate.run", str(SCRIPT), *megatron_flags(run),
               "--stability-config", str(workdir / "monitor.yaml"),
               "--stability-dir", str(workdir / "stability")]  # fmt: skip
    with children_die_with_me(), open(workdir / "megatron.log", "w") as log:
        result = subprocess.run(command, env=_environment(), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, timeout=timeout, check=False)  # fmt: skip
    if result.returncode != 0:
        tail = (workdir / "megatron.log").read_text()[-3000:]
        raise RuntimeError(f"{run.name}: exit code {result.returncode}\n{tail}")
    return read_records(workdir / "stability")


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def scalars_from_records(records: list[dict[str, Any]], steps: int) -> dict[str, list]:
    """Per-step scalars 1..`steps` from the monitor's `step` records (see the module docstring)."""
    rows = {r["step"]: r["scalars"] for r in records if r.get("kind") == "step"}
    missing = [step for step in range(1, steps + 1) if step not in rows]
    if missing:
        raise RuntimeError(f"the monitor wrote no record for steps {missing[:5]}...")
    skipped = {r["step"] for r in records if r.get("kind") == "event" and r["detector"] == "guard"
               and r.get("action") == "skip_step"}  # fmt: skip
    out: dict[str, list] = {name: [] for name in SCALARS}
    for step in range(1, steps + 1):
        row = rows[step]
        for name in ("loss", "grad_norm", "learning_rate"):
            out[name].append(_finite(row.get(name)))
        out["nan_or_inf"].append(1.0 if row.get("nan_or_inf") else 0.0)
        later = rows.get(step + 1, {}).get("update_norm")  # step n's update, in record n + 1
        out["update_norm"].append(0.0 if step in skipped else _finite(later))
    return out


def layers_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer statistics of every step that has them: {metric: [[per layer] per step]}."""
    rows = [r for r in records if r.get("kind") == "step" and r.get("layers")]
    metrics = sorted({name for r in rows for name in r["layers"]})
    return {"steps": [r["step"] for r in rows],
            "layers": {m: [r["layers"].get(m) for r in rows] for m in metrics}}  # fmt: skip


def labels(run: TraceRun) -> list[dict[str, Any]]:
    """The ground truth: the fault's first and last step (none for a healthy run)."""
    if run.fault is None:
        return []
    end = run.fault_step + run.fault_length - 1
    return [{"step": run.fault_step, "kind": run.fault, "end": end}]


def trace(run: TraceRun, *, timeout: float = 1800) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train `run`; return its trace (the bench/results/traces format) and per-layer data."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix=f"{run.name}-") as folder:
        records = run_megatron(run, Path(folder), timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    scalars = scalars_from_records(records, run.steps)
    data = {"run": asdict(run), "first_step": 1, "scalars": scalars, "labels": labels(run),
            "benign": [], "cpu_seconds": round(cpu, 1)}  # fmt: skip
    return data, layers_from_records(records)


# ---------------------------------------------------------------------- what a fault does
BEFORE = 50  # steps whose median is the level before the fault
AFTER = 20  # steps after the fault's end that still count as its effect


def _median(values: list[float | None]) -> float:
    finite = sorted(v for v in values if v is not None)
    return finite[len(finite) // 2] if finite else math.nan


def _peak(values: list[float | None], start: int, stop: int, *, ratio: bool) -> tuple[float, int]:
    """Largest jump above the median of the `BEFORE` values before each index in [start, stop):
    value - median (ratio False) or value / median; and the 1-based step it is at."""
    best, where = -math.inf, start + 1
    for index in range(max(start, BEFORE), min(stop, len(values))):
        value, level = values[index], _median(values[index - BEFORE : index])
        if value is None or not math.isfinite(level):
            continue
        jump = value / level if ratio else value - level
        if jump > best:
            best, where = jump, index + 1
    return best, where


def _layer_peak(layers: dict[str, Any], start: int, stop: int) -> tuple[str, float]:
    """The per-layer statistic that moves most in steps [start, stop): 'metric@layer', ratio."""
    steps = layers.get("steps", [])
    best, name = 0.0, "-"
    for metric, rows in layers.get("layers", {}).items():
        for layer in range(len(rows[0]) if rows else 0):
            series = [row[layer] if row else None for row in rows]
            series = [v if v is None else abs(v) for v in series]
            inside = [i for i, step in enumerate(steps) if start <= step < stop]
            if not inside:
                continue
            jump, _ = _peak(series, inside[0], inside[-1] + 1, ratio=True)
            if math.isfinite(jump) and jump > best:
                best, name = jump, f"{metric}@{layer + 1}"
    return name, best


def effect(data: dict[str, Any], layers: dict[str, Any]) -> dict[str, Any]:
    """What the fault did (peaks in its window) and the healthy noise floor (peaks elsewhere)."""
    scalars, steps = data["scalars"], data["run"]["steps"]
    label = data["labels"][0] if data["labels"] else None
    start, stop = (label["step"] - 1, label["end"] + AFTER) if label else (steps, steps)
    settled = max(BEFORE, 2 * data["run"].get("warmup", 50))  # past warm-up's transients
    row: dict[str, Any] = {"run": data["run"]["name"], "fault_step": label and label["step"]}
    for name, ratio in (("loss", False), ("grad_norm", True), ("update_norm", True)):
        jump, where = _peak(scalars[name], start, stop, ratio=ratio)
        row[name] = [_rounded(jump), where] if label else None
        before = _peak(scalars[name], settled, start, ratio=ratio)[0]
        after = _peak(scalars[name], stop, steps, ratio=ratio)[0]
        row[f"{name}_elsewhere"] = _rounded(max(before, after))
    row["non_finite_steps"] = int(sum(scalars["nan_or_inf"]))
    row["null_update_norm_steps"] = sum(v is None for v in scalars["update_norm"][:-1])
    if label:
        metric, jump = _layer_peak(layers, start + 1, stop + 1)
        row["layers"] = [metric, _rounded(jump)]
    return row


def _rounded(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def summary(folder: Path) -> list[dict[str, Any]]:
    """`effect` of every trace in `folder` (per-layer data from `folder/layers`)."""
    rows = []
    for path in sorted(folder.glob("*.json")):
        layer_path = folder / "layers" / path.name
        layers = json.loads(layer_path.read_text()) if layer_path.exists() else {}
        rows.append(effect(json.loads(path.read_text()), layers))
    return rows


def _cell(peak: list | None, *, ratio: bool) -> str:
    """'+0.54 @211' (nats) or '3.07x @210'; '-' for a healthy run."""
    if peak is None:
        return "-"
    value, step = peak
    if value is None:
        return f"non-finite @{step}"
    return f"{value:.2f}x @{step}" if ratio else f"{value:+.2f} @{step}"


def summary_table(rows: list[dict[str, Any]]) -> str:
    """`summary` as a Markdown table: the fault's peaks, then the largest elsewhere (noise)."""
    lines = [
        "| run | fault step | loss - median of 50 before (nats) | grad norm / median | "
        "update norm / median | per-layer peak / median | largest elsewhere: loss, grad, "
        "update | non-finite steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        layer = row.get("layers")
        noise = ", ".join(str(row[f"{n}_elsewhere"]) for n in ("loss", "grad_norm", "update_norm"))
        lines.append(
            f"| {row['run']} | {row['fault_step'] or '-'} | {_cell(row['loss'], ratio=False)} | "
            f"{_cell(row['grad_norm'], ratio=True)} | {_cell(row['update_norm'], ratio=True)} | "
            f"{f'{layer[0]} {layer[1]:.3g}x' if layer else '-'} | {noise} | "
            f"{row['non_finite_steps']} |"
        )
    return "\n".join(lines)


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(data, separators=(",", ":")))
    partial.replace(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="trace only the run of this name")
    parser.add_argument("--force", action="store_true", help="regenerate existing traces")
    parser.add_argument("--out", type=Path, default=TRACES, help="folder of the trace files")
    parser.add_argument("--summary", action="store_true",
                        help="print what each recorded fault did, then exit")  # fmt: skip
    args = parser.parse_args()
    if args.summary:
        print(summary_table(summary(args.out)))
        return 0
    names = [run.name for run in plan()]
    if args.only is not None and args.only not in names:
        print(f"megatron-gate bench: error: unknown run {args.only!r} (--only): use one of "
              f"{', '.join(names)}", file=sys.stderr)  # fmt: skip
        return 2
    for run in plan():
        path = args.out / f"{run.name}.json"
        if (args.only and run.name != args.only) or (path.exists() and not args.force):
            continue
        started = time.time()
        data, layers = trace(run, timeout=3600)
        write_atomic(args.out / "layers" / f"{run.name}.json", layers)
        write_atomic(path, data)
        print(f"{run.name}: {run.steps} steps, {time.time() - started:.0f} s wall, "
              f"{data['cpu_seconds']} CPU s", file=sys.stderr, flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
