"""Sink statistics (per-head shares by query class, value drain, BOS residual ratio, kurtosis)
against plain references and against the tensors inside Megatron's own attention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.monitor import MonitorConfig, StabilityMonitor, schema
from megatron_gate.monitor.probe import (
    class_share_sums,
    first_token_shares,
    plain_attention_probabilities,
    query_class_weights,
    sample_positions,
    value_norms,
)
from megatron_gate.monitor.sink_statistics import SinkObservations, residual_sink_sums, unpack

from .conftest import BATCH, SEQ, batch_at, lm_loss, tiny_gated_gpt


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offset", [None, "zero", "learned"])
def test_shares_with_a_softmax_offset_equal_the_reference(offset: str | None) -> None:
    sq, batch, heads, groups, head_dim = 12, 3, 4, 2, 8
    query, key = (
        _random(sq, batch, heads, head_dim, seed=0),
        _random(sq, batch, groups, head_dim, seed=1),
    )
    key[0] += 2
    softmax_offset = {
        None: None,
        "zero": torch.zeros(heads),
        "learned": _random(heads, seed=2) * 3,
    }[offset]
    positions = sample_positions(sq, 5)
    shares, max_logit = first_token_shares(
        query, key, softmax_scale=0.4, positions=positions, softmax_offset=softmax_offset
    )
    _, logits = plain_attention_probabilities(query, key, softmax_scale=0.4)
    logits = logits[:, :, positions]  # [b, np, k, sk]
    if softmax_offset is not None:  # the offset is one more key in every row's softmax
        extra = softmax_offset.view(1, heads, 1, 1).expand(batch, heads, len(positions), 1)
        logits = torch.cat([logits, extra], dim=-1)
    torch.testing.assert_close(shares, torch.softmax(logits, -1)[..., 0])
    assert max_logit.item() == pytest.approx(logits[..., :sq].amax().item())


def test_class_sums_and_value_norms_equal_loops() -> None:
    batch, heads, seq = 3, 2, 10
    positions = sample_positions(seq, 4)
    shares = torch.rand(batch, heads, len(positions), generator=torch.Generator().manual_seed(0))
    flags = torch.rand(batch, seq, generator=torch.Generator().manual_seed(1)) < 0.4
    sums, counts = class_share_sums(shares, query_class_weights(flags, positions, batch=batch))
    for head in range(heads):
        rows = [(b, i) for b in range(batch) for i, p in enumerate(positions.tolist())]
        flagged = [shares[b, head, i].item() for b, i in rows if flags[b, positions[i]]]
        unflagged = [shares[b, head, i].item() for b, i in rows if not flags[b, positions[i]]]
        assert sums[:, head].tolist() == pytest.approx(
            [sum(flagged) + sum(unflagged), sum(unflagged), sum(flagged)]
        )
        assert counts.tolist() == [len(rows), len(unflagged), len(flagged)]
    sums, counts = class_share_sums(shares, query_class_weights(None, positions, batch=batch))
    assert counts.tolist() == [batch * len(positions), 0, 0] and (sums[1:] == 0).all()
    value = _random(seq, batch, 2, 8, seed=3)
    first, rest, first_count, rest_count = value_norms(value)
    norms = [
        [[value[s, b, g].norm().item() for g in range(2)] for b in range(batch)] for s in range(seq)
    ]
    assert first.item() == pytest.approx(sum(sum(row) for row in norms[0]), rel=1e-5)
    assert rest.item() == pytest.approx(
        sum(sum(sum(row) for row in pos) for pos in norms[1:]), rel=1e-5
    )
    assert (first_count, rest_count) == (batch * 2, (seq - 1) * batch * 2)


def test_residual_ratio_and_kurtosis_equal_a_plain_reference() -> None:
    hidden = _random(9, 3, 16, seed=4)
    hidden[0, 1] *= 20  # one sequence with a massive activation at BOS
    ratio, kurtosis, sequences = residual_sink_sums(hidden)
    ratios, kurtoses = [], []
    for b in range(3):
        norms = sorted(hidden[t, b].norm().item() for t in range(1, 9))
        median = norms[(len(norms) - 1) // 2]  # torch's median: the lower middle value
        ratios.append(hidden[0, b].norm().item() / median)
        values = hidden[:, b].reshape(-1).double()
        centred = values - values.mean()
        kurtoses.append((centred**4).mean().item() / (centred**2).mean().item() ** 2)
    assert sequences == 3
    assert ratio.item() == pytest.approx(sum(ratios), rel=1e-5)
    assert kurtosis.item() == pytest.approx(sum(kurtoses), rel=1e-4)
    assert max(ratios) > 10 and max(kurtoses) > 3


def test_tensor_parallel_head_slots_combine_by_sum() -> None:
    """Two ranks, each with its own 2 of 4 heads: summing their blocks gives every head."""
    blocks = []
    for rank in range(2):
        observations = SinkObservations(num_layers=2, num_heads=4)
        sums = torch.tensor([[1.0, 2.0], [0.5, 1.5], [0.5, 0.5]]) * (rank + 1)
        observations.add_shares(1, 2 * rank, sums, torch.tensor([4.0, 3.0, 1.0]))
        blocks.append(observations.blocks(torch.device("cpu")))
    reduced = {name: (blocks[0][name] + blocks[1][name]).tolist() for name in blocks[0]}
    layers, heads = unpack(reduced, num_layers=2, num_heads=4)
    assert heads["first_token_share"][0] == [None] * 4  # layer 1 was not observed
    assert heads["first_token_share"][1] == pytest.approx([0.25, 0.5, 0.5, 1.0])
    assert heads["first_token_share_flagged"][1] == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert layers["first_token_share_head_max"] == [None, pytest.approx(1.0)]
    assert layers["first_token_share_unflagged"][1] == pytest.approx((1 / 6 + 0.5 + 1 / 3 + 1) / 4)


@pytest.mark.parametrize("softmax_type", ["vanilla", "off-by-one", "learnable"])
def test_monitor_matches_megatron_attention(
    one_rank_world: None, tmp_path: Path, softmax_type: str
) -> None:
    """Per-head, per-class shares equal the probabilities inside Megatron's DotProductAttention
    (its own SoftmaxOne for the offset types); value drain and BOS ratio its value and outputs."""
    model = tiny_gated_gpt(
        seed=3, num_attention_heads=4, num_query_groups=2, softmax_type=softmax_type
    )
    config = MonitorConfig.from_dict({"log_interval": 1, "layer_interval": 1, "probe_queries": 6,
                                      "sinks": {"console": False, "tensorboard": False}})  # fmt: skip
    monitor = StabilityMonitor(config, models=[model], run_dir=tmp_path)
    captured: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for layer in model.decoder.layers:
        slot = captured.setdefault(layer.layer_number, {})
        core = layer.self_attention.core_attention
        handles += [
            core.attention_dropout.register_forward_hook(
                lambda _m, inputs, _out, slot=slot: slot.update(probs=inputs[0].detach())),
            core.register_forward_pre_hook(
                lambda _m, args, slot=slot: slot.update(value=args[2].detach())),
            layer.register_forward_hook(
                lambda _m, _i, out, slot=slot: slot.update(hidden=out[0].detach())),
        ]  # fmt: skip
    batch = batch_at(0)
    flags = batch["tokens"] % 3 == 0
    monitor.start_step(0, query_flags=flags)
    lm_loss(model, batch).backward()
    monitor.end_step(0, loss=1.0)
    for handle in handles:
        handle.remove()
    monitor.close()
    record = monitor.last_records[0]
    assert set(record["layers"]) == {*schema.LAYER_METRICS, *schema.SINK_LAYER_METRICS}
    positions = sample_positions(SEQ, 6)
    sampled_flags = flags[:, positions]  # [b, k]
    for number, tensors in captured.items():
        share = tensors["probs"][:, :, positions, 0]  # [b, np, k]
        for name, chosen in (("first_token_share", torch.ones_like(sampled_flags)),
                             ("first_token_share_flagged", sampled_flags),
                             ("first_token_share_unflagged", ~sampled_flags)):  # fmt: skip
            expected = [share[:, h][chosen].mean().item() for h in range(4)]
            assert record["heads"][name][number - 1] == pytest.approx(expected, rel=1e-5)
        layers = {k: v[number - 1] for k, v in record["layers"].items()}
        assert layers["first_token_share_head_max"] == pytest.approx(
            max(share[:, h].mean().item() for h in range(4)), rel=1e-5)  # fmt: skip
        norms = tensors["value"].norm(dim=-1)  # [sk, b, ng]
        assert layers["value_norm_ratio_first_token"] == pytest.approx(
            (norms[0].mean() / norms[1:].mean()).item(), rel=1e-5)  # fmt: skip
        hidden_norms = tensors["hidden"].norm(dim=-1)  # [s, b]
        ratio = (hidden_norms[0] / hidden_norms[1:].median(dim=0).values).mean().item()
        assert layers["residual_norm_ratio_first_token"] == pytest.approx(ratio, rel=1e-5)
        assert layers["kurtosis_residual"] > 1.0
    assert flags.shape[0] == BATCH


def test_sequence_parallel_outputs_leave_the_bos_ratio_unmeasured(
    one_rank_world: None, tmp_path: Path
) -> None:
    """A rank's output under sequence parallelism is a chunk of positions: no BOS ratio then."""
    model = tiny_gated_gpt(seed=1)
    model.config.sequence_parallel = True  # what the collector reads (TP=1 cannot run it)
    config = MonitorConfig.from_dict({"log_interval": 1, "layer_interval": 1,
                                      "sinks": {"console": False, "tensorboard": False}})  # fmt: skip
    monitor = StabilityMonitor(config, models=[model], run_dir=tmp_path)
    model.config.sequence_parallel = False  # the forward itself runs unsplit
    monitor.start_step(0)
    lm_loss(model, batch_at(0)).backward()
    monitor.end_step(0, loss=1.0)
    monitor.close()
    layers = monitor.last_records[0]["layers"]
    assert layers["residual_norm_ratio_first_token"] == [None, None]
    assert layers["kurtosis_residual"] == [None, None]
    assert all(v is not None for v in layers["first_token_share_head_max"])
