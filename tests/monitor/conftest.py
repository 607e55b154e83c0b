"""Fixtures of the monitor tests: a one-rank Megatron world and a tiny gated GPT."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from megatron_gate.demo.tiny_gpt import build_gpt, causal_mask, position_ids, tiny_config
from megatron_gate.spec import gated_gpt_layer_spec

SEQ, BATCH, VOCAB = 16, 2, 128


@pytest.fixture(scope="session")
def one_rank_world() -> Iterator[None]:
    """This pytest process as a one-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    if not dist.is_initialized():
        init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)
    yield


def tiny_gated_gpt(*, seed: int = 0, num_layers: int = 2, **overrides: object) -> torch.nn.Module:
    """A 2-layer headwise-gated GPT (hidden 64, 4 heads, 2 query groups)."""
    torch.manual_seed(seed)
    config = tiny_config(num_layers=num_layers, **overrides)
    return build_gpt(
        config,
        gated_gpt_layer_spec(granularity="headwise", backend="local"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
    )


def batch_at(index: int) -> dict[str, torch.Tensor]:
    """Deterministic batch number `index`."""
    generator = torch.Generator().manual_seed(1000 + index)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"tokens": tokens, "labels": torch.roll(tokens, -1, dims=1)}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss of a batch."""
    output = model(
        batch["tokens"], position_ids(BATCH, SEQ), causal_mask(SEQ), labels=batch["labels"]
    )
    return output.float().mean()
