"""Overhead of the stability monitor on a small Megatron-Core GPT (not a test).

    .venv/bin/python bench/monitor_overhead.py            # writes bench/results/monitor_overhead.json

For each depth (2, 4, 8 layers), in one process, interleaved (A B A B ...) so that machine noise
hits both arms alike:

- default cadence: every step of a 100-step cadence period (10 log steps, 1 per-layer step)
  with the default monitor and without it, back to back in alternating order; the medians
  per position over repetitions are summed: ratio of the sums;
- fully logged step: log_interval = layer_interval = 1 (every statistic, every step) vs none;
  ratio of per-step medians;
- probe: the attention-sink probe on one layer's query/key vs that layer's core attention
  forward on the same inputs; ratio of medians.

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

    def step(self, monitor: Any = None) -> float:
        """One training step; returns its wall time in seconds."""
        start = time.perf_counter()
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
        return time.perf_counter() - start


def _monitor(trainer: Trainer, run_dir: str, **overrides: Any) -> Any:
    from megatron_gate.monitor import MonitorConfig, StabilityMonitor

    config = MonitorConfig.from_dict(
        {"sinks": {"console": False, "tensorboard": True}, **overrides}
    )
    return StabilityMonitor(
        config, models=[trainer.model], run_dir=run_dir, optimizer=trainer.optimizer
    )


def default_cadence(layers: int, args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """The default config over whole cadence periods, step by step against no monitor.

    Step i of a period runs once without the monitor and once with it (cadence position i:
    10 log steps and 1 per-layer step in 100), alternating which goes first; per position the
    median over repetitions is kept, and the overhead is the ratio of the summed medians.
    """
    trainer = Trainer(layers, args)
    monitor = _monitor(trainer, run_dir)
    period = monitor.config.layer_interval
    for _ in range(3):
        trainer.step()
        trainer.step(monitor)
    with_times: list[list[float]] = [[] for _ in range(period)]
    without_times: list[list[float]] = [[] for _ in range(period)]
    for repetition in range(args.repetitions):
        for position in range(period):
            trainer.step_index = position
            if (repetition + position) % 2:
                without_times[position].append(trainer.step())
                trainer.step_index = position
                with_times[position].append(trainer.step(monitor))
            else:
                with_times[position].append(trainer.step(monitor))
                trainer.step_index = position
                without_times[position].append(trainer.step())
    monitor.close()
    with_total = sum(statistics.median(times) for times in with_times)
    without_total = sum(statistics.median(times) for times in without_times)
    return {
        "period_steps": period,
        "repetitions": args.repetitions,
        "median_ratio": with_total / without_total,
        "mean_step_s_with": with_total / period,
        "mean_step_s_without": without_total / period,
        "median_unlogged_step_ratio": statistics.median(
            statistics.median(w) / statistics.median(o)
            for position, (w, o) in enumerate(zip(with_times, without_times, strict=True))
            if position % monitor.config.log_interval
        ),
    }


def fully_logged(layers: int, args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Every step logged with every per-layer statistic vs no monitor, step by step."""
    trainer = Trainer(layers, args)
    monitor = _monitor(trainer, run_dir, log_interval=1, layer_interval=1)
    for _ in range(3):
        trainer.step()
        trainer.step(monitor)
    with_times, without_times = [], []
    for index in range(args.steps):
        if index % 2:
            without_times.append(trainer.step())
            with_times.append(trainer.step(monitor))
        else:
            with_times.append(trainer.step(monitor))
            without_times.append(trainer.step())
    monitor.close()
    with_median, without_median = statistics.median(with_times), statistics.median(without_times)
    return {
        "median_ratio": with_median / without_median,
        "median_step_s_with": with_median,
        "median_step_s_without": without_median,
    }


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
    parser.add_argument("--repetitions", type=int, default=5, help="default-cadence periods")
    parser.add_argument("--steps", type=int, default=30, help="steps per arm, fully logged")
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
                f"{layers} layers: default cadence {cadence['median_ratio']:.4f}x, "
                f"fully logged step {logged['median_ratio']:.4f}x "
                f"(step {logged['median_step_s_without'] * 1e3:.1f} ms)",
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
