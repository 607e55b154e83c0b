"""Swap the attention of whatever layer spec a training script builds for a gated one.

Megatron-LM scripts choose their layer spec in many ways (TE or local, MoE block specs, `--spec`,
qk-layernorm, custom builders); every GPT model still goes through `GPTModel.__init__` with a
`transformer_layer_spec`. Gating the spec there keeps everything the script chose and changes
only `self_attention`, for both the 0.19 config-container API and older `model_provider`s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_gate.attention import GatedSelfAttention
from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.spec import gate_spec


def _layer_specs(spec: Any) -> Iterator[Any]:
    """The layer specs of a layer spec, a block ModuleSpec or a bare `TransformerBlockSubmodules`."""
    submodules = getattr(spec, "submodules", spec)
    layer_specs = getattr(submodules, "layer_specs", None)
    if layer_specs is None:
        yield spec
        return
    for layer in layer_specs:
        yield from _layer_specs(layer)


def _existing_gates(spec: Any) -> set[GateConfig]:
    """Gate configs of layers that are gated already (e.g. by `--spec megatron_gate.spec ...`)."""
    gates = set()
    for layer in _layer_specs(spec):
        attention = getattr(getattr(layer, "submodules", None), "self_attention", None)
        if isinstance(attention, ModuleSpec) and attention.module is GatedSelfAttention:
            gates.add((attention.params or {}).get("gate_config") or GateConfig())
    return gates


def gate_layer_spec(spec: Any, gate: GateConfig) -> Any:
    """`spec` with every self-attention gated by `gate`; a spec gated the same way is kept.

    Raises a `GateConfigError` when the spec is gated with another granularity already.
    """
    for existing in _existing_gates(spec):
        if existing.granularity != gate.granularity:
            raise GateConfigError(
                f"--gated-attention {gate.granularity} conflicts with a spec that is already "
                f"gated {existing.granularity} (--spec megatron_gate.spec ...): use one of them."
            )
    return gate_spec(spec, gate)


def gating_init(original: Callable[..., None], gate: GateConfig) -> Callable[..., None]:
    """A `GPTModel.__init__` that gates its `transformer_layer_spec` (2nd argument or keyword)."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "transformer_layer_spec" in kwargs:
            kwargs["transformer_layer_spec"] = gate_layer_spec(
                kwargs["transformer_layer_spec"], gate
            )
        elif len(args) >= 2:
            args = (args[0], gate_layer_spec(args[1], gate), *args[2:])
        original(self, *args, **kwargs)

    return __init__
