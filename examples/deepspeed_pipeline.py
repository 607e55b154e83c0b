"""A GPT with gated attention as a DeepSpeed pipeline, with the stability monitor on its engine.

    deepspeed --num_gpus 8 examples/deepspeed_pipeline.py --stages 4 \
        --deepspeed_config examples/deepspeed_pipeline.json
    # CPU try-out (2 processes, gloo):
    torchrun --nproc-per-node 2 examples/deepspeed_pipeline.py --stages 2 --steps 6 \
        --hidden-size 64 --num-layers 2 --deepspeed_config examples/deepspeed_pipeline.json

The model is a stack of `LayerSpec`s (embedding, gated Megatron-Core transformer layers,
output head); the monitor's config is the `stability_monitor` block of the DeepSpeed config, and
it also writes through DeepSpeed's own monitor backends (here its TensorBoard writer). The data
is a synthetic next-token task; plug in your own iterator of `(tokens, labels)`.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import torch

from megatron_gate.config import GateConfig
from megatron_gate.deepspeed import gated_gpt_pipeline, monitor_engine
from megatron_gate.demo.tiny_gpt import tiny_config
from megatron_gate.distributed import init_model_parallel


def synthetic_batches(micro_batch: int, seq_length: int, vocab: int, seed: int):
    """`(tokens, labels)` micro-batches of a learnable task: each token is the previous + 1."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, vocab, (micro_batch, 1), generator=generator)
        tokens = (start + torch.arange(seq_length + 1)) % vocab
        yield tokens[:, :-1], tokens[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--granularity", choices=("headwise", "elementwise"), default="headwise")
    parser.add_argument("--run-dir", default="runs/deepspeed_pipeline")
    parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    if not torch.cuda.is_available():
        from megatron_gate.cpu import enable_cpu_runtime

        enable_cpu_runtime(training_loop=False)  # DeepSpeed runs the loop, not Megatron-LM
    deepspeed.init_distributed()
    init_model_parallel(tp=1)  # Megatron-Core layers read the tensor-parallel group
    if torch.cuda.is_available():
        torch.cuda.set_device(torch.distributed.get_rank() % torch.cuda.device_count())
    with open(args.deepspeed_config) as file:
        ds_config = json.load(file)
    if not torch.cuda.is_available():  # DeepSpeed's fused Adam needs a GPU
        ds_config["optimizer"]["params"]["torch_adam"] = True

    config = tiny_config(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.heads,
        num_query_groups=args.heads,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    pipeline = gated_gpt_pipeline(
        config,
        vocab_size=args.vocab,
        seq_length=args.seq_length,
        gate=GateConfig(granularity=args.granularity),
        num_stages=args.stages,
    )
    engine, *_ = deepspeed.initialize(
        model=pipeline, model_parameters=pipeline.parameters(), config=ds_config
    )
    monitor = monitor_engine(
        engine, ds_config, run_dir=args.run_dir, sequence_length=args.seq_length
    )
    batches = synthetic_batches(
        engine.train_micro_batch_size_per_gpu(), args.seq_length, args.vocab, seed=1234
    )
    status = "failed"
    try:
        for step in range(1, args.steps + 1):
            loss = engine.train_batch(batches)
            if engine.global_rank == 0 and step % 10 == 0:
                print(f"step {step} loss {float(loss):.4f}", flush=True)
        status = "completed"
    finally:
        monitor.close(status)


if __name__ == "__main__":
    main()
