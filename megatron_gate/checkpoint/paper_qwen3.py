"""The gated Qwen3 layout of the paper's authors (Qiu et al., github.com/qiuzh20/gated_attention).

Their `modeling_qwen3.py` keeps Qwen3's tensor names and puts the gate inside `q_proj`, per
key/value group (not per head as Qwen3-Next does). With `hpg = np / ng` query heads per group and
`g` gate rows per head (`g = hn` with `elementwise_attn_output_gate`, `g = 1` with
`headwise_attn_output_gate`):

    q_proj.weight [ng * (hpg * hn + hpg * g), h]
        per group j: [ q heads j*hpg .. j*hpg+hpg-1 (hpg * hn rows) | their gates (hpg * g rows) ]
    # forward: q_proj(x).view(b, s, ng, -1).split([hpg * hn, hpg * g]); gate.reshape(b, s, np, g)
    k_proj, v_proj [ng * hn, h]; o_proj [h, np * hn]; q_norm, k_norm [hn] (use_qk_norm)
    out = o_proj(attention(q, k, v) * sigmoid(gate))

That is Megatron's fused `linear_qkv` order (`[q | gate | k | v]` per group) with k and v moved
to their own tensors, so the conversion cuts each group of `linear_qkv` at the query/gate vs key
boundary. Norms are plain RMSNorm (weight = scale, not zero-centred), RoPE is full-width
`rotate_half` (Megatron's non-interleaved RoPE, `rotary_percent=1`), MLP is SwiGLU. The baseline
(no gate flag) converts to a plain, non-gated Megatron GPT. Biases (`qkv_bias` / `attention_bias`)
and sliding windows are refused.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_gate.checkpoint.model import (
    GptShape,
    check_tensors,
    hf_config_fields,
    shape_from_hf_config,
)
from megatron_gate.checkpoint.safe_io import CheckpointError

ARCHITECTURE = "Qwen3ForCausalLM"

LAYER_COPIES = {
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
QK_NORMS = {
    "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
}


def granularity_of(config: dict[str, Any]) -> str | None:
    """Gate granularity named by the authors' config flags (None: their baseline)."""
    headwise = bool(config.get("headwise_attn_output_gate"))
    elementwise = bool(config.get("elementwise_attn_output_gate"))
    if headwise and elementwise:
        raise CheckpointError(
            "config.json sets both headwise_attn_output_gate and elementwise_attn_output_gate; "
            "the authors' code then uses headwise; set only one."
        )
    return "headwise" if headwise else "elementwise" if elementwise else None


def shape_from_config(config: dict[str, Any]) -> GptShape:
    """The Megatron `GptShape` of the authors' Qwen3 `config.json` (validated)."""
    if config.get("qkv_bias") or config.get("attention_bias"):
        raise CheckpointError("config.json qkv_bias/attention_bias=true is not supported.")
    if config.get("use_sliding_window"):
        raise CheckpointError("config.json use_sliding_window=true is not supported.")
    if config.get("rope_scaling"):
        raise CheckpointError("config.json rope_scaling is set; only default RoPE converts.")
    return shape_from_hf_config(
        config,
        granularity=granularity_of(config),
        rotary_percent=1.0,
        rotary_base=float(config.get("rope_theta", 10000.0)),
        qk_layernorm=bool(config.get("use_qk_norm", True)),
    )


def config_from_shape(shape: GptShape) -> dict[str, Any]:
    """The authors' Qwen3 `config.json` dict for `shape`."""
    if shape.rotary_percent != 1.0 or shape.layernorm_zero_centered_gamma:
        raise CheckpointError(
            f"model rotary_percent={shape.rotary_percent}, layernorm_zero_centered_gamma="
            f"{shape.layernorm_zero_centered_gamma}: the paper's Qwen3 has full RoPE and plain "
            "RMSNorm; export this model with --to hf (Qwen3-Next) instead."
        )
    if shape.add_bias_linear or not shape.gated_linear_unit or shape.activation != "silu":
        raise CheckpointError("the paper's Qwen3 needs a bias-free SwiGLU model.")
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "qwen3",
        **hf_config_fields(shape),
        "rope_theta": shape.rotary_base,
        "use_qk_norm": shape.qk_layernorm,
        "headwise_attn_output_gate": shape.granularity == "headwise",
        "elementwise_attn_output_gate": shape.granularity == "elementwise",
        "torch_dtype": "float32",
    }


def expected_paper_shapes(shape: GptShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the authors' checkpoint for `shape`."""
    layout = shape.qkv_layout()
    h, hn = shape.hidden_size, shape.kv_channels
    np_, ng, ffn = shape.num_attention_heads, shape.num_query_groups, shape.ffn_hidden_size
    q_rows = np_ * (hn + layout.gate_rows_per_head)
    shapes = {"model.embed_tokens.weight": (shape.vocab_size, h), "model.norm.weight": (h,)}
    for index in range(shape.num_layers):
        prefix = f"model.layers.{index}."
        layer = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q_rows, h),
            "self_attn.k_proj.weight": (ng * hn, h),
            "self_attn.v_proj.weight": (ng * hn, h),
            "self_attn.o_proj.weight": (h, np_ * hn),
            "mlp.gate_proj.weight": (ffn, h),
            "mlp.up_proj.weight": (ffn, h),
            "mlp.down_proj.weight": (h, ffn),
        }
        if shape.qk_layernorm:
            layer["self_attn.q_norm.weight"] = (hn,)
            layer["self_attn.k_norm.weight"] = (hn,)
        shapes.update({prefix + name: size for name, size in layer.items()})
    if shape.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (shape.vocab_size, h)
    return shapes


def _check(paper: dict[str, torch.Tensor], shape: GptShape) -> None:
    check_tensors(
        paper,
        expected_paper_shapes(shape),
        source="paper Qwen3 checkpoint",
        hint="from config.json: gate flags, heads, head_dim, layers",
    )


def _q_proj_to_fused(paper: dict[str, torch.Tensor], prefix: str, shape: GptShape) -> torch.Tensor:
    layout = shape.qkv_layout()
    sizes = layout.segment_sizes
    ng, hn = shape.num_query_groups, shape.kv_channels
    # q_proj [ng * (hpg*hn + hpg*g), h] -> [ng, hpg*hn + hpg*g, h] -> query, gate per group
    grouped = paper[prefix + "q_proj.weight"].unflatten(0, (ng, -1))
    query, gate = torch.split(grouped, [sizes["query"], sizes["gate"]], dim=1)
    segments = {
        "query": query,
        "gate": gate,
        # [ng * hn, h] -> [ng, hn, h]
        "key": paper[prefix + "k_proj.weight"].unflatten(0, (ng, hn)),
        "value": paper[prefix + "v_proj.weight"].unflatten(0, (ng, hn)),
    }
    return layout.fuse_groups(segments, dim=0)


def _fused_to_q_proj(fused: torch.Tensor, shape: GptShape) -> dict[str, torch.Tensor]:
    parts = shape.qkv_layout().split_groups(fused, dim=0)
    return {
        # [ng, hpg*hn, h] + [ng, hpg*g, h] -> [ng, hpg*(hn+g), h] -> [ng*hpg*(hn+g), h]
        "q_proj.weight": torch.cat([parts["query"], parts["gate"]], dim=1).flatten(0, 1),
        "k_proj.weight": parts["key"].flatten(0, 1),
        "v_proj.weight": parts["value"].flatten(0, 1),
    }


def paper_to_megatron(paper: dict[str, torch.Tensor], shape: GptShape) -> dict[str, torch.Tensor]:
    """The authors' Qwen3 tensors -> the full Megatron state dict of `shape`."""
    _check(paper, shape)
    out = {
        "embedding.word_embeddings.weight": paper["model.embed_tokens.weight"].clone(),
        "decoder.final_layernorm.weight": paper["model.norm.weight"].clone(),
    }
    if shape.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = paper["lm_head.weight"].clone()
    copies = {**LAYER_COPIES, **(QK_NORMS if shape.qk_layernorm else {})}
    for index in range(shape.num_layers):
        src, dst = f"model.layers.{index}.", f"decoder.layers.{index}."
        for paper_name, name in copies.items():
            out[dst + name] = paper[src + paper_name].clone()
        out[dst + "self_attention.linear_qkv.weight"] = _q_proj_to_fused(
            paper, src + "self_attn.", shape
        )
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [paper[src + "mlp.gate_proj.weight"], paper[src + "mlp.up_proj.weight"]]
        )
    return out


def megatron_to_paper(
    megatron: dict[str, torch.Tensor], shape: GptShape
) -> dict[str, torch.Tensor]:
    """The full Megatron state dict of `shape` -> the authors' Qwen3 tensors."""
    config_from_shape(shape)  # refuses shapes the authors' model cannot hold
    out = {
        "model.embed_tokens.weight": megatron["embedding.word_embeddings.weight"].clone(),
        "model.norm.weight": megatron["decoder.final_layernorm.weight"].clone(),
    }
    if shape.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = megatron["output_layer.weight"].clone()
    copies = {**LAYER_COPIES, **(QK_NORMS if shape.qk_layernorm else {})}
    for index in range(shape.num_layers):
        src, dst = f"decoder.layers.{index}.", f"model.layers.{index}."
        for paper_name, name in copies.items():
            out[dst + paper_name] = megatron[src + name].clone()
        attention = _fused_to_q_proj(megatron[src + "self_attention.linear_qkv.weight"], shape)
        out.update({dst + "self_attn." + name: value for name, value in attention.items()})
        gate_proj, up_proj = megatron[src + "mlp.linear_fc1.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"] = gate_proj.clone()
        out[dst + "mlp.up_proj.weight"] = up_proj.clone()
    return out
