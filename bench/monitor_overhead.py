"""Cost of the stability monitor on a Megatron-Core GPT: wall-clock A/B and peak memory (not a test).

    .venv/bin/python bench/monitor_overhead.py --production-rounds 8 # results/monitor_overhead.json
    .venv/bin/python bench/monitor_overhead.py --breakdown-production \
        --output bench/results/monitor_overhead_breakdown_production.json
    .venv/bin/python bench/monitor_overhead.py --no-small --no-memory --production-hidden 64 \
        --production-seq 32 --production-rounds 1 --output /tmp/smoke.json     # smoke: seconds

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

The production-like shape (hidden 1024, sequence 1024, 4 layers, 16 heads, 4 query groups;
`--production-hidden`, `--production-seq` and the like change it) takes seconds per step on this
CPU: a 100-step period per variant and round is out of reach, so each STEP KIND of the default
cadence is measured instead (`step_kinds_ab`): the unlogged step, the scalar log step
(`log_interval`), the step before a per-layer step (its update norm measured) and the per-layer
step, each taken from the monitor's own `is_log_step` / `measures_update` / `is_layer_step`.
Round r runs, kind after kind in cadence order, that kind's step of cadence period r + 1 in
every variant, the variants' order rotated by one per round and kind (period 0 is an untimed
warm-up); `--production-rounds` rounds (default 6). A cadence's ratio is then composed from the
measured times with that variant's steps of each kind per period (`cadence_counts`, from its
`MonitorConfig`; the default: 89 unlogged, 9 log, 1 update-norm, 1 per-layer):
`sum_k n_k * t_variant,k / sum_k n_k * t_plain,k`, per round (median and spread over rounds) and
from per-kind medians (`robust_wall_time_ratio`); `method: composed_from_step_kinds`. The fully
logged variant makes every step a per-layer step (`counts_per_period: per_layer 100`): its ratio
is its per-layer kind against plain's. The raw per-kind times (`step_s`) and every per-kind ratio
(`per_kind`) are kept. One bias: the measured log step flushes the 2 rows buffered since the
last flush instead of 10 (the per-row host work, detectors and records, does not grow with the
model's width; the toy-shape A/B has it in full). `--breakdown-production`: the `--breakdown`
variants (`BREAKDOWN`: a fully logged step with its parts switched off one after the other) at
that shape, single-step interleaved rounds (`--production-rounds`).

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


# (wall, process CPU) seconds: `[variant][round][i]`, i the round's i-th step
Times = tuple[dict[str, list[list[float]]], dict[str, list[list[float]]]]


def _no_times(names: list[str]) -> Times:
    return {name: [] for name in names}, {name: [] for name in names}


def _order(names: list[str], *, shift: int, reverse: bool) -> list[str]:
    """`names` rotated left by `shift`, reversed when asked."""
    shift %= len(names)
    order = names[shift:] + names[:shift]
    return order[::-1] if reverse else order


def _trainers(shape: argparse.Namespace, run_dir: str, names: list[str]) -> dict[str, Trainer]:
    return {name: Trainer(shape, name, f"{run_dir}/{name}") for name in names}


def _run_round(
    trainers: dict[str, Trainer],
    steps: list[int],
    orders: list[list[str]],
    times: Times,
) -> None:
    """One round: step `steps[i]` of every variant in `orders[i]`, then step i + 1.

    Appends this round's per-step (wall, process CPU) seconds to `times` (`[name][round][i]`).
    """
    wall, cpu = times
    for name in trainers:
        wall[name].append([])
        cpu[name].append([])
    for step, order in zip(steps, orders, strict=True):
        for name in order:
            seconds, cpu_seconds = trainers[name].block([step])
            wall[name][-1].append(seconds)
            cpu[name][-1].append(cpu_seconds)


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
    steps). Single-step periods rotate the order by one variant per round.
    """
    names = names or variants()
    trainers = _trainers(shape, run_dir, names)
    for trainer in trainers.values():  # warm-up: lazy optimizer state, allocator, first hooks
        trainer.block(steps[:2])
    times = _no_times(names)
    for round_index in range(rounds):
        orders = [
            _order(
                names,
                shift=round_index * len(steps) + position,
                reverse=len(steps) > 1 and bool((round_index + position) % 2),
            )
            for position in range(len(steps))
        ]
        _run_round(trainers, steps, orders, times)
        wall = times[0]
        print(
            f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{n} {sum(wall[n][-1]) / sum(wall['plain'][-1]):.4f}" for n in names[1:]),
            flush=True,
        )
    for trainer in trainers.values():
        trainer.close()
    return _period_result(*times, steps=len(steps))


def _comparisons(names: list[str]) -> list[tuple[str, str, str]]:
    """(reported name, measured variant, baseline): every variant vs plain, the guard alone."""
    pairs = [(name, name, "plain") for name in names[1:]]
    return pairs + ([("guard", "default_cadence", "no_guard")] if "no_guard" in names else [])


def _period_result(
    wall: dict[str, list[list[float]]], cpu: dict[str, list[list[float]]], *, steps: int
) -> dict[str, Any]:
    """Per-round ratios of the periods' summed times, and the per-step-median robust ratio."""
    names = list(wall)
    period = {name: [sum(times) for times in wall[name]] for name in names}
    period_cpu = {name: [sum(times) for times in cpu[name]] for name in names}
    per_step_median = {
        name: sum(statistics.median(column) for column in zip(*wall[name], strict=True))
        for name in names
    }
    result: dict[str, Any] = {
        "block_steps": steps,
        "rounds": len(period["plain"]),
        "median_step_s_plain": statistics.median(period["plain"]) / steps,
    }
    for name, measured, baseline in _comparisons(names):
        result[name] = _ratios(
            _divide(period[measured], period[baseline]),
            _divide(period_cpu[measured], period_cpu[baseline]),
            per_step_median[measured] / per_step_median[baseline],
        )
    return result


def _divide(numerators: list[float], denominators: list[float]) -> list[float]:
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


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
STEP_KINDS = ("unlogged", "log", "update_norm", "per_layer")


def step_kind(monitor: Any, step: int) -> str:
    """The kind of `step` under `monitor`'s cadence (its own `is_*` answers, no copy of them)."""
    if monitor.is_layer_step(step):
        return "per_layer"
    if monitor.measures_update(step):
        return "update_norm"
    return "log" if monitor.is_log_step(step) else "unlogged"


def cadence_counts(monitor: Any, period: int) -> dict[str, int]:
    """How many steps of each kind steps 1..`period` hold under `monitor`'s cadence."""
    kinds = [step_kind(monitor, step) for step in range(1, period + 1)]
    return {kind: kinds.count(kind) for kind in STEP_KINDS}


def kind_offsets(monitor: Any) -> dict[str, int]:
    """The first step of each kind in a cadence period (1..layer_interval), in cadence order."""
    offsets: dict[str, int] = {}
    for step in range(1, monitor.config.layer_interval + 1):
        offsets.setdefault(step_kind(monitor, step), step)
    return dict(sorted(offsets.items(), key=lambda item: item[1]))


def _composed(
    times: dict[str, list[list[float]]], weights: list[int], measured: str, baseline: str
) -> tuple[list[float], float]:
    """Per-round ratios of the weighted sums of step-kind times, and that of per-kind medians.

    `times[name][round][i]`: the time of step kind i; `weights[i]`: its steps per period.
    """

    def period(per_kind: list[float]) -> float:
        return sum(weight * seconds for weight, seconds in zip(weights, per_kind, strict=True))

    rounds = [
        period(ours) / period(theirs)
        for ours, theirs in zip(times[measured], times[baseline], strict=True)
    ]
    medians = {
        name: [statistics.median(kind) for kind in zip(*times[name], strict=True)]
        for name in (measured, baseline)
    }
    return rounds, period(medians[measured]) / period(medians[baseline])


def _composed_entry(
    times: Times,
    counts: dict[str, int],
    kinds: list[str],
    pair: tuple[str, str],
) -> dict[str, Any]:
    """`pair[0]` vs `pair[1]` composed with `counts` (per period), and the ratio per kind."""
    missing = [kind for kind, count in counts.items() if count and kind not in kinds]
    if missing:
        raise ValueError(f"{pair[0]}: step kinds {missing} are not in the measured cadence")
    wall, cpu = times
    weights = [counts[kind] for kind in kinds]
    wall_ratios, robust = _composed(wall, weights, *pair)
    entry = {"method": "composed_from_step_kinds", "counts_per_period": counts}
    entry |= _ratios(wall_ratios, _composed(cpu, weights, *pair)[0], robust)
    entry["per_kind"] = {}
    for index, kind in enumerate(kinds):
        one_hot = [int(i == index) for i in range(len(kinds))]
        kind_wall, kind_robust = _composed(wall, one_hot, *pair)
        entry["per_kind"][kind] = _ratios(kind_wall, _composed(cpu, one_hot, *pair)[0], kind_robust)
    return entry


def step_kinds_ab(
    shape: argparse.Namespace, run_dir: str, *, rounds: int, names: list[str]
) -> dict[str, Any]:
    """Every step kind of the default cadence for every variant, interleaved, `rounds` rounds.

    Round r runs, for each kind in cadence order, that kind's step of period r + 1 in every
    variant (rotating order, one place per round and kind); period 0 is the untimed warm-up.
    """
    trainers = _trainers(shape, run_dir, names)
    cadence = trainers["default_cadence"].monitor
    offsets, period = kind_offsets(cadence), cadence.config.layer_interval
    for trainer in trainers.values():
        trainer.block(list(offsets.values()))
    times = _no_times(names)
    for round_index in range(rounds):
        steps = [(round_index + 1) * period + offset for offset in offsets.values()]
        orders = [_order(names, shift=round_index + i, reverse=False) for i in range(len(steps))]
        _run_round(trainers, steps, orders, times)
        print(f"  round {round_index + 1}/{rounds}: {_kinds_line(times[0], offsets)}", flush=True)
    counts = {
        name: cadence_counts(trainer.monitor or cadence, period)
        for name, trainer in trainers.items()
    }
    for trainer in trainers.values():
        trainer.close()
    return _kinds_result(times, counts, offsets, period)


def _kinds_line(wall: dict[str, list[list[float]]], offsets: dict[str, int]) -> str:
    """This round's per-kind ratios to plain, e.g. `fully_logged 1.050/1.048/1.051/1.049`."""
    plain = wall["plain"][-1]
    ratios = {
        name: "/".join(f"{t / p:.3f}" for t, p in zip(times[-1], plain, strict=True))
        for name, times in wall.items()
        if name != "plain"
    }
    return ", ".join(f"{name} {line}" for name, line in ratios.items()) + f" ({'/'.join(offsets)})"


def _kinds_result(
    times: Times,
    counts: dict[str, dict[str, int]],
    offsets: dict[str, int],
    period: int,
) -> dict[str, Any]:
    """Raw per-kind times, and every comparison composed with the measured variant's counts."""
    wall, cpu = times
    kinds = list(offsets)
    result: dict[str, Any] = {
        "method": "composed_from_step_kinds",
        "rounds": len(wall["plain"]),
        "period_steps": period,
        "step_kinds": offsets,
        "median_step_s_plain": statistics.median(s for r in wall["plain"] for s in r),
        "step_s": {
            name: {
                kind: {
                    "wall": [r[i] for r in wall[name]],
                    "cpu": [r[i] for r in cpu[name]],
                }
                for i, kind in enumerate(kinds)
            }
            for name in wall
        },
    }
    for name, measured, baseline in _comparisons(list(wall)):
        result[name] = _composed_entry(times, counts[measured], kinds, (measured, baseline))
    return result


def production_shape(args: argparse.Namespace) -> dict[str, int]:
    """The production-like shape of this run (`--production-hidden` and the like)."""
    return {name: getattr(args, f"production_{name}") for name in PRODUCTION}


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
        entry: dict[str, Any] = {"median_step_s_plain": timing["median_step_s_plain"]}
        for variant in variants()[1:]:
            entry[variant] = timing[variant]
        if "guard" in timing:
            entry["guard"] = timing["guard"]
        _add_memory(entry, args, shape, "small")
        by_layers[str(layers)] = entry
        _print_size(f"{layers} layers", entry)
    return by_layers


def _add_memory(
    entry: dict[str, Any], args: argparse.Namespace, shape: argparse.Namespace, size: str
) -> None:
    """Every variant's peak memory (own subprocesses) into `entry`, unless `--no-memory`."""
    if args.no_memory:
        return
    memory = peak_memory(_shape_argv(shape), size)
    for variant in variants()[1:]:
        entry[variant] = {**entry[variant], **memory[variant]}
    entry["memory"] = memory["by_variant"]


def measure_production(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """The production-like shape: each step kind A/B, interleaved; the cadences composed."""
    fields = production_shape(args)
    shape = _shape(args, **fields)
    timing = step_kinds_ab(
        shape, f"{run_dir}/production", rounds=args.production_rounds, names=variants()
    )
    entry: dict[str, Any] = {"shape": fields, **timing}
    _add_memory(entry, args, shape, "production")
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


def breakdown_production(args: argparse.Namespace, run_dir: str) -> dict[str, Any]:
    """The breakdown at the production-like shape: single-step interleaved A/B rounds."""
    fields = production_shape(args)
    names = ["plain", *BREAKDOWN]
    timing = interleaved(
        _shape(args, **fields),
        f"{run_dir}/breakdown_production",
        steps=[1],
        rounds=args.production_rounds,
        names=names,
    )
    for name in names[1:]:
        ratio = timing[name]["median_wall_time_ratio"]
        print(f"production shape, {name}: {ratio:.4f}x wall", flush=True)
    return {"shape": fields, "variants": BREAKDOWN, **timing}


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
    parser.add_argument("--no-small", action="store_true", help="skip the small model sizes")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--probe-repetitions", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a busy CPU)")
    _add_production_flags(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--breakdown",
        type=int,
        metavar="LAYERS",
        help="only the breakdown of a fully logged step at LAYERS layers (its own output file)",
    )
    mode.add_argument(
        "--breakdown-production",
        action="store_true",
        help="only the breakdown at the production-like shape (its own output file)",
    )
    parser.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="small", help=argparse.SUPPRESS)
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "monitor_overhead.json")
    )
    return parser


def _add_production_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--production-rounds", type=int, default=6, help="rounds at the production-like shape"
    )
    parser.add_argument("--no-production", action="store_true", help="skip the 1024 shape")
    for name, value in PRODUCTION.items():
        parser.add_argument(
            f"--production-{name}",
            type=int,
            default=value,
            help=f"{name} of the production-like shape (default {value})",
        )


def _fast_checksum() -> bool:
    from megatron_gate.monitor.sinks.tensorboard import use_fast_checksum

    return use_fast_checksum()


def _setup(args: argparse.Namespace) -> None:
    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)
    torch.set_num_threads(args.threads)


def _header(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    return {
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup(args)
    if args.memory_child:
        print(json.dumps(memory_child(args, args.memory_child, args.size)))
        return 0
    results = _header(args, argv)
    if args.breakdown or args.breakdown_production:
        with tempfile.TemporaryDirectory() as run_dir:
            if args.breakdown:
                results["breakdown"] = breakdown(args, run_dir)
            else:
                results["breakdown_production"] = breakdown_production(args, run_dir)
        return _write(results, args.output)
    results["probe"] = {
        "training_model": probe_cost(args, args.probe_repetitions),
        "production_shape": probe_cost(
            _shape(args, **production_shape(args)), args.probe_repetitions
        ),
    }
    for name, probe in results["probe"].items():
        print(f"probe / attention forward ({name}): {probe['ratio']:.4f}", flush=True)
    with tempfile.TemporaryDirectory() as run_dir:
        if not args.no_small:
            results["by_layers"] = measure_small(args, run_dir)
        if not args.no_production:
            results["production_shape"] = measure_production(args, run_dir)
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
