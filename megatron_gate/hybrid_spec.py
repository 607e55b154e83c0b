"""Gated attention in Megatron-Core's `HybridModel` (megatron-core >= 0.19).

A `HybridModel` builds one `HybridStack` from a layer pattern (`*` attention, `-` MLP, `M` Mamba,
`G` Gated DeltaNet, ...) and a stack spec that names one layer spec per symbol. Gating it changes
only `attention_layer` (the `*` layers): its `self_attention` becomes `GatedSelfAttention`, as in
a GPT layer spec. Mamba, Gated DeltaNet, MLA and DSA layers are left as they are.

For Megatron-LM's `--spec megatron_gate.hybrid_spec NAME` (a hybrid run imports a stack spec
object, it does not call it):
- `headwise`, `elementwise`: Megatron's TE hybrid stack spec, gated (local modules without TE);
- `local`: the same stack with Megatron's local modules, not gated (CPU runs; Megatron-Core ships
  only a TE hybrid stack spec). `--gated-attention` gates it like any other stack spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_gate.backends import resolve_backend
from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.spec import gate_spec

GATED_SPEC_NAMES: tuple[str, ...] = ("headwise", "elementwise")
SPEC_NAMES: tuple[str, ...] = (*GATED_SPEC_NAMES, "local")
"""What `--spec megatron_gate.hybrid_spec NAME` accepts (`local` is not gated)."""


def is_hybrid_stack_spec(spec: Any) -> bool:
    """Whether `spec` is a `HybridStack` ModuleSpec (what `HybridModel` is given)."""
    return isinstance(spec, ModuleSpec) and isinstance(spec.submodules, HybridStackSubmodules)


def gate_hybrid_stack_spec(spec: ModuleSpec, gate: GateConfig | None = None) -> ModuleSpec:
    """`spec` with its attention layers (`*`) gated; the input is not modified."""
    if not is_hybrid_stack_spec(spec):
        raise GateConfigError(
            f"cannot gate a hybrid stack spec of type {type(spec).__name__} "
            "(hybrid_stack_spec): pass a ModuleSpec of HybridStack with HybridStackSubmodules."
        )
    attention = spec.submodules.attention_layer
    if not isinstance(attention, ModuleSpec):
        raise GateConfigError(
            "the hybrid stack spec has no attention_layer ModuleSpec (hybrid_stack_spec): the "
            "pattern's '*' layers need one to be gated."
        )
    submodules = dataclasses.replace(spec.submodules, attention_layer=gate_spec(attention, gate))
    return dataclasses.replace(spec, submodules=submodules)


def attention_layer_gate(spec: ModuleSpec) -> GateConfig | None:
    """The gate of a hybrid stack spec's attention layers, or None when they are not gated."""
    from megatron_gate.attention import GatedSelfAttention

    attention = getattr(spec.submodules.attention_layer, "submodules", None)
    self_attention = getattr(attention, "self_attention", None)
    if isinstance(self_attention, ModuleSpec) and self_attention.module is GatedSelfAttention:
        return (self_attention.params or {}).get("gate_config") or GateConfig()
    return None


class LocalNormHybridStack(HybridStack):
    """`HybridStack` whose final norm is Megatron's local norm (the base class always builds
    Transformer Engine's `TENorm`, which does not exist without TE)."""

    def __init__(self, config: Any, submodules: HybridStackSubmodules, **kwargs: Any) -> None:
        post_layer_norm = kwargs.pop("post_layer_norm", True)
        super().__init__(config, submodules, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            norm = _local_norm(config)
            self.final_norm = norm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )


def _local_norm(config: Any) -> Any:
    from megatron.core.models.backends import LocalSpecProvider

    return LocalSpecProvider().layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)


def local_hybrid_stack_spec(
    *, normalization: str = "RMSNorm", qk_layernorm: bool = False
) -> ModuleSpec:
    """A hybrid stack of attention (`*`) and MLP (`-`) layers built from Megatron's local modules.

    Each layer is half of Megatron's local GPT layer: `*` keeps its norm and self-attention,
    `-` its norm and MLP (as in Megatron's TE hybrid stack spec, with norms as separate modules).
    """
    gpt = get_gpt_layer_local_submodules(qk_layernorm=qk_layernorm, normalization=normalization)
    attention_layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=gpt.input_layernorm,
            self_attention=gpt.self_attention,
            self_attn_bda=gpt.self_attn_bda,
        ),
    )
    mlp_layer = ModuleSpec(
        module=MLPLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=gpt.pre_mlp_layernorm, mlp=gpt.mlp, mlp_bda=gpt.mlp_bda
        ),
    )
    return ModuleSpec(
        module=LocalNormHybridStack,
        submodules=HybridStackSubmodules(attention_layer=attention_layer, mlp_layer=mlp_layer),
    )


def gated_hybrid_stack_spec(
    *, granularity: str = "elementwise", backend: str = "auto", gate_bias: bool = False
) -> ModuleSpec:
    """Megatron's hybrid stack spec for `backend` (TE, or local without TE), attention gated."""
    gate = GateConfig(granularity=granularity, backend=backend, gate_bias=gate_bias)
    if resolve_backend(gate.backend) == "te":
        from megatron.core.models.hybrid.hybrid_layer_specs import hybrid_stack_spec

        return gate_hybrid_stack_spec(hybrid_stack_spec, gate)
    return gate_hybrid_stack_spec(local_hybrid_stack_spec(), gate)


# Module-level objects for `--spec megatron_gate.hybrid_spec NAME`.
headwise: ModuleSpec = gated_hybrid_stack_spec(granularity="headwise")
elementwise: ModuleSpec = gated_hybrid_stack_spec(granularity="elementwise")
local: ModuleSpec = local_hybrid_stack_spec()
