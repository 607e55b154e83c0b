"""What attribution costs on healthy steps: `guard.recompute_rejected` on vs off (not a test).

    .venv/bin/python bench/attribution_overhead.py    # writes bench/results/attribution_overhead.json

Run it on a quiet machine. One process; each arm has its own headwise-gated GPT (hidden 64,
4 heads, seq 128, batch 2), AdamW and batches, built from the same seed; the monitor's default
cadence with the host guard (the CPU default, the path where a recompute is offered). Both arms run the plain loop's step (`monitor/loops.py`):
forward, backward, `end_step`, `step_optimizer`; the "on" arm also keeps the host's random state
and offers the recompute (`end_step(recompute=True)`: a reference snapshot of the guard's
state). No step is rejected (asserted), so nothing is ever recomputed. Blocks of whole cadence
periods alternate ABBA; per pair the ratio of wall and process CPU time, medians over pairs.
Also the per-step cost of the two things the "on" arm adds, alone. Quote ratios.
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

HIDDEN, HEADS, GROUPS, SEQ, BATCH, VOCAB = 64, 4, 2, 128, 2, 256


class Arm:
    """One arm of the A/B: its own model, optimizer, batches and monitor. The two arms start
    from the same seed, so they run the same computation; only the monitor's option differs."""

    def __init__(self, layers: int, run_dir: str, *, recompute: bool) -> None:
        from megatron_gate.demo.tiny_gpt import build_gpt, causal_mask, position_ids, tiny_config
        from megatron_gate.spec import gated_gpt_layer_spec

        torch.manual_seed(0)
        config = tiny_config(num_layers=layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                             num_query_groups=GROUPS)  # fmt: skip
        spec = gated_gpt_layer_spec(granularity="headwise", backend="local")
        self.model = build_gpt(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        # A fresh random batch every step: a run that memorises one fixed batch is not healthy
        # (its grad norm leaps as the loss collapses, and the guard rightly rejects steps).
        self.generator = torch.Generator().manual_seed(1)
        self.positions, self.mask = position_ids(BATCH, SEQ), causal_mask(SEQ)
        self.recompute = recompute
        self.monitor = self._monitor(run_dir)
        self.step_index = 0

    def _monitor(self, run_dir: str) -> Any:
        from megatron_gate.monitor import MonitorConfig, StabilityMonitor

        config = MonitorConfig.from_dict({
            "sinks": {"console": False, "tensorboard": False},
            "guard": {"skip_mode": "host", "recompute_rejected": self.recompute},
        })  # fmt: skip
        return StabilityMonitor(config, models=[self.model], run_dir=run_dir,
                                optimizer=self.optimizer)  # fmt: skip

    def step(self) -> None:
        from megatron_gate.monitor.attribution import RandomState

        monitor, step = self.monitor, self.step_index
        monitor.start_step(step)
        if self.recompute:
            RandomState.take()  # what the plain loop keeps for a recompute
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=self.generator)
        labels = torch.roll(tokens, -1, dims=1)
        loss = self.model(tokens, self.positions, self.mask, labels=labels).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
        decision = monitor.end_step(step, loss=loss.detach(), grad_norm=grad_norm,
                                    recompute=self.recompute)  # fmt: skip
        assert not decision.recompute, "a healthy run rejected a step"
        monitor.step_optimizer(self.optimizer, decision)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def block(self, steps: int) -> tuple[float, float]:
        """`steps` steps from where this arm stopped; wall and process CPU seconds."""
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        self.monitor.sinks.wait()
        return time.perf_counter() - wall, time.process_time() - cpu


def whole_steps(layers: int, repetitions: int, run_dir: str) -> dict[str, Any]:
    """Recompute offered vs not, one model per arm, whole cadence periods, ABBA."""
    arms = {arm: Arm(layers, f"{run_dir}/{arm}_{layers}", recompute=arm == "on")
            for arm in ("off", "on")}  # fmt: skip
    steps = arms["on"].monitor.config.layer_interval
    for arm in arms.values():
        arm.block(steps)  # warm-up: one whole period, so both arms stay on the same step kinds
    wall, cpu = [], []
    for repetition in range(repetitions):
        order = ("off", "on") if repetition % 2 else ("on", "off")
        times = {name: arms[name].block(steps) for name in order}
        wall.append(times["on"][0] / times["off"][0])
        cpu.append(times["on"][1] / times["off"][1])
    for arm in arms.values():
        arm.monitor.close()
    return {"block_steps": steps, "repetitions": repetitions, "models": "one per arm",
            "median_wall_time_ratio": statistics.median(wall),
            "median_cpu_time_ratio": statistics.median(cpu), "wall_time_ratios": wall}  # fmt: skip


def _median_us(function: Any, repetitions: int = 2000) -> float:
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def parts() -> dict[str, float]:
    """The per-step additions alone: the random state and the guard snapshot."""
    from megatron_gate.monitor.attribution import GuardSnapshot, RandomState
    from megatron_gate.monitor.config import GuardConfig
    from megatron_gate.monitor.guard import StepGuard

    guard = StepGuard(GuardConfig(), device=torch.device("cpu"))
    return {"random_state_take_us": _median_us(RandomState.take),
            "guard_snapshot_take_us": _median_us(lambda: GuardSnapshot.take(guard))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results"
                        / "attribution_overhead.json")  # fmt: skip
    args = parser.parse_args()
    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel(tp=1)
    torch.set_num_threads(args.threads)  # after the process group, which resets it
    results: dict[str, Any] = {
        "command": "python bench/attribution_overhead.py " + " ".join(sys.argv[1:]),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "parts": parts(),
        "by_layers": {},
    }
    with tempfile.TemporaryDirectory() as run_dir:
        for layers in args.layers:
            results["by_layers"][str(layers)] = whole_steps(layers, args.repetitions, run_dir)
            print(json.dumps({layers: results["by_layers"][str(layers)]}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
