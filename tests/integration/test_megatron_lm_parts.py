"""The pieces of the Megatron-LM integration on their own (no training run): the spec swap on
Megatron's real specs, the start-up report, the loss read from Megatron's schedule output, the
DeepSpeed config block."""

from __future__ import annotations

import argparse

import pytest
import torch
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_gate.attention import GatedSelfAttention
from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.deepspeed.engine_monitor import monitor_config_from
from megatron_gate.megatron_lm.arguments import (
    add_megatron_gate_args,
    chain_args_providers,
    check_spec_importable,
    gate_config_from_args,
    gating_requested,
)
from megatron_gate.megatron_lm.monitor_hooks import local_loss
from megatron_gate.megatron_lm.spec_swap import gate_layer_spec
from megatron_gate.megatron_lm.startup import (
    GateReport,
    merge_reports,
    missing_gate_message,
    startup_line,
)
from megatron_gate.spec import gate_spec

HEADWISE = GateConfig(granularity="headwise")


def _attention_modules(spec) -> list[type]:
    layers = getattr(spec, "layer_specs", None) or [spec]
    return [layer.submodules.self_attention.module for layer in layers]


def test_swap_gates_a_layer_spec_and_keeps_the_rest() -> None:
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=True)
    gated = gate_layer_spec(spec, HEADWISE)
    assert _attention_modules(gated) == [GatedSelfAttention]
    assert gated.submodules.self_attention.params["gate_config"] == HEADWISE
    # Everything but the attention module is Megatron's spec as it was (qk-layernorm included).
    assert gated.submodules.mlp == spec.submodules.mlp
    assert gated.submodules.self_attention.submodules == spec.submodules.self_attention.submodules


def test_swap_gates_a_bare_block_spec() -> None:
    layer = gpt_layer_specs.get_gpt_layer_local_spec()
    block = TransformerBlockSubmodules(layer_specs=[layer, layer])
    assert _attention_modules(gate_layer_spec(block, HEADWISE)) == [GatedSelfAttention] * 2


def test_swap_keeps_a_spec_gated_the_same_way_and_refuses_another() -> None:
    spec = gate_spec(
        gpt_layer_specs.get_gpt_layer_local_spec(), GateConfig(granularity="elementwise")
    )
    kept = gate_layer_spec(spec, GateConfig(granularity="elementwise"))
    assert kept.submodules.self_attention.params["gate_config"].granularity == "elementwise"
    with pytest.raises(GateConfigError, match="conflicts with a spec that is already gated"):
        gate_layer_spec(spec, HEADWISE)


def test_flags_in_a_megatron_style_parser() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--spec", nargs="*", default=None)

    def their_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser.add_argument("--their-flag", type=int)
        return parser

    parser = add_megatron_gate_args(chain_args_providers(their_provider)(parser))  # added once
    args = parser.parse_args(["--gated-attention", "headwise", "--gate-bias", "--their-flag", "3"])
    assert gate_config_from_args(args) == GateConfig(granularity="headwise", gate_bias=True)
    assert args.their_flag == 3
    assert gating_requested(parser.parse_args(["--spec", "megatron_gate.spec", "headwise"]))
    assert not gating_requested(parser.parse_args([]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            ["megatron_gate.specs", "headwise_spec"],
            "module 'megatron_gate.specs' cannot be imported",
        ),
        (["megatron_gate.spec", "headwise_specs"], "megatron_gate.spec has no spec 'headwise_specs'"),
        (["megatron_gate.spec"], "expected MODULE NAME"),
    ],
)
def test_spec_that_megatron_would_silently_drop(spec: list[str], message: str) -> None:
    with pytest.raises(GateConfigError, match=message):
        check_spec_importable(argparse.Namespace(spec=spec))
    check_spec_importable(argparse.Namespace(spec=["megatron_gate.spec", "headwise_spec"]))
    check_spec_importable(argparse.Namespace(spec=["local"]))


def test_report_across_pipeline_stages_and_the_start_up_line() -> None:
    stage_0 = GateReport(attention_layers=(1, 2), gated_layers=(1, 2), granularities=("headwise",),
                         backends=("local",))  # fmt: skip
    stage_1 = GateReport(attention_layers=(3, 4, 5), gated_layers=(3, 4), granularities=("headwise",),
                         backends=("local",))  # fmt: skip
    report = merge_reports([stage_0, stage_0, stage_1], {"TP": 2, "PP": 2})
    line = startup_line(report, monitor_sinks=["jsonl", "tensorboard"])
    assert line == (
        "megatron-gate: gated attention on layers 1-4 of 5 (not gated: 5) | granularity "
        "headwise | backend local | TP=2 PP=2 | monitor sinks: jsonl, tensorboard"
    )
    assert missing_gate_message(report, requested="--gated-attention headwise") is None
    ungated = merge_reports([GateReport(attention_layers=(1, 2))], {})
    message = missing_gate_message(ungated, requested="--gated-attention headwise")
    assert "no GatedSelfAttention layer (2 self-attention layers, none gated)" in message
    assert "monitor sinks: off" in startup_line(ungated, monitor_sinks=[])


def test_local_loss_from_both_report_formats() -> None:
    sums = [{"lm loss": torch.tensor([6.0, 3.0])}, {"lm loss": torch.tensor([2.0, 1.0])}]
    assert float(local_loss(sums)) == pytest.approx(8.0 / 4.0)  # token-weighted (0.19)
    means = [{"lm loss": torch.tensor(2.0)}, {"lm loss": torch.tensor(4.0)}]
    assert float(local_loss(means)) == pytest.approx(3.0)  # per-microbatch means (older)
    assert local_loss([]) is None  # a pipeline stage without the loss


def test_monitor_config_from_a_deepspeed_config_block() -> None:
    ds_config = {
        "train_batch_size": 8,
        "stability_monitor": {"log_interval": 5, "layer_interval": 10},
    }
    assert monitor_config_from(ds_config).log_interval == 5
    assert monitor_config_from({"train_batch_size": 8}).log_interval == 10  # defaults
    assert monitor_config_from({"log_interval": 2, "layer_interval": 4}).layer_interval == 4
