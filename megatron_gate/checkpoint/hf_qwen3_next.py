"""Hugging Face Qwen3-Next (full-attention, dense-MLP layers) <-> Megatron gated GPT tensors.

Qwen3-Next's attention (`transformers` `Qwen3NextAttention`) is the elementwise G1 gate:

    q_proj.weight  [np * 2 * hn, h]   per head h: [ q_h (hn rows) | gate_h (hn rows) ]
    k_proj, v_proj [ng * hn, h]       o_proj [h, np * hn]
    q_norm, k_norm [hn]               zero-centred RMSNorm over each head
    out = o_proj(attention(q, k, v) * sigmoid(gate))

Megatron fuses the same rows per query group (`megatron_gate.layout`); this module only moves
heads between the two orders, through `QkvLayout.split_weight` / `fuse_weight`.

Everything else of the layer stack maps one to one:

    model.embed_tokens                 embedding.word_embeddings
    layers.i.input_layernorm           decoder.layers.i.input_layernorm          (norm)
    layers.i.self_attn.{q,k}_norm      decoder.layers.i.self_attention.{q,k}_layernorm (norm)
    layers.i.self_attn.o_proj          decoder.layers.i.self_attention.linear_proj
    layers.i.post_attention_layernorm  decoder.layers.i.pre_mlp_layernorm        (norm)
    layers.i.mlp.{gate,up}_proj        decoder.layers.i.mlp.linear_fc1 = [gate_proj; up_proj]
    layers.i.mlp.down_proj             decoder.layers.i.mlp.linear_fc2
    model.norm                         decoder.final_layernorm                   (norm)
    lm_head                            output_layer

Norms: Qwen3-Next's RMSNorm scales by `1 + w` (zero-centred). With
`layernorm_zero_centered_gamma=True` (Transformer Engine norms) `w` is copied as is; otherwise
(Megatron's local `torch.nn.RMSNorm`, which cannot be zero-centred) the Megatron side stores the
scale `1 + w`, and the way back subtracts 1. Rotary: Qwen3-Next rotates the first
`partial_rotary_factor * hn` channels with `rotate_half` (halves, not interleaved pairs), which is
Megatron's default non-interleaved RoPE with `rotary_percent = partial_rotary_factor`.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_gate.checkpoint.model import (
    GptShape,
    check_tensors,
    hf_config_fields,
    hf_int,
    shape_from_hf_config,
)
from megatron_gate.checkpoint.safe_io import CheckpointError

ARCHITECTURE = "Qwen3NextForCausalLM"

# HF name (under `model.layers.i.`) -> Megatron name (under `decoder.layers.i.`), copied as is.
LAYER_COPIES = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
# Norm weights (zero-centred in Qwen3-Next).
LAYER_NORMS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


def _rope(config: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from transformers 5 `rope_parameters` or 4.x fields."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(
            f"config.json rope type {rope_type!r} is not supported; only 'default' RoPE converts."
        )
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    return float(theta), float(factor)


def _check_dense_full_attention(config: dict[str, Any]) -> None:
    layers = hf_int(config, "num_hidden_layers")
    layer_types = config.get("layer_types") or ["full_attention"] * layers
    linear = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    if linear:
        raise CheckpointError(
            f"config.json layer_types: layers {linear} are {layer_types[linear[0]]!r}; only "
            "'full_attention' layers convert to a gated GPT (Gated DeltaNet has no Megatron GPT "
            "equivalent)."
        )
    experts = config.get("num_experts", 0) or 0
    step = config.get("decoder_sparse_step", 1) or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    sparse = [
        i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0
    ]
    if sparse:
        raise CheckpointError(
            f"config.json: layers {sparse} are MoE (num_experts={experts}); only dense MLP layers "
            "convert. Set num_experts=0 or list every layer in mlp_only_layers."
        )


def shape_from_config(config: dict[str, Any], *, zero_centered_gamma: bool = False) -> GptShape:
    """The Megatron `GptShape` of a Qwen3-Next `config.json` (validated)."""
    if config.get("model_type") not in (None, "qwen3_next"):
        raise CheckpointError(
            f"config.json model_type={config.get('model_type')!r}; expected 'qwen3_next'."
        )
    _check_dense_full_attention(config)
    if config.get("attention_bias"):
        raise CheckpointError(
            "config.json attention_bias=true is not supported (Qwen3-Next has none)."
        )
    theta, factor = _rope(config)
    return shape_from_hf_config(
        config,
        granularity="elementwise",
        rotary_percent=factor,
        rotary_base=theta,
        layernorm_zero_centered_gamma=zero_centered_gamma,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation="silu",
        add_bias_linear=False,
    )


def config_from_shape(shape: GptShape) -> dict[str, Any]:
    """A Qwen3-Next `config.json` dict for `shape` (elementwise gate, qk-norm, SwiGLU, RMSNorm)."""
    problems = {
        "granularity": (shape.granularity, "elementwise"),
        "qk_layernorm": (shape.qk_layernorm, True),
        "gated_linear_unit": (shape.gated_linear_unit, True),
        "activation": (shape.activation, "silu"),
        "normalization": (shape.normalization, "RMSNorm"),
        "add_bias_linear": (shape.add_bias_linear, False),
    }
    for field, (found, wanted) in problems.items():
        if found != wanted:
            raise CheckpointError(
                f"model {field}={found!r}: Qwen3-Next needs {field}={wanted!r}"
                + (
                    "; headwise gates export to the paper layout (--to paper)."
                    if field == "granularity"
                    else "."
                )
            )
    layers = shape.num_layers
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3_next",
        **hf_config_fields(shape),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": shape.rotary_base,
            "partial_rotary_factor": shape.rotary_percent,
        },
        "layer_types": ["full_attention"] * layers,
        "num_experts": 0,
        "mlp_only_layers": list(range(layers)),
        "torch_dtype": "float32",
    }


def _norm_to_megatron(weight: torch.Tensor, shape: GptShape) -> torch.Tensor:
    if shape.layernorm_zero_centered_gamma:
        return weight.clone()
    return (weight.float() + 1.0).to(weight.dtype)


def _norm_to_hf(weight: torch.Tensor, shape: GptShape) -> torch.Tensor:
    if shape.layernorm_zero_centered_gamma:
        return weight.clone()
    return (weight.float() - 1.0).to(weight.dtype)


def _attention_to_megatron(
    hf: dict[str, torch.Tensor], prefix: str, shape: GptShape
) -> torch.Tensor:
    layout = shape.qkv_layout()
    np_, ng, hn = shape.num_attention_heads, shape.num_query_groups, shape.kv_channels
    # q_proj [np * 2 * hn, h] -> [np, 2 * hn, h] -> query, gate [np, hn, h]
    query, gate = hf[prefix + "q_proj.weight"].unflatten(0, (np_, 2 * hn)).chunk(2, dim=1)
    heads = {
        "query": query,
        "gate": gate,
        # [ng * hn, h] -> [ng, hn, h]
        "key": hf[prefix + "k_proj.weight"].unflatten(0, (ng, hn)),
        "value": hf[prefix + "v_proj.weight"].unflatten(0, (ng, hn)),
    }
    return layout.fuse_weight(heads)


def _attention_to_hf(fused: torch.Tensor, shape: GptShape) -> dict[str, torch.Tensor]:
    heads = shape.qkv_layout().split_weight(fused)
    return {
        # [np, hn, h] x2 -> [np, 2 * hn, h] -> [np * 2 * hn, h]
        "q_proj.weight": torch.cat([heads["query"], heads["gate"]], dim=1).flatten(0, 1),
        "k_proj.weight": heads["key"].flatten(0, 1),
        "v_proj.weight": heads["value"].flatten(0, 1),
    }


def check_hf_tensors(hf: dict[str, torch.Tensor], shape: GptShape) -> None:
    """Raise a `CheckpointError` naming missing, unexpected or mis-shaped Hugging Face tensors."""
    check_tensors(
        hf, expected_hf_shapes(shape), source="Hugging Face checkpoint", hint="from config.json"
    )


def expected_hf_shapes(shape: GptShape) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor of `shape` (lm_head only when untied)."""
    h, hn = shape.hidden_size, shape.kv_channels
    np_, ng, ffn = shape.num_attention_heads, shape.num_query_groups, shape.ffn_hidden_size
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    for index in range(shape.num_layers):
        prefix = f"model.layers.{index}."
        layer = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (np_ * 2 * hn, h),
            "self_attn.k_proj.weight": (ng * hn, h),
            "self_attn.v_proj.weight": (ng * hn, h),
            "self_attn.o_proj.weight": (h, np_ * hn),
            "self_attn.q_norm.weight": (hn,),
            "self_attn.k_norm.weight": (hn,),
            "mlp.gate_proj.weight": (ffn, h),
            "mlp.up_proj.weight": (ffn, h),
            "mlp.down_proj.weight": (h, ffn),
        }
        shapes.update({prefix + name: size for name, size in layer.items()})
    if shape.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    return shapes


def hf_to_megatron(hf: dict[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    """Hugging Face Qwen3-Next tensors -> the full Megatron state dict of `shape`."""
    check_hf_tensors(hf, shape)
    out = {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"].clone(),
        "decoder.final_layernorm.weight": _norm_to_megatron(hf["model.norm.weight"], shape),
    }
    if shape.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = hf["lm_head.weight"].clone()
    for index in range(shape.num_layers):
        src, dst = f"model.layers.{index}.", f"decoder.layers.{index}."
        for hf_name, name in LAYER_COPIES.items():
            out[dst + name] = hf[src + hf_name].clone()
        for hf_name, name in LAYER_NORMS.items():
            out[dst + name] = _norm_to_megatron(hf[src + hf_name], shape)
        out[dst + "self_attention.linear_qkv.weight"] = _attention_to_megatron(
            hf, src + "self_attn.", shape
        )
        # SwiGLU: Megatron's fc1 output is chunked in two, act(first) * second.
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]]
        )
    return out


def megatron_to_hf(megatron: dict[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    """The full Megatron state dict of `shape` -> Hugging Face Qwen3-Next tensors."""
    config_from_shape(shape)  # refuses shapes Qwen3-Next cannot hold
    out = {
        "model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"].clone(),
        "model.norm.weight": _norm_to_hf(megatron["decoder.final_layernorm.weight"], shape),
    }
    if shape.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = megatron["output_layer.weight"].clone()
    for index in range(shape.num_layers):
        src, dst = f"decoder.layers.{index}.", f"model.layers.{index}."
        for hf_name, name in LAYER_COPIES.items():
            out[dst + hf_name] = megatron[src + name].clone()
        for hf_name, name in LAYER_NORMS.items():
            out[dst + hf_name] = _norm_to_hf(megatron[src + name], shape)
        attention = _attention_to_hf(megatron[src + "self_attention.linear_qkv.weight"], shape)
        out.update({dst + "self_attn." + name: value for name, value in attention.items()})
        gate_proj, up_proj = megatron[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate_proj.clone()
        out[dst + "mlp.up_proj.weight"] = up_proj.clone()
    return out
