"""megatron-gate: gated attention (Qiu et al., 2025) and a stability monitor for Megatron-Core.

    from megatron_gate import gated_gpt_layer_spec
    spec = gated_gpt_layer_spec(granularity="headwise")   # Megatron's GPT layer spec, gated
    model = GPTModel(config, transformer_layer_spec=spec, ...)

Heavy imports (Megatron-Core) happen on first use of the names below.
"""

from __future__ import annotations

from typing import Any

from megatron_gate import worker_lifetime as _worker_lifetime

# First thing in a spawned worker: bind it to its starter before any heavy import.
_worker_lifetime.bind_if_started_as_worker()

from megatron_gate.config import GateConfig, GateConfigError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "GatedSelfAttention": "megatron_gate.attention",
    "gated_gpt_layer_spec": "megatron_gate.spec",
    "gate_spec": "megatron_gate.spec",
    "enable_cpu_runtime": "megatron_gate.cpu",
}

__all__ = ["GateConfig", "GateConfigError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_gate' has no attribute {name!r}")
