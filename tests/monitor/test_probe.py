"""The sampled-query sink probe equals exact values from full attention probabilities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityMonitor
from megatron_gate.monitor.probe import (
    plain_attention_probabilities,
    probe_attention,
    sample_positions,
)

from .conftest import SEQ, batch_at, lm_loss, tiny_gated_gpt


def test_sample_positions() -> None:
    assert sample_positions(16, 8).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_positions(5, 8).tolist() == [1, 2, 3, 4]
    assert sample_positions(1, 8).numel() == 0


@pytest.mark.parametrize("explicit_mask", [False, True])
def test_probe_equals_full_probabilities(explicit_mask: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    sq, batch, heads, groups, head_dim = 24, 3, 6, 2, 8
    query = torch.randn(sq, batch, heads, head_dim, generator=generator) * 3
    key = torch.randn(sq, batch, groups, head_dim, generator=generator) * 3
    key[0] += 4  # a strong first key: a real sink
    mask = None
    if explicit_mask:  # padding on the last 3 keys of batch entry 1, plus causal
        mask = torch.triu(torch.ones(sq, sq, dtype=torch.bool), 1)[None, None].repeat(
            batch, 1, 1, 1
        )
        mask[1, :, :, -3:] = True
    positions = sample_positions(sq, 5)
    share_sum, count, max_logit = probe_attention(
        query, key, softmax_scale=0.3, positions=positions, attention_mask=mask
    )
    probabilities, logits = plain_attention_probabilities(
        query, key, softmax_scale=0.3, attention_mask=mask
    )
    sampled = probabilities[:, :, positions]  # [b, np, k, sk]
    assert count == sampled[..., 0].numel()
    torch.testing.assert_close(share_sum / count, sampled[..., 0].mean())
    torch.testing.assert_close(max_logit, logits[:, :, positions].amax())
    assert share_sum / count > 0.2  # the test has a sink to find


def test_probe_matches_megatron_attention_probabilities(
    one_rank_world: None, tmp_path: Path
) -> None:
    """Reference: the probabilities and scores inside Megatron's own DotProductAttention."""
    model = tiny_gated_gpt(seed=3)
    config = MonitorConfig.from_dict(
        {
            "log_interval": 1,
            "layer_interval": 1,
            "probe_queries": 6,
            "sinks": {"console": False, "tensorboard": False},
        }
    )
    monitor = StabilityMonitor(config, models=[model], run_dir=tmp_path)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention
        slot = captured.setdefault(layer.layer_number, {})
        handles.append(
            core.scale_mask_softmax.register_forward_hook(
                lambda _m, inputs, _out, slot=slot: slot.update(
                    scores=inputs[0].detach(), mask=inputs[1]
                )
            )
        )
        handles.append(
            core.attention_dropout.register_forward_hook(
                lambda _m, inputs, _out, slot=slot: slot.update(probs=inputs[0].detach())
            )
        )
    monitor.start_step(0)
    lm_loss(model, batch_at(0)).backward()
    monitor.end_step(0, loss=1.0)
    for handle in handles:
        handle.remove()
    monitor.close()
    layers = monitor.last_records[0]["layers"]
    positions = sample_positions(SEQ, 6)
    for number, tensors in captured.items():
        probs = tensors["probs"][:, :, positions]  # [b, np, k, sk]
        visible = ~tensors["mask"].expand_as(tensors["scores"])[:, :, positions]
        scores = tensors["scores"][:, :, positions].masked_fill(~visible, float("-inf"))
        share = layers["first_token_attention_share"][number - 1]
        assert share == pytest.approx(probs[..., 0].mean().item(), rel=1e-5)
        assert layers["max_attention_logit"][number - 1] == pytest.approx(
            scores.amax().item(), rel=1e-5
        )
