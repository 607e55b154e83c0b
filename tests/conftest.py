"""Shared pytest set-up: CPU runtime, no torch.compile, a `gpu` marker that skips without CUDA."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA and Transformer Engine (no GPU on this machine)"
    if importlib.util.find_spec("transformer_engine") is None:
        return "needs Transformer Engine (not installed here; the local backend runs without it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
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
