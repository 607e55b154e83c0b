"""Forward+backward time of one transformer layer: no gate vs Megatron's native gate vs ours.

    .venv/bin/python bench/gate_overhead.py [--repeats 30] [--shapes cpu,large]

Variants are timed interleaved in one run (round-robin, median over repeats) so machine noise hits
them alike; results are ratios to the no-gate baseline, next to the theoretical FLOP ratio.
Writes bench/results/gate_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gate_overhead.json"


@dataclass(frozen=True)
class Shape:
    """One benchmarked layer shape."""

    name: str
    hidden: int
    heads: int
    groups: int
    seq: int
    batch: int


SHAPES = {
    "cpu": Shape("cpu", hidden=512, heads=8, groups=8, seq=256, batch=4),
    "large": Shape("large", hidden=1024, heads=16, groups=4, seq=512, batch=2),
}
VARIANTS = ("no_gate", "native_elementwise", "ours_headwise", "ours_elementwise")


def layer_flops(shape: Shape, gate_rows_per_head: int) -> float:
    """Forward matmul FLOPs of one layer (backward is ~2x forward for every term alike)."""
    tokens = shape.seq * shape.batch
    head_dim = shape.hidden // shape.heads
    qkv_rows = shape.hidden + 2 * shape.groups * head_dim + shape.heads * gate_rows_per_head
    projections = 2 * tokens * shape.hidden * (qkv_rows + shape.hidden)
    attention = 2 * 2 * shape.batch * shape.heads * shape.seq * shape.seq * head_dim
    mlp = 2 * 2 * tokens * shape.hidden * 4 * shape.hidden
    return float(projections + attention + mlp)


def build_layer(shape: Shape, variant: str) -> torch.nn.Module:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gate.demo.tiny_gpt import tiny_config
    from megatron_gate.spec import gated_gpt_layer_spec

    config = tiny_config(
        num_layers=1,
        hidden_size=shape.hidden,
        num_attention_heads=shape.heads,
        num_query_groups=shape.groups,
        attention_output_gate=variant == "native_elementwise",
    )
    if variant.startswith("ours_"):
        spec = gated_gpt_layer_spec(granularity=variant.removeprefix("ours_"), backend="local")
    else:
        spec = get_gpt_layer_local_spec()
    torch.manual_seed(0)
    return build_module(spec, config=config, layer_number=1)


def step_fn(layer: torch.nn.Module, shape: Shape) -> Callable[[], None]:
    from megatron_gate.demo.tiny_gpt import causal_mask

    hidden = torch.randn(shape.seq, shape.batch, shape.hidden, requires_grad=True)
    mask = causal_mask(shape.seq)

    def step() -> None:
        output, _ = layer(hidden, attention_mask=mask)
        output.float().square().mean().backward()

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed round-robin after a warm-up."""
    for step in steps.values():
        step()
        step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_shape(shape: Shape, repeats: int) -> dict[str, Any]:
    steps = {variant: step_fn(build_layer(shape, variant), shape) for variant in VARIANTS}
    seconds = time_interleaved(steps, repeats)
    head_dim = shape.hidden // shape.heads
    gate_rows = {"no_gate": 0, "native_elementwise": head_dim, "ours_elementwise": head_dim}
    gate_rows["ours_headwise"] = 1
    base_flops = layer_flops(shape, 0)
    return {
        "shape": shape.__dict__,
        "median_seconds": seconds,
        "ratio_to_no_gate": {v: seconds[v] / seconds["no_gate"] for v in VARIANTS},
        "flop_ratio": {v: layer_flops(shape, gate_rows[v]) / base_flops for v in VARIANTS},
    }


def environment() -> dict[str, str]:
    from megatron_gate.info import environment as info

    return {**info(), "threads": str(torch.get_num_threads()), "cpu_count": str(os.cpu_count())}


def print_table(results: dict[str, Any]) -> None:
    print(f"{'shape':6} {'variant':20} {'median ms':>10} {'ratio':>7} {'FLOP ratio':>11}")
    for name, result in results["shapes"].items():
        for variant in VARIANTS:
            print(
                f"{name:6} {variant:20} {1e3 * result['median_seconds'][variant]:10.2f} "
                f"{result['ratio_to_no_gate'][variant]:7.3f} {result['flop_ratio'][variant]:11.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--shapes", default="cpu,large", help=f"comma list of {', '.join(SHAPES)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"--shapes: unknown {sorted(unknown)}; choose from {', '.join(SHAPES)}")

    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    init_process_group(0, 1, free_port())
    init_model_parallel()
    results = {
        "command": "python bench/gate_overhead.py " + " ".join(argv or sys.argv[1:]),
        "environment": environment(),
        "platform": platform.platform(),
        "repeats": args.repeats,
        "shapes": {
            name: bench_shape(SHAPES[name], args.repeats) for name in args.shapes.split(",")
        },
    }
    dist.destroy_process_group()
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
