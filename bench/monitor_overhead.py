"""Overhead of the stability monitor on a small Megatron-Core GPT (not a test).

    .venv/bin/python bench/monitor_overhead.py            # writes bench/results/monitor_overhead.json

For each depth (2, 4, 8 layers), in one process, interleaved (A B A B ...) so that machine noise
hits both arms alike:

- default cadence: whole 100-step cadence periods (10 log steps, 1 per-layer step) with the
  default monitor vs without, in ABBA order; per pair the ratio of process CPU time (robust on
  an oversubscribed machine; includes the sink thread) and of wall time; medians over pairs;
- fully logged: blocks of steps with log_interval = layer_interval = 1 (every statistic,
  every step) vs without, the same way;
- probe: the attention-sink probe on one layer's query/key vs that layer's core attention
  forward on the same inputs; ratio of medians.

- attributed: in a separate monitored run, the wall time spent inside monitor code (its
  calls, hooks, and sinks run inline) as a share of the same steps: total / (total - monitor).

A training step is forward + backward + `torch.optim.AdamW` step of a headwise-gated GPT
(`megatron_gate.tiny_gpt`). Quote the ratios, not the absolute times (shared, noisy machine).
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


def _model(layers: int, args: argparse.Namespace) -> torch.nn.Module:
    from megatron_gate.spec import gated_gpt_layer_spec
    from megatron_gate.tiny_gpt import build_gpt, tiny_config

    torch.manual_seed(0)
    config = tiny_config(
        num_layers=layers,
        hidden_size=args.hidden,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
    )
    return build_gpt(
        config,
        gated_gpt_layer_spec(granularity="headwise", backend="local"),
        vocab_size=args.vocab,
        max_sequence_length=args.seq,
    )


class Trainer:
    """One model + optimizer; `step()` runs a training step, with or without a monitor."""

    def __init__(self, layers: int, args: argparse.Namespace) -> None:
        from megatron_gate.tiny_gpt import causal_mask, position_ids

        self.model = _model(layers, args)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
        self.labels = torch.roll(self.tokens, -1, dims=1)
        self.positions = position_ids(args.batch, args.seq)
        self.mask = causal_mask(args.seq)
        self.tokens_per_step = args.batch * args.seq
        self.step_index = 0

    def step(self, monitor: Any = None) -> None:
        """One training step."""
        step = self.step_index
        if monitor is not None:
            monitor.start_step(step)
        loss = self.model(self.tokens, self.positions, self.mask, labels=self.labels).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
        if monitor is not None:
            monitor.end_step(
                step, loss=loss.detach(), grad_norm=grad_norm, tokens=self.tokens_per_step
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def block(self, steps: int, monitor: Any = None) -> tuple[float, float]:
        """(wall s, process CPU s) of `steps` steps from cadence position 0, sink writes included."""
        self.step_index = 0
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step(monitor)
        if monitor is not None:
            monitor.sinks.wait()  # the background sink thread's work belongs to this block
        return time.perf_counter() - wall, time.process_time() - cpu


def _compare(trainer: Trainer, monitor: Any, steps: int, repetitions: int) -> dict[str, Any]:
    """Blocks with and without the monitor in ABBA order; medians of per-pair ratios."""
    trainer.block(2)
    trainer.block(2, monitor)
    wall_ratios, cpu_ratios, plain_walls = [], [], []
    for repetition in range(repetitions):
        if repetition % 2:
            plain = trainer.block(steps)
            monitored = trainer.block(steps, monitor)
        else:
            monitored = trainer.block(steps, monitor)
            plain = trainer.block(steps)
        wall_ratios.append(monitored[0] / plain[0])
        cpu_ratios.append(monitored[1] / plain[1])
        plain_walls.append(plain[0] / steps)
    return {
        "block_steps": steps,
        "repetitions": repetitions,
        "median_cpu_time_ratio": statistics.median(cpu_ratios),
        "median_wall_time_ratio": statistics.median(wall_ratios),
        "cpu_time_ratios": cpu_ratios,
        "wall_time_ratios": wall_ratios,
        "median_step_s_without": statistics.median(plain_walls),
    }


def _monitor(trainer: Trainer, run_dir: str, **overrides: Any) -> Any:
    from megatron_gate.monitor import MonitorConfig, StabilityMonitor

    config = MonitorConfig.from_dict(
        {"sinks": {"console": False, "tensorboard": True}, **overrides}
    )
    return StabilityMonitor(
        config, models=[trainer.model], run_dir=run_dir, optimizer=trainer.optimizer
    )


class Attribution:
    """Wall time spent inside the monitor: its calls, its hooks, its sinks (written inline)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def attributed(
    layers: int, args: argparse.Namespace, run_dir: str, steps: int, **overrides: Any
) -> dict[str, Any]:
    """Share of the monitored steps' own wall time spent in monitor code.

    Both numbers come from the same steps, so machine load scales them alike: the most stable
    estimate on a busy machine. Sinks run inline here so that their time is counted.
    """
    from megatron_gate.monitor import collectors
    from megatron_gate.monitor.sinks import SinkGroup

    attribution = Attribution()
    original_guard = collectors._guarded
    collectors._guarded = lambda kind, hook, warned: attribution.timed(
        original_guard(kind, hook, warned)
    )
    try:
        trainer = Trainer(layers, args)
        monitor = _monitor(trainer, run_dir, **overrides)
        monitor.sinks.close()
        monitor.sinks = SinkGroup(monitor.sinks.sinks)  # inline: sink time is attributed
        monitor.start_step = attribution.timed(monitor.start_step)
        monitor.end_step = attribution.timed(monitor.end_step)
        trainer.block(2, monitor)
        attribution.seconds = 0.0
        total = 0.0
        for _ in range(args.attributed_repetitions):
            total += trainer.block(steps, monitor)[0]
        monitor.close()
    finally:
        collectors._guarded = original_guard
    return {
        "steps": steps * args.attributed_repetitions,
        "monitor_s": attribution.seconds,
        "total_s": total,
        "ratio": total / (total - attribution.seconds),
    }


def default_cadence(layers: int, args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Whole 100-step cadence periods (10 log steps, 1 per-layer step) with vs without."""
    trainer = Trainer(layers, args)
    monitor = _monitor(trainer, run_dir)
    result = _compare(trainer, monitor, monitor.config.layer_interval, args.repetitions)
    monitor.close()
    result["attributed"] = attributed(layers, args, run_dir + "-attributed", 100)
    return result


def fully_logged(layers: int, args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Every step logged with every per-layer statistic vs no monitor."""
    trainer = Trainer(layers, args)
    monitor = _monitor(trainer, run_dir, log_interval=1, layer_interval=1)
    result = _compare(trainer, monitor, args.logged_block, args.logged_repetitions)
    monitor.close()
    result["attributed"] = attributed(
        layers, args, run_dir + "-attributed", args.logged_block, log_interval=1, layer_interval=1
    )
    return result


def probe_cost(
    args: argparse.Namespace, *, seq: int, hidden: int, heads: int, groups: int, batch: int
) -> dict[str, Any]:
    """The probe on one layer's (query, key) vs that layer's core attention forward."""
    from megatron_gate.monitor.probe import probe_attention, sample_positions
    from megatron_gate.tiny_gpt import causal_mask

    shape = argparse.Namespace(
        **{**vars(args), "seq": seq, "hidden": hidden, "heads": heads, "groups": groups}
    )
    core = _model(1, shape).decoder.layers[0].self_attention.core_attention
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(seq, batch, heads, head_dim, generator=generator)
    key = torch.randn(seq, batch, groups, head_dim, generator=generator)
    value = torch.randn(seq, batch, groups, head_dim, generator=generator)
    mask = causal_mask(seq)
    positions = sample_positions(seq, args.probe_queries)

    def run_probe() -> None:
        probe_attention(
            query, key, softmax_scale=core.softmax_scale, positions=positions, attention_mask=mask
        )

    def run_attention() -> None:
        core(query, key, value, mask)

    probe_times, attention_times = [], []
    with torch.no_grad():
        for _ in range(3):
            run_probe()
            run_attention()
        for _ in range(args.probe_repetitions):
            start = time.perf_counter()
            run_attention()
            attention_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_probe()
            probe_times.append(time.perf_counter() - start)
    probe, attention = statistics.median(probe_times), statistics.median(attention_times)
    return {
        "shape": {
            "seq": seq,
            "batch": batch,
            "heads": heads,
            "groups": groups,
            "head_dim": head_dim,
        },
        "probe_queries": args.probe_queries,
        "median_probe_s": probe,
        "median_attention_forward_s": attention,
        "ratio": probe / attention,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--probe-queries", type=int, default=8)
    parser.add_argument("--repetitions", type=int, default=4, help="default-cadence periods")
    parser.add_argument("--logged-block", type=int, default=10, help="steps per logged block")
    parser.add_argument("--logged-repetitions", type=int, default=8)
    parser.add_argument("--attributed-repetitions", type=int, default=2)
    parser.add_argument("--probe-repetitions", type=int, default=20)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a busy CPU)"
    )
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "monitor_overhead.json")
    )
    args = parser.parse_args(argv)

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "model": {k: getattr(args, k) for k in ("hidden", "heads", "groups", "seq", "batch")},
        "probe": {
            # the benchmark model's own attention (tiny: fixed per-op costs dominate)
            "training_model": probe_cost(
                args,
                seq=args.seq,
                hidden=args.hidden,
                heads=args.heads,
                groups=args.groups,
                batch=args.batch,
            ),
            # a production-like attention layer: 16 heads of 64, 4 query groups, 2048 tokens
            "production_shape": probe_cost(
                args, seq=2048, hidden=1024, heads=16, groups=4, batch=1
            ),
        },
        "by_layers": {},
    }
    for name, probe in results["probe"].items():
        print(f"probe / attention forward ({name}): {probe['ratio']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        for layers in args.layers:
            cadence = default_cadence(layers, args, f"{run_dir}/cadence{layers}")
            logged = fully_logged(layers, args, f"{run_dir}/logged{layers}")
            results["by_layers"][str(layers)] = {"default_cadence": cadence, "fully_logged": logged}
            print(
                f"{layers} layers (step {cadence['median_step_s_without'] * 1e3:.1f} ms): "
                f"default cadence {cadence['attributed']['ratio']:.4f}x attributed, "
                f"{cadence['median_cpu_time_ratio']:.4f}x CPU A/B, "
                f"{cadence['median_wall_time_ratio']:.4f}x wall A/B; fully logged "
                f"{logged['attributed']['ratio']:.4f}x attributed, "
                f"{logged['median_cpu_time_ratio']:.4f}x CPU A/B, "
                f"{logged['median_wall_time_ratio']:.4f}x wall A/B",
                flush=True,
            )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
