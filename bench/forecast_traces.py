"""Labelled traces for bench/divergence_forecast.py: the demo's tiny Megatron-Core GPT, monitored,
at learning rates around its edge of stability.

    nice -n 10 .venv/bin/python bench/forecast_traces.py [--only NAME] [--force]

Each run is the demo's `DemoRun` (AdamW, the embedded byte-level corpus, the stability monitor
with its defaults: guard on, per-layer statistics every `LAYER_INTERVAL` steps) with a learning-rate
schedule of the plan: cosine with 5% warm-up, warm-up of one step, a geometric ramp, an LR jump
mid-run, or weight decay off. Every step's scalars and every per-layer step's statistics are
read back from the monitor's JSONL into one small JSON file per run
(`bench/results/forecast_traces/<name>.json`), so the detector is re-evaluated without training.

The divergence step is fixed in advance (`divergence_step`): the first non-finite loss, or the
first step of 20 in a row whose loss is above 2x the best loss so far. A run stops
`STOP_AFTER` steps after that is known.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRACES = Path(__file__).resolve().parent / "results" / "forecast_traces"
SEQ_LEN, BATCH = 32, 4  # small: the traces are generated on a shared 2-core CPU
LAYER_INTERVAL = 10
DIVERGED_RATIO, DIVERGED_STEPS, SMOOTH = 2.0, 20, 10
STOP_AFTER = 30
RAMP_RANGE = 100.0
"""A ramp goes geometrically from lr / RAMP_RANGE to lr over the run."""
LAYER_KEEP = (
    "max_abs_residual", "rms_residual", "max_abs_attention_output", "max_abs_mlp_output",
    "max_attention_logit", "grad_norm", "update_norm",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One traced run: model size, variant, schedule, peak learning rate, seed, split."""

    layers: int
    hidden: int
    lr: float
    schedule: str = "cosine"
    """cosine | short_warmup | ramp (geometric, lr/RAMP_RANGE -> lr over the run) | jump
    (x`jump` from 40% of the run on) | wd0 (cosine, weight decay off) | constant (5% warm-up,
    then `lr` to the end: no decay relieves a run near its edge)."""
    variant: str = "baseline"
    seed: int = 0
    steps: int = 160
    jump: float = 4.0
    split: str = "tune"
    """tune (used to choose the detector's constants) or heldout (reported)."""

    @property
    def name(self) -> str:
        return (f"{self.split}_l{self.layers}h{self.hidden}_{self.variant}_{self.schedule}"
                f"_lr{self.lr:g}_s{self.seed}")  # fmt: skip


def divergence_step(steps: list[int], losses: list[float | None]) -> int | None:
    """First non-finite loss, or first step of `DIVERGED_STEPS` in a row whose loss is above
    2x the best so far. The best is the minimum of the mean of the last `SMOOTH` losses: one
    lucky batch (the per-step loss of 4 x 32 tokens varies by +-20%) is not the model's best."""
    best, run = math.inf, 0
    recent: list[float] = []
    for index, (step, loss) in enumerate(zip(steps, losses, strict=True)):
        if loss is None or not math.isfinite(loss):
            return step
        run = run + 1 if loss > DIVERGED_RATIO * best else 0
        if run == DIVERGED_STEPS:
            return steps[index - DIVERGED_STEPS + 1]
        recent = [*recent[-SMOOTH + 1 :], loss]
        if len(recent) == SMOOTH:
            best = min(best, sum(recent) / SMOOTH)
    return None


def _schedule_config(setting: Setting) -> Any:
    """A demo `TrainConfig` whose `learning_rate` follows the setting's schedule."""
    from megatron_gate.demo.trainer import TrainConfig

    @dataclass(frozen=True, kw_only=True)
    class ScheduledConfig(TrainConfig):
        schedule: str = "cosine"
        jump: float = 4.0

        def learning_rate(self, step: int) -> float:
            if self.schedule == "ramp":
                return self.lr * RAMP_RANGE ** (step / self.steps - 1.0)
            if self.schedule == "constant":
                return self.lr * min(1.0, step / self.warmup)
            base = super().learning_rate(step)
            return base * self.jump if self.schedule == "jump" and step > 0.4 * self.steps else base

    return ScheduledConfig(
        layers=setting.layers, hidden=setting.hidden, heads=4, lr=setting.lr, steps=setting.steps,
        seq_len=SEQ_LEN, batch_size=BATCH, seed=setting.seed, log_interval=LAYER_INTERVAL,
        eval_interval=10**9, write_checkpoints=False, schedule=setting.schedule, jump=setting.jump,
        warmup_steps=1 if setting.schedule == "short_warmup" else None,
        weight_decay=0.0 if setting.schedule == "wd0" else 0.1,
    )  # fmt: skip


def monitor_config(*, forecast_action: str | None = None) -> Any:
    """The demo's monitor (defaults), no TensorBoard; optionally the forecast's action."""
    from megatron_gate.demo.trainer import demo_monitor_config

    overrides = ["sinks.tensorboard=false"]
    if forecast_action is not None:
        overrides.append(f"detectors.divergence_forecast.action={forecast_action}")
    return demo_monitor_config(layer_interval=LAYER_INTERVAL, overrides=overrides)


def train(setting: Setting, run_dir: Path, *, forecast_action: str | None = None,
          stop_early: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train one setting with the monitor; returns what happened (steps, status)."""
    from megatron_gate.demo.data import load_corpus
    from megatron_gate.demo.trainer import VARIANTS, DemoRun, RunResult

    config = _schedule_config(setting)
    run = DemoRun(config, VARIANTS[setting.variant], load_corpus(None), run_dir=run_dir,
                  monitor_config=monitor_config(forecast_action=forecast_action), rank=0)  # fmt: skip
    result = RunResult(name=setting.name, run_dir=str(run_dir), status="failed", steps_done=0)
    steps: list[int] = []
    losses: list[float | None] = []
    status = "completed"
    for step in range(1, setting.steps + 1):
        loss = run.train_step(step, result)["loss"]
        steps.append(step)
        losses.append(loss if math.isfinite(loss) else None)
        diverged = divergence_step(steps, losses)
        if stop_early and diverged is not None and step >= diverged + STOP_AFTER:
            status = "stopped_after_divergence"
            break
    run.monitor.close(status)
    return {"status": status, "steps_done": steps[-1], "divergence_step":
            divergence_step(steps, losses), "lr_backoff_steps": _backoff_steps(run_dir)}  # fmt: skip


def _backoff_steps(run_dir: Path) -> list[int]:
    return [record["step"] for record in _records(run_dir)
            if record.get("kind") == "event" and record.get("action") == "lr_backoff"
            and record["episode"]["phase"] == "open"]  # fmt: skip


def _records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "stability.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def compact(run_dir: Path) -> dict[str, Any]:
    """The monitor's JSONL as columns: per-step scalars, per-layer-step statistics, events."""
    scalars: dict[str, list[float | None]] = {
        name: [] for name in ("loss", "grad_norm", "update_norm", "learning_rate", "nan_or_inf")
    }
    steps, layer_steps, events = [], [], []
    layers: dict[str, list[list[float | None]]] = {name: [] for name in LAYER_KEEP}
    for record in _records(run_dir):
        if record.get("kind") == "step":
            steps.append(record["step"])
            for name, column in scalars.items():
                column.append(record["scalars"].get(name))
            if "layers" in record:
                layer_steps.append(record["step"])
                for name, column in layers.items():
                    column.append(record["layers"][name])
        elif record.get("kind") == "event" and record["episode"]["phase"] == "open":
            events.append([record["step"], record["detector"], record["episode"]["kind"]])
    return {"steps": steps, "scalars": scalars, "layer_steps": layer_steps, "layers": layers,
            "monitor_events": events}  # fmt: skip


def trace(setting: Setting) -> dict[str, Any]:
    """Train `setting` and return its trace with the label."""
    with tempfile.TemporaryDirectory(prefix="forecast-") as tmp:
        outcome = train(setting, Path(tmp))
        data = compact(Path(tmp))
    return {"setting": dataclasses.asdict(setting), **outcome, **data}


def plan() -> list[Setting]:
    """The traced runs, tune and held-out interleaved (an interrupted generation keeps both).

    Tune: 2 layers x hidden 32. Held out: 3 x 48, 2 x 64, 2 x 48, 2 x 96 and 4 x 32, other
    seeds. The edge of stability of 2 x 32 (a geometric LR ramp diverged at lr ~0.7) placed the
    learning rates. 160-300 steps each: a step costs 0.05-0.5 CPU s on the shared machine.
    """
    tune, held = "tune", "heldout"
    return [
        Setting(layers=2, hidden=32, lr=3.0, schedule="ramp", split=tune, steps=300),
        Setting(layers=3, hidden=48, lr=2.0, schedule="ramp", split=held),
        Setting(layers=2, hidden=32, lr=0.2, schedule="jump", split=tune),
        Setting(layers=2, hidden=64, lr=0.15, schedule="jump", jump=5.0,
                variant="gated_headwise", split=held, seed=1),
        Setting(layers=2, hidden=64, lr=0.25, variant="gated_headwise", split=held, seed=2),
        # the gated runs above did not diverge: baseline settings past the edge next
        Setting(layers=2, hidden=64, lr=0.4, schedule="short_warmup", split=held, seed=5),
        Setting(layers=3, hidden=48, lr=0.8, split=held, seed=8),
        Setting(layers=2, hidden=64, lr=0.2, schedule="jump", jump=5.0, split=held, seed=9),
        Setting(layers=3, hidden=48, lr=0.6, schedule="wd0", split=held, seed=4),
        Setting(layers=2, hidden=32, lr=0.3, variant="gated_headwise", split=tune, seed=3),
        Setting(layers=3, hidden=48, lr=0.15, schedule="jump", jump=5.0, split=held, seed=10),
        Setting(layers=2, hidden=64, lr=2.0, schedule="ramp", split=held, seed=11),
        Setting(layers=2, hidden=32, lr=3.0, schedule="ramp", variant="gated_headwise",
                split=tune, seed=1),
        Setting(layers=3, hidden=48, lr=0.2, variant="gated_headwise", split=held, seed=6),
        *second_plan(),
        *grid_plan(),
    ]  # fmt: skip


def second_plan() -> list[Setting]:
    """Added later, tune and held-out interleaved: more seeds, schedules (constant LR) and held-out
    sizes (2 x 48, 2 x 96, 4 x 32), diverging and just below the edge (healthy runs at LRs near
    the edge are where false warnings come from). Tune stays 2 x 32 only."""
    tune, held = "tune", "heldout"
    return [
        Setting(layers=2, hidden=48, lr=2.0, schedule="ramp", split=held, seed=21),
        Setting(layers=2, hidden=32, lr=2.0, schedule="ramp", split=tune, seed=40),
        Setting(layers=2, hidden=48, lr=0.5, split=held, seed=28),
        Setting(layers=2, hidden=96, lr=1.5, schedule="ramp", split=held, seed=22),
        Setting(layers=2, hidden=32, lr=0.25, schedule="jump", jump=5.0, split=tune, seed=41),
        Setting(layers=2, hidden=48, lr=0.25, schedule="jump", jump=5.0, split=held, seed=24),
        Setting(layers=2, hidden=64, lr=0.6, schedule="ramp", split=held, seed=31),
        Setting(layers=2, hidden=32, lr=0.5, schedule="constant", split=tune, seed=43),
        Setting(layers=2, hidden=96, lr=0.4, schedule="constant", split=held, seed=29),
        Setting(layers=4, hidden=32, lr=2.0, schedule="ramp", split=held, seed=23),
        Setting(layers=2, hidden=32, lr=0.6, schedule="ramp", split=tune, seed=44),
        Setting(layers=2, hidden=48, lr=0.15, schedule="jump", jump=3.0, split=held, seed=30),
        Setting(layers=2, hidden=64, lr=1.0, schedule="short_warmup", split=held, seed=25),
        Setting(layers=2, hidden=32, lr=1.0, schedule="constant", split=tune, seed=45),
        Setting(layers=2, hidden=48, lr=1.0, schedule="constant", split=held, seed=26),
        Setting(layers=2, hidden=48, lr=2.0, schedule="ramp", variant="gated_headwise",
                split=held, seed=32),
        Setting(layers=2, hidden=96, lr=0.2, schedule="jump", jump=6.0, split=held, seed=27),
        Setting(layers=2, hidden=48, lr=0.5, schedule="wd0", split=held, seed=33),
    ]  # fmt: skip


GRID_SCHEDULES: tuple[dict[str, Any], ...] = (
    {"schedule": "ramp", "lr": 1.0, "steps": 200}, {"schedule": "ramp", "lr": 2.0, "steps": 200},
    {"schedule": "jump", "lr": 0.2, "jump": 4.0, "steps": 200},
    {"schedule": "constant", "lr": 0.5}, {"schedule": "constant", "lr": 1.0},
    {"schedule": "cosine", "lr": 0.8}, {"schedule": "short_warmup", "lr": 0.8},
)  # fmt: skip
"""The grid's settings, from below to past the edge: every one on every size of both splits
(weight decay off is left to the plans above: the grid's generation budget, ~25 CPU minutes on
the shared machine, ran out there)."""
GRID_SIZES = {"tune": ((2, 32), (2, 32)), "heldout": ((2, 48), (2, 96), (4, 32))}
"""Tune: 2 x 32 twice (two seeds); held out: other sizes."""


def grid_plan() -> list[Setting]:
    """Every `GRID_SCHEDULES` setting on every `GRID_SIZES` size, 300 steps unless given (more
    healthy steps near the edge for the false-warning rate); baseline and headwise-gated
    alternate, so each setting gets both variants across sizes. Seeds 100 on, one per run."""
    runs = []
    for index, changes in enumerate(GRID_SCHEDULES):
        for split, sizes in GRID_SIZES.items():
            for offset, (layers, hidden) in enumerate(sizes):
                variant = ("baseline", "gated_headwise")[(index + offset) % 2]
                runs.append(Setting(layers=layers, hidden=hidden, variant=variant, split=split,
                                    seed=100 + len(runs), **{"steps": 300, **changes}))  # fmt: skip
    return runs


def one_process_world() -> None:
    """This process as a one-rank gloo world on the CPU, one thread (the machine is shared)."""
    import torch

    from megatron_gate.cpu import enable_cpu_runtime
    from megatron_gate.distributed import free_port, init_process_group

    torch.set_num_threads(1)
    enable_cpu_runtime()
    init_process_group(0, 1, free_port())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="trace only runs whose name contains this")
    parser.add_argument("--force", action="store_true", help="regenerate existing traces")
    args = parser.parse_args()
    one_process_world()
    TRACES.mkdir(parents=True, exist_ok=True)
    for setting in plan():
        path = TRACES / f"{setting.name}.json"
        if (args.only and args.only not in setting.name) or (path.exists() and not args.force):
            continue
        start = time.process_time()
        data = trace(setting)
        data["cpu_seconds"] = round(time.process_time() - start, 1)
        path.write_text(json.dumps(data, separators=(",", ":")))
        print(f"{setting.name}: {data['steps_done']} steps, diverged at "
              f"{data['divergence_step']}, {data['cpu_seconds']} CPU s", file=sys.stderr,
              flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
