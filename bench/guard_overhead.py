"""Step-time overhead of the per-step guard on a small Megatron-Core GPT (not a test).

    .venv/bin/python bench/guard_overhead.py          # writes bench/results/guard_overhead.json

For each depth, in one process, blocks of whole cadence periods (default monitor config: 10 log
steps and one per-layer step per 100 steps) are run in ABBA order with the same monitor config
except `guard.enabled`; both arms call `monitor.end_step` and `monitor.step_optimizer` (with the
guard off the latter is a plain `optimizer.step()`, except for the update-norm step). Per pair
the ratio of wall time and of process CPU time; medians over pairs. Also, per step, the median
time of `StepGuard.check` alone and of `bucketed_step(accept=...)` vs `optimizer.step()`.
Quote the ratios, not the absolute times (shared, noisy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_overhead import Trainer  # noqa: E402 - the same model and step as the cost bench


def _monitor(trainer: Trainer, run_dir: str, *, guard: bool) -> Any:
    from megatron_gate.monitor import MonitorConfig, StabilityMonitor

    config = MonitorConfig.from_dict(
        {"sinks": {"console": False, "tensorboard": False}, "guard": {"enabled": guard}}
    )
    return StabilityMonitor(
        config, models=[trainer.model], run_dir=run_dir, optimizer=trainer.optimizer
    )


def _step(trainer: Trainer, monitor: Any) -> None:
    step = trainer.step_index
    monitor.start_step(step)
    loss = trainer.model(trainer.tokens, trainer.positions, trainer.mask, labels=trainer.labels)
    loss = loss.mean()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1e9)
    decision = monitor.end_step(step, loss=loss.detach(), grad_norm=grad_norm, tokens=1)
    monitor.step_optimizer(trainer.optimizer, decision)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step_index += 1


def _block(trainer: Trainer, monitor: Any, steps: int) -> tuple[float, float]:
    trainer.step_index = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        _step(trainer, monitor)
    monitor.sinks.wait()
    return time.perf_counter() - wall, time.process_time() - cpu


def whole_step(layers: int, args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Guard on vs off, whole cadence periods, ABBA."""
    trainer = Trainer(layers, args)
    off = _monitor(trainer, f"{run_dir}/off_{layers}", guard=False)
    on = _monitor(trainer, f"{run_dir}/on_{layers}", guard=True)
    steps = on.config.layer_interval
    _block(trainer, off, 3)
    _block(trainer, on, 3)
    wall, cpu, plain = [], [], []
    for repetition in range(args.repetitions):
        order = (off, on) if repetition % 2 else (on, off)
        times = {id(monitor): _block(trainer, monitor, steps) for monitor in order}
        wall.append(times[id(on)][0] / times[id(off)][0])
        cpu.append(times[id(on)][1] / times[id(off)][1])
        plain.append(times[id(off)][0] / steps)
    off.close()
    on.close()
    return {
        "block_steps": steps,
        "repetitions": args.repetitions,
        "median_wall_time_ratio": statistics.median(wall),
        "median_cpu_time_ratio": statistics.median(cpu),
        "wall_time_ratios": wall,
        "median_step_s_without": statistics.median(plain),
    }


def _median_us(function: Any, repetitions: int) -> float:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def parts(layers: int, args: argparse.Namespace) -> dict[str, Any]:
    """The guard's check alone, and the guarded optimizer step vs the plain one."""
    from megatron_gate.monitor.config import GuardConfig
    from megatron_gate.monitor.guard import StepGuard
    from megatron_gate.monitor.guarded_step import bucketed_step

    guard = StepGuard(GuardConfig(), device=torch.device("cpu"))
    loss, norm = torch.tensor(3.0), torch.tensor(1.0)
    check = _median_us(lambda: guard.check(loss=loss, grad_norm=norm), 200)
    trainer = Trainer(layers, args)
    loss = trainer.model(trainer.tokens, trainer.positions, trainer.mask, labels=trainer.labels)
    loss.mean().backward()  # gradients stay: every call below steps with them
    optimizer, accept = trainer.optimizer, torch.tensor(True)
    optimizer.step()  # lazy state
    plain, guarded = [], []
    for _ in range(args.repetitions * 5):
        plain.append(_median_us(optimizer.step, 3))
        guarded.append(_median_us(lambda: bucketed_step(optimizer, accept=accept), 3))
    return {
        "guard_check_us": check,
        "optimizer_step_us": statistics.median(plain),
        "bucketed_step_us": statistics.median(guarded),
        "bucketed_over_plain": statistics.median(guarded) / statistics.median(plain),
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                        / "guard_overhead.json")  # fmt: skip
    args = parser.parse_args()
    # the model shape of bench/monitor_overhead.py's default run
    args.hidden, args.heads, args.groups, args.seq, args.batch, args.vocab = 64, 4, 2, 128, 2, 256
    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel(tp=1)
    results: dict[str, Any] = {
        "command": "python bench/guard_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "shape": {k: getattr(args, k) for k in ("hidden", "heads", "groups", "seq", "batch")},
        "by_layers": {},
    }
    with tempfile.TemporaryDirectory() as run_dir:
        for layers in args.layers:
            results["by_layers"][str(layers)] = {
                "default_cadence": whole_step(layers, args, run_dir),
                "parts": parts(layers, args),
            }
            print(json.dumps({layers: results["by_layers"][str(layers)]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
