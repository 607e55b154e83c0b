"""Megatron-LM's FLOPs count with the gate (the real `num_floating_point_operations` of the 0.19
wheel, wrapped as `megatron_gate.run` wraps it), checked against a count by hand."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from megatron_gate.megatron_lm.flops import GatedLayers, wrap_num_floating_point_operations

training = pytest.importorskip("megatron.training.training")

LAYERS, HIDDEN, HEADS, GROUPS, VOCAB, SEQ, BATCH = 3, 64, 8, 2, 512, 32, 4
HEAD_DIM = HIDDEN // HEADS


def _args(**overrides: object) -> argparse.Namespace:
    """The arguments Megatron-LM's count reads, for a dense GQA GPT (GELU MLP, 4h)."""
    fields = dict(
        num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_query_groups=GROUPS, group_query_attention=True, kv_channels=HEAD_DIM,
        ffn_hidden_size=4 * HIDDEN, padded_vocab_size=VOCAB, seq_length=SEQ, swiglu=False,
        num_experts=None, mtp_num_layers=None, moe_ffn_hidden_size=None, moe_latent_size=None,
        moe_shared_expert_intermediate_size=None, multi_latent_attention=False,
        experimental_attention_variant=None, attention_output_gate=False,
        hybrid_layer_pattern=None,
    )  # fmt: skip
    fields.update(overrides)
    return argparse.Namespace(**fields)


def hand_count(gate_rows: int) -> int:
    """Forward FLOPs x 3 (forward, data and weight gradients), 2 per multiply-add."""
    tokens = BATCH * SEQ
    qkv_rows = HEADS * HEAD_DIM + 2 * GROUPS * HEAD_DIM + gate_rows
    per_layer = (
        2 * tokens * HIDDEN * qkv_rows  # linear_qkv, gate rows included
        + 2 * tokens * HEADS * HEAD_DIM * HIDDEN  # linear_proj
        + 2 * 2 * tokens * HIDDEN * 4 * HIDDEN  # fc1 and fc2
        + 2 * BATCH * SEQ * SEQ * HEADS * HEAD_DIM  # QK^T and PV under a causal mask (half)
    )
    logits = 2 * tokens * HIDDEN * VOCAB
    return 3 * (LAYERS * per_layer + logits)


@pytest.mark.parametrize(
    ("granularity", "native_flag", "gate_rows"),
    [
        ("headwise", False, HEADS),
        ("elementwise", False, HEADS * HEAD_DIM),
        ("elementwise", True, HEADS * HEAD_DIM),  # --attention-output-gate: Megatron counts it
    ],
)
def test_count_with_the_gate_equals_the_hand_count(
    granularity: str, native_flag: bool, gate_rows: int
) -> None:
    args = _args(attention_output_gate=native_flag)
    gated = GatedLayers(granularity=granularity, count=LAYERS)
    count = wrap_num_floating_point_operations(training.num_floating_point_operations,
                                               lambda: gated)  # fmt: skip
    assert count(args, BATCH) == hand_count(gate_rows)
    # Megatron alone counts the gate only with its own flag.
    plain = training.num_floating_point_operations(args, BATCH)
    assert plain == hand_count(gate_rows if native_flag else 0)


def test_without_gated_layers_the_count_is_megatrons() -> None:
    count = wrap_num_floating_point_operations(training.num_floating_point_operations,
                                               lambda: None)  # fmt: skip
    assert count(_args(), BATCH) == hand_count(0)


def test_packed_sequences_count_real_tokens() -> None:
    gated = GatedLayers(granularity="headwise", count=LAYERS)
    count = wrap_num_floating_point_operations(training.num_floating_point_operations,
                                               lambda: gated)  # fmt: skip
    tokens, squares = 100, 2 * 50 * 50
    with_gate = count(_args(), BATCH, seqlen_squared_sum_in_batch=squares,
                      total_real_tokens_in_batch=tokens)  # fmt: skip
    without = training.num_floating_point_operations(
        _args(), BATCH, seqlen_squared_sum_in_batch=squares, total_real_tokens_in_batch=tokens
    )
    assert with_gate - without == 6 * tokens * HIDDEN * HEADS * LAYERS


def test_the_runner_wraps_megatrons_count() -> None:
    # In a child: the wrapping changes megatron.training for the whole process.
    code = (
        "from megatron_gate.megatron_lm import enable_megatron_gate\n"
        "from megatron_gate.megatron_lm.patching import is_wrapped\n"
        "from megatron.training import training\n"
        "enable_megatron_gate()\n"
        "assert is_wrapped(training.num_floating_point_operations)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
