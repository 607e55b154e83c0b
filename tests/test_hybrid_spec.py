"""HybridModel with gated attention layers (`*` in the layer pattern) on the CPU, gloo.

Built from `megatron_gate.hybrid_spec`; one 2-process launch checks TP=2 against TP=1 given the
same full weights, for both granularities. Mamba (`M`) and Gated DeltaNet (`G`) layers need CUDA
kernels (mamba_ssm / causal_conv1d, Triton), so only their specs are checked here.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core.models.hybrid", reason="HybridModel needs megatron-core >= 0.19")

from megatron.core.models.hybrid.hybrid_model import HybridModel  # noqa: E402

from megatron_gate.attention import GatedSelfAttention  # noqa: E402
from megatron_gate.config import GateConfig  # noqa: E402
from megatron_gate.demo.tiny_gpt import random_batch, tiny_config  # noqa: E402
from megatron_gate.distributed import init_model_parallel, launch  # noqa: E402
from megatron_gate.hybrid_spec import gate_hybrid_stack_spec, local_hybrid_stack_spec  # noqa: E402

SEQ, BATCH, VOCAB = 16, 2, 128
PATTERNS = ("*-*-", "**--", "-*-*", "*")


def _build(pattern: str, granularity: str | None) -> HybridModel:
    spec = local_hybrid_stack_spec()
    if granularity is not None:
        spec = gate_hybrid_stack_spec(spec, GateConfig(granularity=granularity))
    return HybridModel(
        config=tiny_config(num_layers=len(pattern), normalization="RMSNorm"),
        hybrid_stack_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        hybrid_layer_pattern=pattern,
        position_embedding_type="rope",
    )


def _batch() -> dict[str, torch.Tensor]:
    return random_batch(batch=BATCH, seq_len=SEQ, vocab_size=VOCAB, seed=3)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("granularity", ["headwise", "elementwise"])
def test_attention_layers_of_the_pattern_are_gated(
    megatron_world: None, pattern: str, granularity: str
) -> None:
    torch.manual_seed(0)
    model = _build(pattern, granularity)
    gated = {m.layer_number for m in model.modules() if isinstance(m, GatedSelfAttention)}
    assert gated == {i + 1 for i, symbol in enumerate(pattern) if symbol == "*"}
    loss = model(**_batch()).mean()
    loss.backward()
    assert torch.isfinite(loss)
    # The gate rows get gradients: the gate is in the forward pass.
    for module in model.modules():
        if isinstance(module, GatedSelfAttention):
            gate_rows = module.qkv_layout.split_weight(module.linear_qkv.weight.grad)["gate"]
            assert gate_rows.abs().sum() > 0


def test_only_attention_layers_change(megatron_world: None) -> None:
    """MLP layers, embeddings and norms keep their parameters; qkv grows by the gate rows."""
    plain = {n: p.shape for n, p in _build("*-*-", None).named_parameters()}
    gated = {n: p.shape for n, p in _build("*-*-", "headwise").named_parameters()}
    assert plain.keys() == gated.keys()
    changed = sorted(n for n in plain if plain[n] != gated[n])
    assert changed == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in (0, 2)]
    heads = tiny_config().num_attention_heads
    assert gated[changed[0]][0] == plain[changed[0]][0] + heads  # one row per head


def test_mamba_and_gated_deltanet_layers_are_left_alone() -> None:
    from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

    gated = gate_hybrid_stack_spec(hybrid_stack_spec, GateConfig(granularity="headwise"))
    for name in ("mamba_layer", "gdn_layer", "mla_layer", "dsa_layer", "mlp_layer", "moe_layer"):
        assert getattr(gated.submodules, name) is getattr(hybrid_stack_spec.submodules, name)
    attention = gated.submodules.attention_layer.submodules.self_attention
    assert attention.module is GatedSelfAttention
    assert hybrid_stack_spec.submodules.attention_layer.submodules.self_attention.module is not (
        GatedSelfAttention
    )  # the input spec is not modified


def _shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    return full.chunk(tp_size, dim=param.partition_dim)[
        parallel_state.get_tensor_model_parallel_rank()
    ]


def _compare(granularity: str) -> dict[str, float]:
    init_model_parallel(tp=1, seed=5)
    reference = _build("*-*-", granularity)
    ref_loss = reference(**_batch()).mean()
    ref_loss.backward()
    init_model_parallel(tp=2, seed=6)
    model = _build("*-*-", granularity)
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_shard(full[name].detach(), param))
    loss = model(**_batch()).mean()
    loss.backward()
    grad_diff = max(
        (param.grad - _shard(full[name].grad, param)).abs().max().item()
        for name, param in model.named_parameters()
    )
    return {"loss": loss.item(), "reference": ref_loss.item(), "grad_diff": grad_diff}


def _tp_worker(_rank: int, _world: int, granularities: list[str]) -> dict[str, dict[str, float]]:
    return {granularity: _compare(granularity) for granularity in granularities}


def test_tensor_parallel_2_equals_1_given_the_same_weights() -> None:
    results = launch(_tp_worker, world_size=2, payload=["headwise", "elementwise"])
    for rank_result in results:
        for granularity, result in rank_result.items():
            assert result["loss"] == pytest.approx(result["reference"], abs=1e-5), granularity
            assert result["grad_diff"] < 1e-4, granularity
