"""Swap the attention of whatever layer spec a training script builds for a gated one.

Megatron-LM scripts choose their layer spec in many ways (TE or local, MoE block specs, `--spec`,
qk-layernorm, custom builders); every GPT model still goes through `GPTModel.__init__` with a
`transformer_layer_spec`, every hybrid model through `HybridModel.__init__` with a
`hybrid_stack_spec`. Gating the spec there keeps everything the script chose and changes only
the self-attention (of the `*` layers of a hybrid pattern), for both the 0.19 config-container
API and older `model_provider`s.
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
    _check_no_conflict(_existing_gates(spec), gate)
    return gate_spec(spec, gate)


def _check_no_conflict(existing: set[GateConfig], gate: GateConfig) -> None:
    for other in existing:
        if other.granularity != gate.granularity:
            raise GateConfigError(
                f"--gated-attention {gate.granularity} conflicts with a spec that is already "
                f"gated {other.granularity} (--spec megatron_gate...): use one of them."
            )


def gate_hybrid_spec(spec: Any, gate: GateConfig) -> Any:
    """A hybrid stack spec with its attention layers gated by `gate` (same checks as GPT's)."""
    from megatron_gate.hybrid_spec import attention_layer_gate, gate_hybrid_stack_spec

    existing = attention_layer_gate(spec)
    _check_no_conflict({existing} if existing else set(), gate)
    return gate_hybrid_stack_spec(spec, gate)


def gating_init(
    original: Callable[..., None],
    gate: GateConfig,
    *,
    spec_argument: str = "transformer_layer_spec",
    gate_spec_of: Callable[[Any, GateConfig], Any] | None = None,
) -> Callable[..., None]:
    """A model `__init__` that gates its layer spec (`spec_argument`: 2nd argument or keyword).

    `GPTModel` takes `transformer_layer_spec`; `HybridModel` takes `hybrid_stack_spec` with
    `gate_spec_of=gate_hybrid_spec`.
    """
    gate_spec_of = gate_spec_of or gate_layer_spec

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if spec_argument in kwargs:
            kwargs[spec_argument] = gate_spec_of(kwargs[spec_argument], gate)
        elif len(args) >= 2:
            args = (args[0], gate_spec_of(args[1], gate), *args[2:])
        original(self, *args, **kwargs)

    return __init__
