"""qk-clip (MuonClip) on gated layers: Megatron's `clip_qk` scales q and k rows only.

Checked against a plain reference (row arithmetic written out here, not `layout.py`) at TP=1, TP=2
and `num_query_groups < TP` (real gloo, 2 processes), both granularities, and on weights of
Megatron's native `attention_output_gate=True` layer (whose own `clip_qk` cannot view them).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from megatron_gate.attention import GatedSelfAttention
from megatron_gate.demo.tiny_gpt import build_gpt, tiny_config
from megatron_gate.distributed import init_model_parallel, launch
from megatron_gate.spec import gated_gpt_layer_spec

HEADS, HIDDEN, THRESHOLD, ALPHA = 8, 64, 5.0, 0.3
HEAD_DIM = HIDDEN // HEADS
# (name, granularity, num_query_groups, tp)
CASES = [
    (f"{granularity}-groups{groups}-tp{tp}", granularity, groups, tp)
    for granularity in ("headwise", "elementwise")
    for groups, tp in ((2, 1), (2, 2), (1, 2), (4, 2))
]


def reference_clip(
    weight: torch.Tensor, max_logits: torch.Tensor, *, groups: int, gate_rows_per_head: int
) -> torch.Tensor:
    """Per group `[q heads | gate rows | k | v]`: q rows * eta**alpha, k rows * eta**(1-alpha)."""
    hpg = HEADS // groups
    group_rows = hpg * HEAD_DIM + hpg * gate_rows_per_head + 2 * HEAD_DIM
    out = weight.clone()
    for group in range(groups):
        eta = min(1.0, THRESHOLD / max_logits[group * hpg : (group + 1) * hpg].max().item())
        start = group * group_rows
        out[start : start + hpg * HEAD_DIM] *= eta**ALPHA
        key = start + hpg * HEAD_DIM + hpg * gate_rows_per_head
        out[key : key + HEAD_DIM] *= eta ** (1 - ALPHA)
    return out


def _config(groups: int, tp: int = 1):  # noqa: ANN202
    return tiny_config(
        num_layers=1,
        num_attention_heads=HEADS,
        num_query_groups=groups,
        tensor_model_parallel_size=tp,
        qk_clip=True,
        qk_clip_threshold=THRESHOLD,
        qk_clip_alpha=ALPHA,
    )


def _attention(model: torch.nn.Module) -> Any:
    return model.decoder.layers[0].self_attention


def _max_logits(seed: int = 3) -> torch.Tensor:
    """Max attention logit per head: some above the threshold, some below."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(HEADS, generator=generator) * 4 * THRESHOLD


def _clip(attention: Any, own_logits: torch.Tensor) -> torch.Tensor:
    attention.core_attention.current_max_attn_logits = own_logits.clone()
    attention.clip_qk()
    assert attention.core_attention.current_max_attn_logits is None  # Megatron resets it
    return attention.linear_qkv.weight.detach().clone()


def _case(granularity: str, groups: int, tp: int) -> float:
    """Max |difference| of this rank's clipped rows from the reference's rows."""
    from megatron.core import parallel_state

    spec = gated_gpt_layer_spec(granularity=granularity, backend="local")
    init_model_parallel(tp=1, seed=5)
    full = _attention(build_gpt(_config(groups), spec)).linear_qkv.weight.detach().clone()
    init_model_parallel(tp=tp, seed=5)
    attention = _attention(build_gpt(_config(groups, tp), spec))
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        attention.linear_qkv.weight.copy_(full.chunk(tp)[rank])
    logits = _max_logits()
    own = logits.chunk(tp)[rank]  # a rank attends over its own consecutive heads
    clipped = _clip(attention, own)
    gate_rows = HEAD_DIM if granularity == "elementwise" else 1
    expected = reference_clip(full, logits, groups=groups, gate_rows_per_head=gate_rows)
    assert not torch.equal(expected, full)  # the case does clip something
    return (clipped - expected.chunk(tp)[rank]).abs().max().item()


def _worker(rank: int, world_size: int, cases: list) -> dict[str, float]:
    return {name: _case(granularity, groups, tp) for name, granularity, groups, tp in cases}


@pytest.fixture(scope="module")
def clip_results() -> list[dict[str, float]]:
    return launch(_worker, world_size=2, payload=CASES)


@pytest.mark.parametrize("case", [case[0] for case in CASES])
def test_clip_matches_reference(clip_results: list, case: str) -> None:
    for rank_result in clip_results:
        assert rank_result[case] < 1e-6


@pytest.mark.usefixtures("megatron_world")
def test_native_elementwise_weights_clip_as_their_reference() -> None:
    # Megatron's native gate and our elementwise gate share one checkpoint layout.
    init_model_parallel(tp=1, seed=5)
    native_config = _config(2)
    native_config.attention_output_gate = True
    native = build_gpt(native_config, get_gpt_layer_local_spec())
    ours = build_gpt(_config(2), gated_gpt_layer_spec(granularity="elementwise", backend="local"))
    ours.load_state_dict(native.state_dict(), strict=True)
    weight = _attention(native).linear_qkv.weight.detach().clone()
    logits = _max_logits(seed=4)
    with pytest.raises(RuntimeError, match="is invalid"):  # Megatron's own clip_qk on this layout
        _clip(_attention(native), logits)
    clipped = _clip(_attention(ours), logits)
    expected = reference_clip(weight, logits, groups=2, gate_rows_per_head=HEAD_DIM)
    torch.testing.assert_close(clipped, expected, atol=0, rtol=0)


@pytest.mark.usefixtures("megatron_world")
def test_below_threshold_nothing_changes() -> None:
    init_model_parallel(tp=1, seed=5)
    attention = _attention(build_gpt(_config(2), gated_gpt_layer_spec(granularity="headwise")))
    assert isinstance(attention, GatedSelfAttention)
    before = attention.linear_qkv.weight.detach().clone()
    after = _clip(attention, torch.full((HEADS,), THRESHOLD / 2))
    assert torch.equal(before, after)
