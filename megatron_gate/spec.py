"""Megatron-Core layer specs with gated attention.

Every spec here is Megatron's own GPT layer spec (dense or MoE, TE or local, qk-layernorm, ...)
with `self_attention` swapped for `GatedSelfAttention`; nothing else of the model changes.

For Megatron-LM's `--spec megatron_gate.spec NAME`:
- `headwise`, `elementwise`: ModuleSpec objects (Megatron-LM <= 0.18 imports an object);
- `headwise_spec`, `elementwise_spec`: callables that Megatron-LM 0.19 calls with its model
  config (and `vp_stage=`); they gate whatever spec Megatron would have built by default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.attention import CrossAttention, SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_gate.attention import GatedSelfAttention
from megatron_gate.backends import resolve_backend
from megatron_gate.config import GateConfig, GateConfigError


def _is_self_attention(module: Any) -> bool:
    return isinstance(module, type) and issubclass(module, SelfAttention)


def _gated_attention_spec(attention: ModuleSpec, gate: GateConfig) -> ModuleSpec:
    module = attention.module
    if isinstance(module, type) and issubclass(module, CrossAttention):
        raise GateConfigError("cross-attention cannot be gated; gate only self-attention layers.")
    if not _is_self_attention(module):
        name = getattr(module, "__name__", repr(module))
        raise GateConfigError(
            f"self_attention module {name} cannot be gated (MLA and custom attention are not "
            "supported); use a spec whose self_attention is Megatron's SelfAttention."
        )
    params = {**(attention.params or {}), "gate_config": gate}
    return dataclasses.replace(attention, module=GatedSelfAttention, params=params)


def gate_spec(spec: Any, gate: GateConfig | None = None) -> Any:
    """Return `spec` with every self-attention gated; the input is not modified.

    `spec` is a layer ModuleSpec, a block ModuleSpec of layer specs, or a bare
    `TransformerBlockSubmodules` (what MoE and heterogeneous block-spec builders return).
    """
    gate = gate or GateConfig()
    submodules = spec.submodules if isinstance(spec, ModuleSpec) else spec
    layer_specs = getattr(submodules, "layer_specs", None)
    if layer_specs is not None:
        gated = [gate_spec(layer, gate) for layer in layer_specs]
        submodules = dataclasses.replace(submodules, layer_specs=gated)
    else:
        attention = getattr(submodules, "self_attention", None)
        if not isinstance(spec, ModuleSpec) or not isinstance(attention, ModuleSpec):
            raise GateConfigError(
                f"cannot gate a spec of type {type(spec).__name__} without a self_attention "
                "ModuleSpec; pass a GPT layer spec, a block spec or TransformerBlockSubmodules."
            )
        submodules = dataclasses.replace(
            submodules, self_attention=_gated_attention_spec(attention, gate)
        )
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=submodules)
    return submodules


def gated_gpt_layer_spec(
    *,
    granularity: str = "elementwise",
    backend: str = "auto",
    gate_bias: bool = False,
    gate_config: GateConfig | None = None,
    num_experts: int | None = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    qk_l2_norm: bool = False,
    normalization: str | None = None,
    multi_latent_attention: bool = False,
) -> ModuleSpec:
    """Megatron's GPT layer spec for `backend` with its self-attention gated.

    `gate_config`, when given, overrides `granularity`, `backend` and `gate_bias`.
    `normalization` ("LayerNorm" | "RMSNorm") matters for the local backend only (TE picks the
    norm from the model config at build time).
    """
    gate = gate_config or GateConfig(granularity=granularity, backend=backend, gate_bias=gate_bias)
    if multi_latent_attention:
        raise GateConfigError(
            "multi_latent_attention=True: MLA cannot be gated; set multi_latent_attention=False."
        )
    common = {
        "num_experts": num_experts,
        "moe_grouped_gemm": moe_grouped_gemm,
        "qk_layernorm": qk_layernorm,
        "qk_l2_norm": qk_l2_norm,
    }
    if resolve_backend(gate.backend) == "te":
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**common)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(**common, normalization=normalization)
    return gate_spec(spec, gate)


def _megatron_default_spec(config: Any, vp_stage: int | None) -> ModuleSpec:
    """The spec Megatron-LM 0.19 would build for `config` without `--spec`."""
    from megatron.training.models.gpt import default_layer_spec

    return default_layer_spec(config, vp_stage)


def _spec_for_config(config: Any, vp_stage: int | None, granularity: str) -> ModuleSpec:
    gate = GateConfig(granularity=granularity, gate_bias=bool(getattr(config, "gate_bias", False)))
    return gate_spec(_megatron_default_spec(config, vp_stage), gate)


def headwise_spec(config: Any, vp_stage: int | None = None) -> ModuleSpec:
    """`--spec megatron_gate.spec headwise_spec` (Megatron-LM 0.19: called with the model config)."""
    return _spec_for_config(config, vp_stage, "headwise")


def elementwise_spec(config: Any, vp_stage: int | None = None) -> ModuleSpec:
    """`--spec megatron_gate.spec elementwise_spec` (Megatron-LM 0.19: called with the model config)."""
    return _spec_for_config(config, vp_stage, "elementwise")


SPEC_NAMES: tuple[str, ...] = ("headwise_spec", "elementwise_spec", "headwise", "elementwise")
"""What `--spec megatron_gate.spec NAME` accepts (all gated)."""
GATED_SPEC_NAMES = SPEC_NAMES

# Module-level objects for Megatron-LM versions whose `--spec` imports a ModuleSpec as is.
headwise: ModuleSpec = gated_gpt_layer_spec(granularity="headwise")
elementwise: ModuleSpec = gated_gpt_layer_spec(granularity="elementwise")
