"""Transformer Engine backend (GPU only): TE gated layers equal the local ones; BF16 and FP8 run.

Skipped without CUDA (the `gpu` marker); run with `scripts/test.sh -m gpu` on a GPU machine with
`pip install megatron-gate[te]`.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SEQ, BATCH = 32, 2


@pytest.fixture(scope="module")
def cuda_world() -> None:
    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel

    if not dist.is_initialized():
        import os

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
        torch.cuda.set_device(0)
    init_model_parallel()


def _layer(backend: str, granularity: str, **overrides):  # noqa: ANN003, ANN202
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gate.demo.tiny_gpt import tiny_config
    from megatron_gate.spec import gated_gpt_layer_spec

    config = tiny_config(
        num_layers=1,
        hidden_size=128,
        num_attention_heads=8,
        num_query_groups=4,
        use_cpu_initialization=False,
        **overrides,
    )
    torch.manual_seed(0)
    spec = gated_gpt_layer_spec(granularity=granularity, backend=backend)
    return build_module(spec, config=config, layer_number=1).cuda()


@pytest.mark.usefixtures("cuda_world")
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_te_gated_layer_matches_local(granularity: str) -> None:
    te_layer = _layer("te", granularity)
    local_layer = _layer("local", granularity)
    # TE fuses the input layernorm into linear_qkv; map names through the state dict's keys map.
    local_state = local_layer.state_dict()
    te_state = te_layer.state_dict()
    mapped = {}
    for name in te_state:
        local_name = name.replace("self_attention.linear_qkv.layer_norm_", "input_layernorm.")
        local_name = local_name.replace("mlp.linear_fc1.layer_norm_", "pre_mlp_layernorm.")
        if local_name in local_state:
            mapped[name] = local_state[local_name]
    te_layer.load_state_dict(mapped, strict=False)
    hidden = torch.randn(SEQ, BATCH, 128, device="cuda")
    te_out, _ = te_layer(hidden, attention_mask=None)
    local_out, _ = local_layer(hidden, attention_mask=None)
    torch.testing.assert_close(te_out, local_out, atol=2e-3, rtol=2e-3)


@pytest.mark.usefixtures("cuda_world")
def test_headwise_fp8_pads_rows_and_runs() -> None:
    from transformer_engine.common.recipe import DelayedScaling, Format
    from transformer_engine.pytorch import fp8_autocast

    layer = _layer("te", "headwise", fp8="hybrid", params_dtype=torch.bfloat16, bf16=True)
    attention = layer.self_attention
    assert attention.linear_qkv.weight.shape[0] % 16 == 0
    hidden = torch.randn(SEQ, BATCH, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
        output, _ = layer(hidden, attention_mask=None)
    output.float().sum().backward()
    assert torch.isfinite(hidden.grad).all()
