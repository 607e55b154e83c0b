"""Real loss traces for bench/spike_detection.py: the demo's tiny Megatron-Core GPT, with faults.

    .venv/bin/python bench/spike_traces.py [--only NAME]    # writes bench/results/traces/*.json

A plain loop (AdamW, warm-up + cosine, the demo's byte-level corpus) records every step's loss,
grad norm, update norm (||params after - params before||) and a NaN/Inf flag. A fault run injects
one fault at a known step, the ground truth:

- corrupted_batch: uniformly random tokens for one step;
- repeated_batch: the same batch for `REPEAT` steps (the loss falls, then jumps back);
- lr_jump: the learning rate x20 for 10 steps;
- scaled_weight: one layer's MLP input weight x8, once;
- bitflip_weight: the top exponent bit of one attention weight flipped (x2^128), once;
- nan_batch: a NaN loss (NaN gradients) for one step; the update is skipped, as the guard does.

Healthy runs (no fault) of several sizes and learning rates give the false-alarm rate. Each trace
is a small JSON file; the benchmark reads them and only regenerates the missing ones.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TRACES = Path(__file__).resolve().parent / "results" / "traces"
REPEAT = 8
SEQ_LEN, BATCH = 32, 4  # small: the traces are generated on a shared 2-core CPU


@dataclass(frozen=True, kw_only=True)
class TraceRun:
    """One traced run: model size, learning rate, seed, and the fault (None: healthy)."""

    name: str
    layers: int = 2
    hidden: int = 32
    lr: float = 3e-3
    steps: int = 800
    seed: int = 0
    fault: str | None = None
    fault_step: int = 0


def plan() -> list[TraceRun]:
    """The traced runs: each fault once, then healthy runs of two sizes and learning rates.

    Short, because a step of even this tiny model costs ~0.4 CPU s on the shared build machine.
    """
    faults = ["corrupted_batch", "nan_batch", "lr_jump", "scaled_weight", "bitflip_weight",
              "repeated_batch"]  # fmt: skip
    runs = [
        TraceRun(name=f"{fault}_s{10 + index}", seed=10 + index, steps=260, fault=fault,
                 fault_step=200 + 5 * index)
        for index, fault in enumerate(faults)
    ]  # fmt: skip
    return runs + [
        TraceRun(name="healthy_l2_h32_lr3e-3", steps=500),
        TraceRun(name="healthy_l3_h64_lr1e-2", layers=3, hidden=64, lr=1e-2, steps=500, seed=1),
        TraceRun(name="healthy_l2_h64_lr3e-3", hidden=64, steps=800, seed=2),
        TraceRun(name="healthy_l2_h32_lr2e-2", lr=2e-2, steps=800, seed=3),
    ]


def _learning_rate(run: TraceRun, step: int) -> float:
    warmup = 30
    if step <= warmup:
        return run.lr * step / warmup
    progress = (step - warmup) / max(1, run.steps - warmup)
    return run.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _flip_bit(tensor: torch.Tensor, index: int, bit: int) -> None:
    """Flip bit `bit` of the float32 element `index` of `tensor` (in place)."""
    flat = tensor.data.view(-1)
    (as_int,) = struct.unpack("<I", struct.pack("<f", float(flat[index])))
    (flipped,) = struct.unpack("<f", struct.pack("<I", as_int ^ (1 << bit)))
    flat[index] = flipped


def _inject_weight_fault(model: torch.nn.Module, fault: str) -> None:
    layer = model.decoder.layers[0]
    with torch.no_grad():
        if fault == "scaled_weight":
            layer.mlp.linear_fc1.weight.mul_(8.0)
        else:
            weight = layer.self_attention.linear_qkv.weight
            _flip_bit(weight, weight.numel() // 3, 30)


def trace(run: TraceRun) -> dict:
    """Train `run` and return its per-step scalars and labels."""
    from megatron_gate.demo.data import BatchSampler, embedded_corpus
    from megatron_gate.demo.trainer import (
        VARIANTS,
        TrainConfig,
        build_model,
        build_optimizer,
        grad_norm,
        token_loss,
    )

    corpus = embedded_corpus()
    config = TrainConfig(layers=run.layers, hidden=run.hidden, lr=run.lr, steps=run.steps,
                         seq_len=SEQ_LEN, batch_size=BATCH, seed=run.seed)  # fmt: skip
    model = build_model(config, VARIANTS["baseline"], vocab_size=corpus.vocab_size,
                        device=torch.device("cpu"))  # fmt: skip
    optimizer = build_optimizer(model, config)
    batches = BatchSampler(corpus.train, seq_len=SEQ_LEN, batch_size=BATCH, seed=run.seed)
    noise = torch.Generator().manual_seed(run.seed)
    scalars: dict[str, list[float | None]] = {"loss": [], "grad_norm": [], "update_norm": [],
                                              "learning_rate": [], "nan_or_inf": []}  # fmt: skip
    repeated = None
    started = time.time()
    for step in range(1, run.steps + 1):
        if step % 100 == 0:
            print(f"  {run.name} step {step}: {time.time() - started:.0f} s", file=sys.stderr)
        lr = _learning_rate(run, step)
        if run.fault == "lr_jump" and run.fault_step <= step < run.fault_step + 10:
            lr *= 20
        for group in optimizer.param_groups:
            group["lr"] = lr
        tokens, labels = batches.next()
        if run.fault == "corrupted_batch" and step == run.fault_step:
            tokens = torch.randint(0, corpus.vocab_size, tokens.shape, generator=noise)
            labels = torch.randint(0, corpus.vocab_size, tokens.shape, generator=noise)
        if run.fault == "repeated_batch" and run.fault_step <= step < run.fault_step + REPEAT:
            repeated = repeated or (tokens, labels)
            tokens, labels = repeated
        if run.fault in ("scaled_weight", "bitflip_weight") and step == run.fault_step:
            _inject_weight_fault(model, run.fault)
        loss = token_loss(model, tokens, labels)
        if run.fault == "nan_batch" and step == run.fault_step:
            loss = loss * float("nan")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(grad_norm(model))
        value = float(loss.detach())
        finite = math.isfinite(value) and math.isfinite(norm)
        before = [p.detach().clone() for p in model.parameters()]
        if finite:  # a non-finite step is skipped (the guard's behaviour)
            optimizer.step()
        update = math.sqrt(sum(float((p.detach() - b).pow(2).sum())
                               for p, b in zip(model.parameters(), before, strict=True)))  # fmt: skip
        for name, item in (
            ("loss", value),
            ("grad_norm", norm),
            ("update_norm", update),
            ("learning_rate", lr),
            ("nan_or_inf", 0.0 if finite else 1.0),
        ):
            scalars[name].append(item if math.isfinite(item) else None)  # fmt: skip
    labels_out = []
    if run.fault is not None:
        duration = {"repeated_batch": REPEAT, "lr_jump": 10}.get(run.fault, 1)
        labels_out.append({"step": run.fault_step, "kind": run.fault,
                           "end": run.fault_step + duration - 1})  # fmt: skip
    return {"run": asdict(run), "first_step": 1, "scalars": scalars, "labels": labels_out,
            "benign": []}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="trace only the run of this name")
    parser.add_argument("--force", action="store_true", help="regenerate existing traces")
    args = parser.parse_args()
    from megatron_gate.cpu import enable_cpu_runtime
    from megatron_gate.distributed import free_port, init_process_group

    torch.set_num_threads(1)
    enable_cpu_runtime()
    init_process_group(0, 1, free_port())
    TRACES.mkdir(parents=True, exist_ok=True)
    for run in plan():
        path = TRACES / f"{run.name}.json"
        if (args.only and run.name != args.only) or (path.exists() and not args.force):
            continue
        start = time.process_time()
        data = trace(run)
        data["cpu_seconds"] = round(time.process_time() - start, 1)
        path.write_text(json.dumps(data, separators=(",", ":")))
        print(f"{run.name}: {run.steps} steps, {data['cpu_seconds']} CPU s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
