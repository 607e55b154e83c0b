"""`megatron-gate convert --from megatron-dev --to megatron` and back, against a reference of
Megatron-LM dev's `head_wise_attn_gate` layout written here from its description (PR #4841):

    rank r's linear_qkv rows: [ qkv_r ; gate_r ]     qkv: Megatron's plain [q heads | k | v] x ng,
                                                     gate: one row per head, head order
    torch_dist: `<key>._qkv` (the plain qkv rows) and `<key>._gate` (np rows), any TP size

The reference builds rows with explicit loops over heads (not `megatron_gate.layout`). Disk round
trips run real `megatron.core.dist_checkpointing` in gloo processes, also written by 2 TP ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_gate.checkpoint import megatron_dev
from megatron_gate.checkpoint.convert import read_megatron, write_megatron
from megatron_gate.checkpoint.model import GptShape, expected_full_shapes
from megatron_gate.cli import main

SHAPE = GptShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                 num_query_groups=2, kv_channels=8, vocab_size=64, max_sequence_length=32,
                 granularity="headwise", add_bias_linear=True)  # fmt: skip


class DevReference:
    """Per-head tensors of one layer and the rows each layout makes of them."""

    def __init__(self, shape: GptShape, seed: int, rest: tuple[int, ...]) -> None:
        g = torch.Generator().manual_seed(seed)
        heads, groups, dim = shape.num_attention_heads, shape.num_query_groups, shape.kv_channels
        self.hpg = heads // groups
        self.q = torch.randn(heads, dim, *rest, generator=g)
        self.gate = torch.randn(heads, *rest, generator=g)
        self.k = torch.randn(groups, dim, *rest, generator=g)
        self.v = torch.randn(groups, dim, *rest, generator=g)

    def _group_heads(self, group: int) -> range:
        return range(group * self.hpg, (group + 1) * self.hpg)

    def ours(self) -> torch.Tensor:
        """megatron-gate: per group [q heads | one gate row per head | k | v]."""
        rows = []
        for group in range(self.k.shape[0]):
            rows += [self.q[h] for h in self._group_heads(group)]
            rows += [self.gate[h : h + 1] for h in self._group_heads(group)]
            rows += [self.k[group], self.v[group]]
        return torch.cat(rows)

    def dev_qkv(self) -> torch.Tensor:
        rows = []
        for group in range(self.k.shape[0]):
            rows += [self.q[h] for h in self._group_heads(group)] + [self.k[group], self.v[group]]
        return torch.cat(rows)

    def dev_rank(self, tp: int, rank: int) -> torch.Tensor:
        """Rank `rank`'s rows in a dev model at TP=`tp`: its whole query groups, then its heads' gates."""
        groups = self.k.shape[0] // tp
        rows = []
        for group in range(rank * groups, (rank + 1) * groups):
            rows += [self.q[h] for h in self._group_heads(group)] + [self.k[group], self.v[group]]
        heads = self.q.shape[0] // tp
        rows.append(self.gate[rank * heads : (rank + 1) * heads])
        return torch.cat(rows)


@pytest.mark.parametrize("rest", [(32,), ()], ids=["weight", "bias"])
def test_rows_match_the_reference_both_ways(rest: tuple[int, ...]) -> None:
    reference = DevReference(SHAPE, seed=1, rest=rest)
    qkv, gate = megatron_dev.dev_rows_from_ours(reference.ours(), SHAPE)
    assert torch.equal(qkv, reference.dev_qkv()) and torch.equal(gate, reference.gate)
    assert torch.equal(megatron_dev.ours_from_dev_rows(qkv, gate, SHAPE), reference.ours())
    shards = [megatron_dev.dev_rank_rows(qkv, gate, tp=2, rank=r) for r in range(2)]
    for rank, shard in enumerate(shards):
        assert torch.equal(shard, reference.dev_rank(2, rank))
    back_qkv, back_gate = megatron_dev.dev_rows_from_ranks(shards, SHAPE)
    assert torch.equal(back_qkv, qkv) and torch.equal(back_gate, gate)


def _random_state(shape: GptShape) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {k: torch.randn(size, generator=g) for k, size in expected_full_shapes(shape).items()}


def _stored_tensors(directory: Path) -> dict[str, tuple[int, ...]]:
    from megatron.core import dist_checkpointing

    from megatron_gate.checkpoint.reshard import resolve_checkpoint_dir

    stored = dist_checkpointing.load_tensors_metadata(str(resolve_checkpoint_dir(directory)))
    return {key: tuple(meta.global_shape) for key, meta in stored.items()}


def test_cli_round_trip_is_exact(tmp_path: Path) -> None:
    state = _random_state(SHAPE)
    ours = write_megatron(tmp_path / "ours.pt", SHAPE, state, force=False)
    dev = tmp_path / "dev"
    assert main(["convert", "--from", "megatron", "--to", "megatron-dev", str(ours), str(dev)]) == 0
    stored = _stored_tensors(dev)
    key = "decoder.layers.self_attention.linear_qkv.weight"
    plain_rows = SHAPE.num_query_groups * (SHAPE.num_attention_heads // 2 + 2) * SHAPE.kv_channels
    assert stored[key + "._qkv"] == (2, plain_rows, 32)  # layers stacked, as Megatron stores them
    assert stored[key + "._gate"] == (2, SHAPE.num_attention_heads, 32)
    assert key not in stored
    back = tmp_path / "back.pt"
    code = main(["convert", "--from", "megatron-dev", "--to", "megatron", str(dev), str(back)])
    assert code == 0
    _, restored = read_megatron(back)
    assert restored.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name


def test_written_by_two_tensor_parallel_ranks_reads_back_exactly(tmp_path: Path) -> None:
    """Each rank contributes its `[qkv_r ; gate_r]` blocks; the stored tensors are the full ones."""
    state = _random_state(SHAPE)
    dev = megatron_dev.write_dev(tmp_path / "dev-tp2", SHAPE, state, tp=2)
    restored = megatron_dev.read_dev(dev, SHAPE)
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name


def test_bad_inputs_stop_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    elementwise = SHAPE.replace(granularity="elementwise")
    ours = write_megatron(tmp_path / "e.pt", elementwise, _random_state(elementwise), force=False)
    out = tmp_path / "dev"
    assert main(["convert", "--from", "megatron", "--to", "megatron-dev", str(ours), str(out)]) == 2
    assert "head_wise_attn_gate is headwise, the model is 'elementwise'" in capsys.readouterr().err
    assert not out.exists()
    plain = write_megatron(tmp_path / "plain", SHAPE, _random_state(SHAPE),
                           megatron_format="torch_dist", force=False)  # fmt: skip
    code = main(["convert", "--from", "megatron-dev", "--to", "megatron", str(plain), str(out)])
    assert code == 2
    assert "no ._gate tensors" in capsys.readouterr().err
    assert not out.exists()
