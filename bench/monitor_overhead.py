"""Cost of the stability monitor on a Megatron-Core GPT: wall-clock A/B and peak memory (not a test).

    nice -n 5 .venv/bin/python bench/monitor_overhead.py   # writes bench/results/monitor_overhead.json

Variants, each with its own model and optimizer built from the same seed (hooks registered by
one monitor must not run in another variant's steps):

- `plain`: no monitor; `optimizer.step()`.
- `default_cadence`: the default `MonitorConfig` (log every 10 steps, layer statistics every
  100); with the per-step guard when `megatron_gate.monitor.guard` exists (then the step goes
  through `monitor.step_optimizer`).
- `fully_logged`: `log_interval = layer_interval = 1`: every statistic, every step.
- `no_guard` (only when the guard exists): the default cadence with `guard.enabled: false`;
  `default_cadence / no_guard` is the guard's own cost, reported as `guard`.

Wall clock: rounds of a whole 100-step cadence period per variant for the small model (89
unlogged steps, 9 scalar log steps, the update-norm step and one per-layer step), interleaved
step by step (step i of every variant, in rotating order, then step i + 1) so that machine
noise hits every variant alike; per round the ratio `variant / plain` of the period's wall time
(and of its process CPU time); reported: the median over rounds and the spread (min, quartiles,
max), plus `robust_wall_time_ratio` (sums of per-step medians over rounds). On CUDA steps are
timed with CUDA events.

The production-like shape (hidden 1024, sequence 1024, 4 layers, 16 heads, 4 query groups)
takes seconds per step on this CPU: a 100-step period per variant and round is out of reach, so
its blocks are single steps: the fully logged ratio is measured A/B the same way, and the
default cadence is *estimated* from it (`method: estimate`, see `_estimated_default`).

Peak memory: each (size, variant) runs in a fresh subprocess (`--memory-child`), so that the
peak is that variant's alone: warm-up steps, then the peak is reset and the cadence's step kinds
run (unlogged, log, the step before a per-layer step, the per-layer step). CPU: the peak
resident set (`VmHWM`, reset through `/proc/self/clear_refs`), with glibc's mmap threshold fixed
at 64 KiB so that freed tensors leave the resident set at once (RSS then follows live memory
rather than the allocator's retained heap); CUDA: `torch.cuda.max_memory_allocated`.
`peak_memory_ratio` = monitored peak / plain peak (the process's whole footprint: torch,
Megatron, model, optimizer state, activations); `peak_extra_bytes` is the difference.

Probe: the attention-sink probe on one layer's query/key vs that layer's core attention forward
(same inputs), at the benchmark model's and the production-like shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

PRODUCTION = {"hidden": 1024, "heads": 16, "groups": 4, "seq": 1024, "batch": 1, "layers": 4}
PERIOD = 100  # the default layer_interval: one whole cadence period


def guard_available() -> bool:
    """Whether this checkout has the per-step guard (`megatron_gate.monitor.guard`)."""
    try:
        import megatron_gate.monitor.guard  # noqa: F401
    except ImportError:
        return False
    return True


def variants() -> list[str]:
    """The variants of this checkout (`no_guard` only when there is a guard to switch off)."""
    names = ["plain", "default_cadence", "fully_logged"]
    return names + (["no_guard"] if guard_available() else [])


# --breakdown: a fully logged step with its parts switched off one after the other
_QUIET = {"sinks": {"console": False, "tensorboard": False}}
_LOGGED = {"log_interval": 1, "layer_interval": 1}
BREAKDOWN: dict[str, dict[str, Any]] = {
    "fully_logged": _LOGGED,
    "without_tensorboard": {**_LOGGED, **_QUIET},
    "without_probe": {**_LOGGED, **_QUIET, "probe_queries": 0},
    "without_update_norm": {**_LOGGED, **_QUIET, "probe_queries": 0, "update_norm": False},
    "scalars_only": {"log_interval": 1, "layer_interval": 10**6, **_QUIET, "update_norm": False},
}


def _overrides(variant: str) -> dict[str, Any] | None:
    """MonitorConfig overrides of a variant (None: no monitor)."""
    if variant == "plain":
        return None
    if variant in BREAKDOWN and variant != "fully_logged":
        return BREAKDOWN[variant]
    if variant == "fully_logged":
        return {"log_interval": 1, "layer_interval": 1}
    if variant == "no_guard":
        return {"guard": {"enabled": False}}
    return {}


def _model(shape: argparse.Namespace) -> torch.nn.Module:
    from megatron_gate.demo.tiny_gpt import build_gpt, tiny_config
    from megatron_gate.spec import gated_gpt_layer_spec

    torch.manual_seed(0)
    config = tiny_config(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.groups,
    )
    return build_gpt(
        config,
        gated_gpt_layer_spec(granularity="headwise", backend="local"),
        vocab_size=shape.vocab,
        max_sequence_length=shape.seq,
    )


class Trainer:
    """One model + optimizer (+ monitor); `step(i)` runs training step `i`."""

    def __init__(self, shape: argparse.Namespace, variant: str, run_dir: str) -> None:
        from megatron_gate.demo.tiny_gpt import causal_mask, position_ids

        self.device = torch.device(shape.device)
        self.model = _model(shape).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=generator)
        self.tokens = tokens.to(self.device)
        self.labels = torch.roll(self.tokens, -1, dims=1)
        self.positions = position_ids(shape.batch, shape.seq).to(self.device)
        self.mask = causal_mask(shape.seq).to(self.device)
        self.tokens_per_step = shape.batch * shape.seq
        self.monitor = self._monitor(_overrides(variant), run_dir)

    def _monitor(self, overrides: dict[str, Any] | None, run_dir: str) -> Any:
        if overrides is None:
            return None
        from megatron_gate.monitor import MonitorConfig, StabilityMonitor

        config = MonitorConfig.from_dict(
            {"sinks": {"console": False, "tensorboard": True}, **overrides}
        )
        return StabilityMonitor(
            config, models=[self.model], run_dir=run_dir, optimizer=self.optimizer
        )

    def step(self, step: int) -> None:
        """One training step: forward, backward, clip, monitor, optimizer step."""
        monitor = self.monitor
        if monitor is not None:
            monitor.start_step(step)
        loss = self.model(self.tokens, self.positions, self.mask, labels=self.labels).mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1e9)
        if monitor is None:
            self.optimizer.step()
        else:
            decision = monitor.end_step(
                step, loss=loss.detach(), grad_norm=grad_norm, tokens=self.tokens_per_step
            )
            if hasattr(monitor, "step_optimizer"):
                monitor.step_optimizer(self.optimizer, decision)
            elif not decision.skip_step:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def block(self, steps: list[int]) -> tuple[float, float]:
        """(wall s, process CPU s) of `steps`, the sink thread's writes included.

        The wait for the background sink thread is part of the block: its work is the
        monitor's, and it must not spill into the next variant's block. CUDA: wall time from
        CUDA events around the block.
        """
        cuda = self.device.type == "cuda"
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        wall, cpu = time.perf_counter(), time.process_time()
        for step in steps:
            self.step(step)
        if self.monitor is not None:
            self.monitor.sinks.wait()
        if cuda:
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, time.process_time() - cpu
        return time.perf_counter() - wall, time.process_time() - cpu

    def close(self) -> None:
        """Close the monitor (its hooks leave the model)."""
        if self.monitor is not None:
            self.monitor.close()


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else ordered * 3
    return {
        "min": ordered[0],
        "q1": quartiles[0],
        "q3": quartiles[2],
        "max": ordered[-1],
    }


def interleaved(
    shape: argparse.Namespace,
    run_dir: str,
    *,
    steps: list[int],
    rounds: int,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Step by step interleaved variants (rotating order); per-round period ratios to `plain`.

    Each step index of the period runs once per variant before the next index, so a burst of
    load from other jobs hits every variant within milliseconds. Per round: the ratio of the
    period's summed step times (wall, and process CPU); also the ratio of the sums of per-step
    median wall times over rounds (`robust_wall_time_ratio`, insensitive to single preempted
    steps).
    """
    names = names or variants()
    trainers = {name: Trainer(shape, name, f"{run_dir}/{name}") for name in names}
    for trainer in trainers.values():  # warm-up: lazy optimizer state, allocator, first hooks
        trainer.block(steps[:2])
    # wall[name][round][i], cpu[name][round]
    wall: dict[str, list[list[float]]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in names:
            wall[name].append([])
            cpu[name].append(0.0)
        for position, step in enumerate(steps):
            shift = (round_index * len(steps) + position) % len(names)
            order = names[shift:] + names[:shift]
            if (round_index + position) % 2:
                order.reverse()
            for name in order:
                seconds, cpu_seconds = trainers[name].block([step])
                wall[name][-1].append(seconds)
                cpu[name][-1] += cpu_seconds
        print(
            f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{n} {sum(wall[n][-1]) / sum(wall['plain'][-1]):.4f}" for n in names[1:]),
            flush=True,
        )
    for trainer in trainers.values():
        trainer.close()
    period = {name: [sum(times) for times in wall[name]] for name in names}
    per_step_median = {
        name: sum(statistics.median(column) for column in zip(*wall[name], strict=True))
        for name in names
    }
    result: dict[str, Any] = {
        "block_steps": len(steps),
        "rounds": rounds,
        "median_step_s_plain": statistics.median(period["plain"]) / len(steps),
    }
    for name, baseline in [(n, "plain") for n in names[1:]] + (
        [("guard", "no_guard")] if "no_guard" in names else []
    ):
        measured = "default_cadence" if name == "guard" else name
        result[name] = _ratios(
            [t / p for t, p in zip(period[measured], period[baseline], strict=True)],
            [t / p for t, p in zip(cpu[measured], cpu[baseline], strict=True)],
            per_step_median[measured] / per_step_median[baseline],
        )
    return result


def _ratios(wall: list[float], cpu: list[float], robust: float) -> dict[str, Any]:
    return {
        "median_wall_time_ratio": statistics.median(wall),
        "wall_spread": _spread(wall),
        "robust_wall_time_ratio": robust,
        "median_cpu_time_ratio": statistics.median(cpu),
        "cpu_spread": _spread(cpu),
        "wall_time_ratios": wall,
    }


# ---------------------------------------------------------------------- peak memory
MEMORY_STEPS = {
    # warm-up, then the measured steps: every step kind of a cadence period and the next
    # per-layer step (update-norm step 99, per-layer step 100)
    "small": (list(range(90, 93)), list(range(0, PERIOD + 1))),
    "production": ([95, 96], [97, 98, 99, 100]),
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def memory_child(shape: argparse.Namespace, variant: str, size: str) -> dict[str, Any]:
    """Peak memory of one variant's steps, in this (fresh) process."""
    warm_up, measured = MEMORY_STEPS[size]
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(shape, variant, run_dir)
        trainer.block(warm_up)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset = _reset_peak_rss()
            before = _status_kib("VmRSS") * 1024
        trainer.block(measured)
        peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024
        trainer.close()
    return {
        "variant": variant,
        "measure": "cuda max_memory_allocated" if cuda else "peak RSS (VmHWM)",
        "peak_reset": True if cuda else reset,
        "before_steps_bytes": before,
        "peak_bytes": peak,
        "steps": measured,
    }


def peak_memory(argv_shape: list[str], size: str) -> dict[str, Any]:
    """Every variant's peak in its own subprocess; ratios to `plain`."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TORCHDYNAMO_DISABLE": "1"}
    peaks = {}
    for variant in variants():
        command = [sys.executable, __file__, "--memory-child", variant, "--size", size]
        output = subprocess.run(
            command + argv_shape, env=env, check=True, capture_output=True, text=True
        ).stdout
        peaks[variant] = json.loads(output.strip().splitlines()[-1])
    plain = peaks["plain"]["peak_bytes"]
    result: dict[str, Any] = {"by_variant": peaks}
    for variant in variants()[1:]:
        result[variant] = {
            "peak_memory_ratio": peaks[variant]["peak_bytes"] / plain,
            "peak_extra_bytes": peaks[variant]["peak_bytes"] - plain,
        }
    return result


# ---------------------------------------------------------------------- probe
def probe_cost(shape: argparse.Namespace, repetitions: int) -> dict[str, Any]:
    """The probe on one layer's (query, key) vs that layer's core attention forward."""
    from megatron_gate.demo.tiny_gpt import causal_mask
    from megatron_gate.monitor.probe import probe_attention, sample_positions

    one_layer = argparse.Namespace(**{**vars(shape), "layers": 1})
    core = _model(one_layer).decoder.layers[0].self_attention.core_attention
    seq, batch, heads, groups = shape.seq, shape.batch, shape.heads, shape.groups
    head_dim = shape.hidden // heads
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(seq, batch, heads, head_dim, generator=generator)
    key = torch.randn(seq, batch, groups, head_dim, generator=generator)
    value = torch.randn(seq, batch, groups, head_dim, generator=generator)
    mask = causal_mask(seq)
    positions = sample_positions(seq, shape.probe_queries)

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
        for _ in range(repetitions):
            start = time.perf_counter()
            run_attention()
            attention_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_probe()
            probe_times.append(time.perf_counter() - start)
    probe, attention = statistics.median(probe_times), statistics.median(attention_times)
    return {
        "shape": {"seq": seq, "batch": batch, "heads": heads, "groups": groups, "hn": head_dim},
        "probe_queries": shape.probe_queries,
        "median_probe_s": probe,
        "median_attention_forward_s": attention,
        "ratio": probe / attention,
    }


# ---------------------------------------------------------------------- production shape
def _estimated_default(logged: dict[str, Any], small: dict[str, Any], step_s: float) -> float:
    """Default-cadence ratio of the production shape from measured parts (not an A/B).

    A default period holds one fully logged step and 99 steps whose monitor work does not
    depend on the model's width (scalar copies, 9 small log reductions, sinks): that work is
    taken from the 4-layer small model's measured default-cadence A/B (its whole extra time per
    period, an upper bound: it includes that model's own per-layer step).
    """
    logged_extra = (logged["median_wall_time_ratio"] - 1.0) * step_s
    small_extra = (small["median_wall_time_ratio"] - 1.0) * small["step_s"] * PERIOD
    return 1.0 + (logged_extra + max(small_extra, 0.0)) / (PERIOD * step_s)


def _shape(args: argparse.Namespace, **fields: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **fields})


def _shape_argv(shape: argparse.Namespace) -> list[str]:
    fields = ("layers", "hidden", "heads", "groups", "seq", "batch", "vocab", "device")
    return [part for name in fields for part in (f"--{name}", str(getattr(shape, name)))]


def measure_small(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """2, 4, 8 layers of the benchmark model: whole cadence periods, interleaved."""
    by_layers: dict[str, Any] = {}
    for layers in args.layer_counts:
        shape = _shape(args, layers=layers)
        timing = interleaved(
            shape, f"{run_dir}/small{layers}", steps=list(range(PERIOD)), rounds=args.rounds
        )
        memory = peak_memory(_shape_argv(shape), "small")
        entry: dict[str, Any] = {"median_step_s_plain": timing["median_step_s_plain"]}
        for variant in variants()[1:]:
            entry[variant] = {**timing[variant], **memory[variant]}
        if "guard" in timing:
            entry["guard"] = timing["guard"]
        entry["memory"] = memory["by_variant"]
        by_layers[str(layers)] = entry
        _print_size(f"{layers} layers", entry)
    return by_layers


def measure_production(args: argparse.Namespace, run_dir: str, small: Any) -> dict[str, Any]:
    """The production-like shape: single-step blocks, interleaved; default cadence estimated."""
    shape = _shape(args, **PRODUCTION)
    timing = interleaved(shape, f"{run_dir}/production", steps=[1], rounds=args.production_rounds)
    memory = peak_memory(_shape_argv(shape), "production")
    entry: dict[str, Any] = {
        "shape": PRODUCTION,
        "median_step_s_plain": timing["median_step_s_plain"],
    }
    for variant in variants()[1:]:
        entry[variant] = {**timing[variant], **memory[variant]}
    reference = small.get("4") or next(iter(small.values()))
    entry["default_cadence"] = {
        "method": "estimate",
        "note": "single steps measured A/B are not periods: see _estimated_default",
        "median_wall_time_ratio": _estimated_default(
            timing["fully_logged"],
            {
                "median_wall_time_ratio": reference["default_cadence"]["median_wall_time_ratio"],
                "step_s": reference["median_step_s_plain"],
            },
            timing["median_step_s_plain"],
        ),
        "single_step_ab": timing["default_cadence"],
        **memory["default_cadence"],
    }
    if "guard" in timing:
        entry["guard"] = timing["guard"]
    entry["memory"] = memory["by_variant"]
    _print_size("production shape", entry)
    return entry


def breakdown(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """Where a fully logged step's time goes: its parts switched off one by one, interleaved."""
    shape = _shape(args, layers=args.breakdown)
    names = ["plain", *BREAKDOWN]
    timing = interleaved(
        shape, f"{run_dir}/breakdown", steps=list(range(1, 21)), rounds=args.rounds, names=names
    )
    return {"layers": args.breakdown, "variants": BREAKDOWN, **timing}


def _print_size(name: str, entry: dict[str, Any]) -> None:
    parts = [
        f"{variant} {entry[variant]['median_wall_time_ratio']:.4f}x wall, "
        f"{entry[variant].get('peak_memory_ratio', float('nan')):.4f}x peak memory"
        for variant in ("default_cadence", "fully_logged")
    ]
    if "guard" in entry:
        parts.append(f"guard {entry['guard']['median_wall_time_ratio']:.4f}x wall")
    step_ms = entry["median_step_s_plain"] * 1e3
    print(f"{name} (plain step {step_ms:.1f} ms): " + "; ".join(parts), flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer-counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--probe-queries", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10, help="rounds per small model size")
    parser.add_argument("--production-rounds", type=int, default=6)
    parser.add_argument("--no-production", action="store_true", help="skip the 1024 shape")
    parser.add_argument("--probe-repetitions", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    parser.add_argument(
        "--breakdown",
        type=int,
        metavar="LAYERS",
        help="only the breakdown of a fully logged step at LAYERS layers (its own output file)",
    )
    parser.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help=argparse.SUPPRESS)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "monitor_overhead.json")
    )
    return parser


def _fast_checksum() -> bool:
    from megatron_gate.monitor.sinks.tensorboard import use_fast_checksum

    return use_fast_checksum()


def _setup(args: argparse.Namespace) -> None:
    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)
    torch.set_num_threads(args.threads)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup(args)
    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child, args.size)))
        return 0
    results: dict[str, Any] = {
        "command": " ".join(["python", sys.argv[0], *(argv or sys.argv[1:])]),
        "device": args.device if args.device != "cpu" else f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "guard": guard_available(),
        "tensorboard_fast_checksum": _fast_checksum(),
        "variants": variants(),
        "model": {k: getattr(args, k) for k in ("hidden", "heads", "groups", "seq", "batch")},
    }
    if args.breakdown:
        with tempfile.TemporaryDirectory() as run_dir:
            results["breakdown"] = breakdown(args, run_dir)
        return _write(results, args.output)
    results["probe"] = {
        "training_model": probe_cost(args, args.probe_repetitions),
        "production_shape": probe_cost(_shape(args, **PRODUCTION), args.probe_repetitions),
    }
    for name, probe in results["probe"].items():
        print(f"probe / attention forward ({name}): {probe['ratio']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        results["by_layers"] = measure_small(args, run_dir)
        if not args.no_production:
            results["production_shape"] = measure_production(args, run_dir, results["by_layers"])
    return _write(results, args.output)


def _write(results: dict[str, Any], path: str) -> int:
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
