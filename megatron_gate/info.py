"""`megatron-gate info`: what this environment offers (versions, TE, CUDA)."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform


def environment() -> dict[str, str]:
    """Versions and backends visible to megatron-gate here."""
    import torch

    from megatron_gate.backends import transformer_engine_available

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": version("megatron-core"),
        "transformer-engine": version("transformer-engine"),
        "deepspeed": version("deepspeed"),
        "cuda": str(torch.cuda.is_available()),
        "te_usable": str(transformer_engine_available()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`info` takes no arguments."""


def run(args: argparse.Namespace) -> int:
    """Print one `key: value` line per fact."""
    for key, value in environment().items():
        print(f"{key}: {value}")
    return 0
