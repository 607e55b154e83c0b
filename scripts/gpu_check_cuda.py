"""The CUDA checks of `scripts/gpu_check.sh` (local backend; no Transformer Engine needed).

    python scripts/gpu_check_cuda.py correctness --out DIR   # gate in BF16 vs an fp32 reference
    python scripts/gpu_check_cuda.py guard --out DIR         # tiny GPT + monitor + guard: no host
                                                             # sync on unlogged steps
    python scripts/gpu_check_cuda.py gate-bench --out DIR    # one layer at a production shape,
                                                             # CUDA events, BF16
Each writes DIR/<check>.json. `--device cpu --small` runs the same code on a CPU (CI's smoke
test: there is no sync check without CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

PRODUCTION = {"hidden": 4096, "heads": 32, "groups": 8, "seq": 4096, "batch": 1}
SMALL = {"hidden": 64, "heads": 4, "groups": 2, "seq": 32, "batch": 2}
GRANULARITIES = ("headwise", "elementwise")


def _setup(device: str) -> None:
    """One rank: gloo on a CPU, NCCL on a GPU (no collective then touches the host)."""
    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    if device == "cpu":
        init_process_group(0, 1, free_port())
    else:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", rank=0, world_size=1)
    init_model_parallel(tp=1, pp=1)


def _layer(shape: dict[str, int], variant: str, device: str, dtype: torch.dtype) -> Any:
    from gate_overhead import Shape, build_layer

    return build_layer(Shape("check", **shape), variant).to(device=device, dtype=dtype)


def _layer_output(layer: Any, hidden: torch.Tensor) -> torch.Tensor:
    from megatron_gate.demo.tiny_gpt import causal_mask

    output, _ = layer(hidden, attention_mask=causal_mask(hidden.size(0)).to(hidden.device))
    return output


def correctness(args: argparse.Namespace) -> dict[str, Any]:
    """Each granularity's layer in BF16 against the same weights in fp32."""
    shape = SMALL if args.small else {**PRODUCTION, "seq": 1024}
    results = {}
    for granularity in GRANULARITIES:
        reference = _layer(shape, f"ours_{granularity}", args.device, torch.float32)
        low = _layer(shape, f"ours_{granularity}", args.device, torch.bfloat16)
        low.load_state_dict(reference.state_dict())  # copy_ casts to BF16
        torch.manual_seed(1)
        hidden = torch.randn(shape["seq"], shape["batch"], shape["hidden"], device=args.device)
        with torch.no_grad():
            expected = _layer_output(reference, hidden)
            got = _layer_output(low, hidden.to(torch.bfloat16)).float()
        error = ((got - expected).norm() / expected.norm()).item()
        results[granularity] = {"relative_error": error, "passed": error < 2e-2}
    return {"shape": shape, "bf16_vs_fp32": results,
            "passed": all(r["passed"] for r in results.values())}  # fmt: skip


@contextlib.contextmanager
def _no_host_sync(device: str) -> Iterator[None]:
    """`torch.cuda.set_sync_debug_mode("error")`: any host synchronisation raises."""
    if device != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def guard(args: argparse.Namespace) -> dict[str, Any]:
    """A few training steps of the tiny GPT with the monitor and its guard on the device."""
    from megatron_gate.demo.tiny_gpt import build_gpt, random_batch, tiny_config
    from megatron_gate.monitor import MonitorConfig, StabilityMonitor
    from megatron_gate.spec import gated_gpt_layer_spec

    model = build_gpt(tiny_config(), gated_gpt_layer_spec(granularity="headwise", backend="local"),
                      vocab_size=256, max_sequence_length=64).to(args.device)  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = MonitorConfig.from_dict({"log_interval": 5, "layer_interval": 10,
                                      "sinks": {"console": False, "tensorboard": False},
                                      "guard": {"skip_mode": "device"}})  # fmt: skip
    monitor = StabilityMonitor(config, models=model, run_dir=Path(args.out) / "guard_run",
                               optimizer=optimizer)  # fmt: skip
    batch = {k: v.to(args.device) for k, v in random_batch(batch=2, seq_len=32, vocab_size=256,
                                                           seed=0).items()}  # fmt: skip
    unlogged = 0
    for step in range(1, args.steps + 1):
        monitor.start_step(step)
        loss = model(**batch).float().mean()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        logged = monitor.is_log_step(step) or monitor.measures_update(step)
        with contextlib.nullcontext() if logged else _no_host_sync(args.device):
            decision = monitor.end_step(step, loss=loss.detach(), grad_norm=grad_norm)
            monitor.step_optimizer(optimizer, decision)
        unlogged += not logged
        optimizer.zero_grad(set_to_none=True)
    monitor.close()
    return {"steps": args.steps, "unlogged_steps_without_host_sync": unlogged,
            "sync_check": args.device == "cuda", "final_loss": loss.item(), "passed": True}  # fmt: skip


def _cuda_event_ms(step: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of `step`, from CUDA events (host time on a CPU)."""
    import time

    samples = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def gate_bench(args: argparse.Namespace) -> dict[str, Any]:
    """bench/gate_overhead.py's four variants at a production shape in BF16, interleaved."""
    from gate_overhead import VARIANTS, Shape, layer_flops

    shape = SMALL if args.small else PRODUCTION
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hidden = torch.randn(shape["seq"], shape["batch"], shape["hidden"], device=args.device,
                         dtype=dtype, requires_grad=True)  # fmt: skip

    def step_of(layer: Any) -> Callable[[], None]:
        return lambda: _layer_output(layer, hidden).float().square().mean().backward()

    steps = {v: step_of(_layer(shape, v, args.device, dtype)) for v in VARIANTS}
    for step in steps.values():  # warm-up
        step()
    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant, step in steps.items():
            rounds[variant].append(_cuda_event_ms(step, 1))
    median = {v: statistics.median(ms) for v, ms in rounds.items()}
    head_dim = shape["hidden"] // shape["heads"]
    rows = {"no_gate": 0, "native_elementwise": head_dim, "ours_headwise": 1,
            "ours_elementwise": head_dim}  # fmt: skip
    flops = {v: layer_flops(Shape("x", **shape), rows[v]) for v in VARIANTS}
    return {"shape": shape, "dtype": str(dtype), "median_ms": median,
            "ratio_to_no_gate": {v: median[v] / median["no_gate"] for v in VARIANTS},
            "flop_ratio": {v: flops[v] / flops["no_gate"] for v in VARIANTS},
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}  # fmt: skip


CHECKS = {"correctness": correctness, "guard": guard, "gate-bench": gate_bench}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke test)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    _setup(args.device)
    result = CHECKS[args.check](args)
    path = Path(args.out) / f"{args.check.replace('-', '_')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.check}: {json.dumps(result)}")
    return 0 if result.get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
