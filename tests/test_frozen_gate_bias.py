"""A checkpoint with non-zero gate-bias rows, loaded into a model whose gate bias is off: one
warning naming the layers (real megatron-core, a one-rank gloo world)."""

from __future__ import annotations

import logging

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_gate.demo.tiny_gpt import build_gpt, random_batch, tiny_config
from megatron_gate.spec import gated_gpt_layer_spec

LOGGER = "megatron_gate.frozen_gate_bias"


def _native_checkpoint(*, gate_bias_value: float) -> dict[str, torch.Tensor]:
    """Megatron's own elementwise `attention_output_gate` GPT with `add_bias_linear`, its gate
    bias rows set to `gate_bias_value` (as if trained)."""
    config = tiny_config(attention_output_gate=True, add_bias_linear=True)
    model = build_gpt(config, get_gpt_layer_local_spec(), vocab_size=64)
    state = model.state_dict()
    for layer in range(config.num_layers):
        bias = state[f"decoder.layers.{layer}.self_attention.linear_qkv.bias"]
        # native rows per query group: [q (hpg * hn) | gate (hpg * hn) | k (hn) | v (hn)]
        groups = bias.view(config.num_query_groups, -1)
        query_rows = config.num_attention_heads // config.num_query_groups * config.kv_channels
        groups[:, query_rows : 2 * query_rows] = gate_bias_value
    return state


def _gated_model_without_gate_bias() -> torch.nn.Module:
    config = tiny_config(add_bias_linear=True)
    spec = gated_gpt_layer_spec(granularity="elementwise", backend="local", gate_bias=False)
    return build_gpt(config, spec, vocab_size=64)


def _forward(model: torch.nn.Module) -> torch.Tensor:
    loss = model(**random_batch(batch=2, seq_len=8, vocab_size=64)).mean()
    loss.backward()
    return loss


def test_non_zero_frozen_gate_bias_warns_once_naming_the_layers(
    megatron_world: None, caplog: pytest.LogCaptureFixture
) -> None:
    model = _gated_model_without_gate_bias()
    model.load_state_dict(_native_checkpoint(gate_bias_value=0.5))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _forward(model)
        _forward(model)
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1, warnings
    assert "non-zero gate-bias rows in linear_qkv of layers 1, 2" in warnings[0]
    assert "--gate-bias" in warnings[0]
    # What the warning says: the biases are used (non-zero) but receive no gradient.
    attention = model.decoder.layers[0].self_attention
    gate_rows = attention._segment_mask("gate")
    assert bool((attention.linear_qkv.bias.detach()[gate_rows] == 0.5).all())
    assert attention.linear_qkv.bias.grad[gate_rows].abs().sum() == 0


def test_zero_gate_bias_rows_load_silently(
    megatron_world: None, caplog: pytest.LogCaptureFixture
) -> None:
    model = _gated_model_without_gate_bias()
    model.load_state_dict(_native_checkpoint(gate_bias_value=0.0))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _forward(model)
    assert not [r for r in caplog.records if r.name == LOGGER]
