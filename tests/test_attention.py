"""GatedSelfAttention in one process: native equivalence, parameter counts, gate bias, errors."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_gate.attention import GatedSelfAttention
from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.demo.tiny_gpt import build_gpt, causal_mask, random_batch, tiny_config
from megatron_gate.spec import gated_gpt_layer_spec

pytestmark = pytest.mark.usefixtures("megatron_world")

SEQ, BATCH, VOCAB = 16, 2, 128


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return random_batch(batch=BATCH, seq_len=SEQ, vocab_size=VOCAB, seed=seed)


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**_batch()).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _build(spec, **config_overrides):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    return build_gpt(
        tiny_config(**config_overrides), spec, vocab_size=VOCAB, max_sequence_length=SEQ
    )


@pytest.mark.parametrize("linear_bias", [False, True])
def test_elementwise_equals_megatron_native_gate(linear_bias: bool) -> None:
    # Megatron's native gate inherits add_bias_linear; ours matches it when gate_bias=True.
    native = _build(
        get_gpt_layer_local_spec(), attention_output_gate=True, add_bias_linear=linear_bias
    )
    spec = gated_gpt_layer_spec(granularity="elementwise", backend="local", gate_bias=linear_bias)
    ours = _build(spec, add_bias_linear=linear_bias)
    # Same parameter names and shapes: checkpoints interchange without conversion.
    ours.load_state_dict(native.state_dict(), strict=True)
    native_loss, native_grads = _loss_and_grads(native)
    our_loss, our_grads = _loss_and_grads(ours)
    torch.testing.assert_close(our_loss, native_loss, atol=1e-6, rtol=1e-6)
    assert native_grads.keys() == our_grads.keys()
    for name, grad in native_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def _gate_parameters(config_overrides: dict | None = None, **spec_kwargs) -> int:  # noqa: ANN003
    plain = _build(get_gpt_layer_local_spec(), **(config_overrides or {}))
    gated = _build(gated_gpt_layer_spec(backend="local", **spec_kwargs), **(config_overrides or {}))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(gated) - count(plain)


def test_parameter_counts_of_both_granularities() -> None:
    config = tiny_config()
    layers, hidden, heads = config.num_layers, config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels
    assert _gate_parameters(granularity="elementwise") == layers * hidden * heads * head_dim
    assert _gate_parameters(granularity="headwise") == layers * hidden * heads
    # With linear biases on, the gate rows get bias entries too (frozen at zero unless gate_bias).
    with_bias = _gate_parameters({"add_bias_linear": True}, granularity="headwise")
    assert with_bias == layers * (hidden + 1) * heads


def test_spec_swaps_only_the_attention() -> None:
    plain = get_gpt_layer_local_spec()
    gated = gated_gpt_layer_spec(granularity="headwise", backend="local")
    assert gated.module is plain.module
    assert gated.submodules.self_attention.module is GatedSelfAttention
    assert gated.submodules.self_attention.params["gate_config"].granularity == "headwise"
    for field in dataclasses.fields(plain.submodules):
        if field.name != "self_attention":
            assert _same(
                getattr(gated.submodules, field.name), getattr(plain.submodules, field.name)
            )
    assert gated.submodules.self_attention.submodules == plain.submodules.self_attention.submodules


def _same(left: object, right: object) -> bool:
    """Equality that also sees through functools.partial (0.19 wraps the MLP spec in one)."""
    if isinstance(left, functools.partial) and isinstance(right, functools.partial):
        return (left.func, left.args, left.keywords) == (right.func, right.args, right.keywords)
    return left == right


def test_gate_bias_off_by_default_stays_zero_under_add_bias_linear() -> None:
    model = _build(
        gated_gpt_layer_spec(granularity="headwise", backend="local"), add_bias_linear=True
    )
    attention = model.decoder.layers[0].self_attention
    gate_rows = _gate_row_mask(attention)
    _, grads = _loss_and_grads(model)
    bias_grad = grads["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert torch.all(attention.linear_qkv.bias[gate_rows] == 0)
    assert torch.all(bias_grad[gate_rows] == 0)
    assert bias_grad[~gate_rows].abs().sum() > 0  # q/k/v biases still learn


def test_gate_bias_on_request_learns_even_without_linear_bias() -> None:
    spec = gated_gpt_layer_spec(granularity="headwise", backend="local", gate_bias=True)
    model = _build(spec)
    attention = model.decoder.layers[0].self_attention
    gate_rows = _gate_row_mask(attention)
    _, grads = _loss_and_grads(model)
    bias_grad = grads["decoder.layers.0.self_attention.linear_qkv.bias"]
    assert bias_grad[gate_rows].abs().sum() > 0
    assert torch.all(bias_grad[~gate_rows] == 0)  # q/k/v have no bias in this config


def _gate_row_mask(attention: GatedSelfAttention) -> torch.Tensor:
    rows = torch.arange(attention.qkv_layout.total_rows)
    gate_rows = attention.qkv_layout.split_weight(rows)["gate"].flatten()
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[gate_rows] = True
    return mask


def test_zero_gate_weights_halve_the_attention_output() -> None:
    # Gate logits 0 -> sigmoid 0.5 everywhere: the layer's output halves (retrofit identity).
    spec = gated_gpt_layer_spec(granularity="headwise", backend="local", gate_bias=True)
    attention = _build(spec).decoder.layers[0].self_attention
    gate_rows = _gate_row_mask(attention)
    hidden = torch.randn(SEQ, BATCH, tiny_config().hidden_size)
    with torch.no_grad():
        attention.linear_qkv.weight[gate_rows] = 0
        half_out, _ = attention(hidden, causal_mask(SEQ))
        attention.linear_qkv.bias[gate_rows] = 40.0  # sigmoid(40) == 1 in fp32
        open_out, _ = attention(hidden, causal_mask(SEQ))
    assert open_out.abs().max() > 0
    torch.testing.assert_close(half_out, 0.5 * open_out, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "gate", "message"),
    [
        (
            {"fused_single_qkv_rope": False, "attention_output_gate": True},
            {"granularity": "headwise"},
            "conflicts",
        ),
        (
            {"num_attention_heads": 6, "num_query_groups": 4},
            {},
            "not divisible by num_query_groups",
        ),
    ],
)
def test_bad_model_shapes_raise_before_building(overrides: dict, gate: dict, message: str) -> None:
    spec = gated_gpt_layer_spec(backend="local", **gate)
    with pytest.raises(GateConfigError, match=message):
        _build(spec, **overrides)


def test_bad_gate_config_fields() -> None:
    with pytest.raises(GateConfigError, match="granularity='channel'.*elementwise, headwise"):
        GateConfig(granularity="channel")
    with pytest.raises(GateConfigError, match="backend='cuda'"):
        GateConfig(backend="cuda")
    with pytest.raises(GateConfigError, match="gate_bias"):
        GateConfig(gate_bias="yes")


def test_te_backend_without_te_is_a_clear_error() -> None:
    with pytest.raises(GateConfigError, match="Transformer Engine cannot be imported"):
        gated_gpt_layer_spec(backend="te")


def test_mla_and_cross_attention_cannot_be_gated() -> None:
    from megatron_gate.spec import gate_spec

    with pytest.raises(GateConfigError, match="MLA"):
        gated_gpt_layer_spec(multi_latent_attention=True)
    mla_spec = get_gpt_layer_local_spec(multi_latent_attention=True)
    with pytest.raises(GateConfigError, match="cannot be gated"):
        gate_spec(mla_spec)
