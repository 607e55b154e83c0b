"""Shared pytest set-up: CPU runtime, no torch.compile, a `gpu` marker that skips without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA and Transformer Engine (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def megatron_world() -> None:
    """This pytest process as a one-rank gloo world with Megatron's parallel state (TP=PP=1)."""
    import torch.distributed as dist

    from megatron_gate.distributed import free_port, init_model_parallel, init_process_group

    if not dist.is_initialized():
        init_process_group(0, 1, free_port())
    init_model_parallel(tp=1, pp=1)
