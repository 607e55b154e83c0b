"""Bigram-Backcopy against a plain reference: trigger rule, copy rule, BOS at 0, seeding."""

from __future__ import annotations

import bisect

import pytest
import torch

from megatron_gate.demo.bigram_backcopy import BigramBackcopy
from megatron_gate.demo.data import DataError, DataSource, load_corpus


def _reference_sequence(task: BigramBackcopy, uniforms: list[float]) -> list[int]:
    """One sequence by the paper's rule, in plain Python (inverse CDF with bisect)."""
    triggers = set(task.triggers.tolist())
    first_cdf = task.first_cdf.tolist()
    rows = task.transition_cdf.tolist()
    last = task.normal_tokens - 1
    sequence = [task.bos_token, min(bisect.bisect_right(first_cdf, uniforms[0]), last)]
    for t in range(1, len(uniforms)):
        current = sequence[t]
        if current in triggers:
            sequence.append(sequence[t - 1])  # copy back
        else:
            sequence.append(min(bisect.bisect_right(rows[current], uniforms[t]), last))
    return sequence


@pytest.fixture(scope="module")
def task() -> BigramBackcopy:
    return BigramBackcopy(seed=0)


def test_sampler_equals_plain_reference(task: BigramBackcopy) -> None:
    uniforms = torch.rand(16, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sequences = task.sample(uniforms)
    for row in range(16):
        assert sequences[row].tolist() == _reference_sequence(task, uniforms[row].tolist())


def test_rules_hold_on_every_position(task: BigramBackcopy) -> None:
    tokens, labels = task.batches(seq_len=64, batch_size=64, seed=1).next()
    triggers = set(task.triggers.tolist())
    assert tokens.shape == labels.shape == (64, 64)
    assert (tokens[:, 0] == task.bos_token).all()  # BOS at 0, and nowhere else
    assert (tokens[:, 1:] != task.bos_token).all() and (labels != task.bos_token).all()
    assert torch.equal(tokens[:, 1:], labels[:, :-1])  # labels are the next tokens
    for row in range(64):
        sequence = tokens[row].tolist() + [labels[row, -1].item()]
        assert sequence[1] not in triggers  # x1 is never a trigger
        for t in range(1, len(sequence) - 1):
            if sequence[t] in triggers:
                assert sequence[t + 1] == sequence[t - 1]  # copy back
                assert sequence[t + 1] not in triggers  # two triggers never follow each other
    flags = task.query_flags(tokens)
    assert torch.equal(flags, torch.isin(tokens, task.triggers))
    assert 0.15 < flags[:, 1:].float().mean().item() < 0.4  # about a quarter, as in the paper


def test_triggers_are_the_most_frequent_tokens(task: BigramBackcopy) -> None:
    stationary = task.stationary
    assert torch.allclose(stationary @ task.transition, stationary, atol=1e-10)
    others = torch.ones_like(stationary, dtype=torch.bool)
    others[task.triggers] = False
    assert stationary[task.triggers].min() > stationary[others].max()
    assert torch.allclose(
        task.transition.sum(1), torch.ones(task.normal_tokens, dtype=torch.float64)
    )
    assert task.first_distribution[task.triggers].sum() == 0


def test_non_trigger_transitions_follow_the_matrix(task: BigramBackcopy) -> None:
    """Empirical next-token frequencies after a frequent non-trigger token match its row."""
    tokens, labels = task.batch(torch.Generator().manual_seed(9), seq_len=64, batch_size=2000)
    current = 3  # the most frequent non-trigger token (triggers are 0, 1, 2 under a Zipf base)
    assert current not in task.triggers.tolist()
    following = labels[tokens == current]
    counts = torch.bincount(following, minlength=task.normal_tokens)[: task.normal_tokens]
    empirical = counts.double() / counts.sum()
    assert following.numel() > 5000
    assert (empirical - task.transition[current]).abs().max() < 0.02


def test_seeding(task: BigramBackcopy) -> None:
    first = task.batches(seq_len=32, batch_size=8, seed=5)
    second = task.batches(seq_len=32, batch_size=8, seed=5)
    other = task.batches(seq_len=32, batch_size=8, seed=6)
    a, b, c = first.next(), second.next(), other.next()
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert not torch.equal(first.next()[0], a[0])  # the stream moves on
    # the transition matrix is the task seed's; validation batches do not depend on a run seed
    assert torch.equal(BigramBackcopy(seed=0).transition, task.transition)
    assert not torch.equal(BigramBackcopy(seed=1).transition, task.transition)
    val = task.validation_batches(seq_len=32, batch_size=8, num_batches=2)
    again = BigramBackcopy(seed=0).validation_batches(seq_len=32, batch_size=8, num_batches=2)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(val, again, strict=True))


def test_task_is_a_data_source_of_the_demo() -> None:
    task = load_corpus(DataSource(task="bigram-backcopy"))
    assert isinstance(task, BigramBackcopy)
    assert task.bos_token == 64 and task.vocab_size == 128
    with pytest.raises(DataError, match=r"unknown task 'nope' \(--task\)"):
        load_corpus(DataSource(task="nope"))
