"""Transformer Engine paths of the gate on a GPU (the `gpu` marker; skipped without CUDA):
BF16 and FP8 against the local layer, packed THD sequences, and, with two or more GPUs, sequence
parallelism and context parallelism 2 against TP=1 / CP=1 given the same weights.

`scripts/gpu_check.sh` runs these (and tests/test_transformer_engine.py) on one GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

SEQ, BATCH, HIDDEN = 64, 2, 128
two_gpus = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 GPUs (one GPU cannot hold two NCCL ranks)"
)


def _nccl_world(rank: int = 0, world_size: int = 1, port: str = "29561") -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size)


@pytest.fixture(scope="module")
def cuda_world() -> None:
    from megatron_gate.distributed import free_port, init_model_parallel

    _nccl_world(port=str(free_port()))
    init_model_parallel()


def _layer(backend: str, granularity: str, **overrides):  # noqa: ANN003, ANN202
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gate.demo.tiny_gpt import tiny_config
    from megatron_gate.spec import gated_gpt_layer_spec

    fields = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=8, num_query_groups=4,
                  use_cpu_initialization=True)  # fmt: skip
    config = tiny_config(**{**fields, **overrides})
    spec = gated_gpt_layer_spec(granularity=granularity, backend=backend)
    return build_module(spec, config=config, layer_number=1).cuda()


def _local_names(name: str) -> str:
    """TE fuses the norms into the next linear: map its names onto the local layer's."""
    name = name.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
    return name.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")


def _te_like_local(granularity: str, **overrides):  # noqa: ANN003, ANN202
    torch.manual_seed(0)
    local = _layer("local", granularity, **overrides)
    te = _layer("te", granularity, **overrides)
    local_state = local.state_dict()
    te.load_state_dict(
        {
            k: local_state[_local_names(k)]
            for k in te.state_dict()
            if _local_names(k) in local_state
        },
        strict=False,
    )
    return te, local


@pytest.mark.usefixtures("cuda_world")
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_bf16_te_equals_local(granularity: str) -> None:
    te, local = _te_like_local(granularity, params_dtype=torch.bfloat16, bf16=True)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(te(hidden, attention_mask=None)[0],
                               local(hidden, attention_mask=None)[0], atol=3e-2, rtol=3e-2)  # fmt: skip


@pytest.mark.usefixtures("cuda_world")
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_fp8_runs_forward_and_backward(granularity: str) -> None:
    from transformer_engine.common.recipe import DelayedScaling, Format
    from transformer_engine.pytorch import fp8_autocast

    layer = _layer("te", granularity, fp8="hybrid", params_dtype=torch.bfloat16, bf16=True)
    rows = layer.self_attention.linear_qkv.weight.shape[0]
    assert rows % 16 == 0  # headwise: padded to FP8's alignment
    hidden = torch.randn(
        SEQ, BATCH, HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    with fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
        output, _ = layer(hidden, attention_mask=None)
    output.float().sum().backward()
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.usefixtures("cuda_world")
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_packed_thd_sequences_equal_separate_ones(granularity: str) -> None:
    """Two sequences packed in one THD batch give the outputs each gives alone."""
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    layer = _layer("te", granularity, params_dtype=torch.bfloat16, bf16=True)
    lengths = (24, 40)
    parts = [torch.randn(n, 1, HIDDEN, device="cuda", dtype=torch.bfloat16) for n in lengths]
    cu_seqlens = torch.tensor([0, lengths[0], sum(lengths)], device="cuda", dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))  # fmt: skip
    together, _ = layer(torch.cat(parts), attention_mask=None, packed_seq_params=packed)
    alone = torch.cat([layer(part, attention_mask=None)[0] for part in parts])
    torch.testing.assert_close(together, alone, atol=3e-2, rtol=3e-2)


def _parallel_worker(rank: int, world: int, port: str, case: str, queue) -> None:  # noqa: ANN001
    from megatron_gate.distributed import init_model_parallel

    _nccl_world(rank, world, port)
    granularity = "headwise"
    overrides = dict(params_dtype=torch.float32)
    init_model_parallel(tp=1, cp=1, seed=3)
    torch.manual_seed(0)
    reference = _layer("te", granularity, **overrides)
    full = {k: v.clone() for k, v in reference.state_dict().items()}
    hidden = torch.randn(SEQ, BATCH, HIDDEN, device="cuda", generator=None)
    torch.distributed.broadcast(hidden, 0)
    expected, _ = reference(hidden, attention_mask=None)
    if case == "sequence_parallel":
        init_model_parallel(tp=world, seed=3)
        layer = _layer("te", granularity, sequence_parallel=True, tensor_model_parallel_size=world,
                       **overrides)  # fmt: skip
        local = hidden.chunk(world)[rank]  # SP: each rank holds a slice of the sequence
        expected_local = expected.chunk(world)[rank]
    else:
        init_model_parallel(cp=world, seed=3)
        layer = _layer("te", granularity, context_parallel_size=world, **overrides)
        # CP: Megatron's load-balanced split, 2 * cp chunks, rank r holds chunks r and 2cp-1-r.
        chunks = hidden.chunk(2 * world)
        local = torch.cat([chunks[rank], chunks[2 * world - 1 - rank]])
        out_chunks = expected.chunk(2 * world)
        expected_local = torch.cat([out_chunks[rank], out_chunks[2 * world - 1 - rank]])
    layer.load_state_dict(_shard_state(full, layer), strict=False)
    output, _ = layer(local, attention_mask=None)
    queue.put((rank, (output - expected_local).abs().max().item()))
    torch.distributed.destroy_process_group()


def _shard_state(full: dict, layer: torch.nn.Module) -> dict:
    from megatron.core import parallel_state

    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())  # fmt: skip
    params = dict(layer.named_parameters())
    state = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is not None and getattr(param, "tensor_model_parallel", False):
            tensor = tensor.chunk(tp, dim=param.partition_dim)[rank]
        state[name] = tensor
    return state


@two_gpus
@pytest.mark.parametrize("case", ["sequence_parallel", "context_parallel"])
def test_parallel_layout_equals_single_gpu(case: str) -> None:
    import torch.multiprocessing as mp

    from megatron_gate.distributed import free_port

    context = mp.get_context("spawn")
    queue, port = context.Queue(), str(free_port())
    processes = [context.Process(target=_parallel_worker, args=(r, 2, port, case, queue))
                 for r in range(2)]  # fmt: skip
    for process in processes:
        process.start()
    try:
        diffs = dict(queue.get(timeout=300) for _ in processes)
    finally:
        for process in processes:  # no rank outlives the test
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert max(diffs.values()) < 2e-3, diffs
