"""`GatedSelfAttention`: Megatron-Core's `SelfAttention` with the G1 output gate of Qiu et al.

    q, gate, k, v = split(linear_qkv(norm(x)))       # gate rows fused per query group
    out = linear_proj(attention(q, k, v) * sigmoid(gate))

Only two hooks of `SelfAttention` are overridden for the forward: `get_query_key_value_tensors`
(derive the gate from the fused rows, for either granularity and any TP layout) and
`_apply_output_gate` (the fused multiply). Megatron's own `forward` calls both because the
module's config has `attention_output_gate=True`. Two more keep Megatron's weight surgery off the
gate rows: `_clip_linear_qkv` (qk-clip scales only q and k rows) and, with `ng < tp`, `clip_qk`
(one max logit per head of the rank's whole group). `linear_qkv.weight.qkv_split_shapes` tells
Muon the segments (see `megatron_gate.muon`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import all_gather_last_dim_from_tensor_parallel_region
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_gate import frozen_gate_bias, muon
from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.gate_op import apply_output_gate
from megatron_gate.layout import build_layout

GateObserver = Callable[["GatedSelfAttention", torch.Tensor], None]


def validate_gate_setup(config: TransformerConfig, gate: GateConfig, tp_size: int) -> None:
    """Raise a `GateConfigError` naming the field and the fix for a model that cannot be gated."""
    heads, groups = (
        config.num_attention_heads,
        config.num_query_groups or config.num_attention_heads,
    )
    if getattr(config, "multi_latent_attention", False):
        raise GateConfigError(
            "multi_latent_attention=True: MLA cannot be gated by megatron-gate; "
            "turn MLA off or use Megatron's MLA spec without the gate."
        )
    if heads % tp_size:
        raise GateConfigError(
            f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp_size}; "
            "choose a TP size that divides the number of heads."
        )
    if heads % groups:
        raise GateConfigError(
            f"num_attention_heads={heads} is not divisible by num_query_groups={groups}."
        )
    if groups % tp_size and tp_size % groups:
        raise GateConfigError(
            f"num_query_groups={groups} and tensor_model_parallel_size={tp_size}: one must divide "
            "the other."
        )
    if getattr(config, "fused_single_qkv_rope", False):
        raise GateConfigError(
            "fused_single_qkv_rope=True cannot split out the gate rows; set it to False."
        )
    if getattr(config, "attention_output_gate", False) and gate.granularity == "headwise":
        raise GateConfigError(
            "attention_output_gate=True (Megatron's native elementwise gate) conflicts with "
            "granularity='headwise'; drop --attention-output-gate or use 'elementwise'."
        )


def _tp_size(pg_collection: Any) -> int:
    if pg_collection is not None:
        return get_pg_size(pg_collection.tp)
    return parallel_state.get_tensor_model_parallel_world_size()


class GatedSelfAttention(SelfAttention):
    """Self-attention whose output is multiplied by a head-specific sigmoid gate (position G1).

    Checkpoint-compatible with Megatron-Core's `attention_output_gate=True` when elementwise.
    `gate_observers` (callables taking `(module, gate_logits)`) see the pre-sigmoid gate of each
    forward; the stability monitor uses them on its logged steps only.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        *,
        gate_config: GateConfig | None = None,
        **kwargs: Any,
    ) -> None:
        gate_config = gate_config or GateConfig()
        tp_size = _tp_size(kwargs.get("pg_collection"))
        validate_gate_setup(config, gate_config, tp_size)
        # Megatron's forward asks for a gate (and calls our hooks) when this flag is on; the copy
        # keeps the flag out of the config that the rest of the model shares.
        gated_config = copy.copy(config)
        gated_config.attention_output_gate = True
        self.gate_config = gate_config
        self.qkv_layout = build_layout(
            num_attention_heads=config.num_attention_heads,
            num_query_groups=config.num_query_groups or config.num_attention_heads,
            head_dim=config.kv_channels,
            granularity=gate_config.granularity,
            tp_size=tp_size,
            fp8_alignment=gate_config.fp8_alignment if getattr(config, "fp8", None) else None,
        )
        submodules = dataclasses.replace(
            submodules, linear_qkv=self._sized_linear_qkv(submodules.linear_qkv, config)
        )
        super().__init__(gated_config, submodules, layer_number, attn_mask_type, **kwargs)
        self.linear_qkv_out_dim = self.qkv_layout.total_rows
        self.gate_observers: list[GateObserver] = []
        self._init_gate_rows()
        self.linear_qkv.weight.qkv_split_shapes = self.qkv_split_shapes
        muon.install()
        self.register_load_state_dict_post_hook(frozen_gate_bias.note_loaded_frozen_gate_bias)

    # ---------------------------------------------------------------- construction
    def _sized_linear_qkv(self, build: Callable[..., Any], config: TransformerConfig) -> Callable:
        """Wrap the `linear_qkv` builder: our row count, and a bias when only the gate wants one."""
        gate_bias = self.gate_config.gate_bias

        def build_gated(input_size: int, _output_size: int, **kwargs: Any) -> Any:
            kwargs["bias"] = bool(kwargs.get("bias")) or gate_bias
            return build(input_size, self.qkv_layout.total_rows, **kwargs)

        return build_gated

    def _rank_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's contiguous share of a `[total_rows]` tensor (a plain row split)."""
        tp_rank, tp_size = get_pg_rank(self.pg_collection.tp), self.world_size
        rows = full.numel() // tp_size
        return full[tp_rank * rows : (tp_rank + 1) * rows]

    def _segment_mask(self, *segments: str) -> torch.Tensor:
        """Boolean `[total_rows]` mask of the given segments of every query group."""
        sizes = self.qkv_layout.segment_sizes
        group = torch.cat(
            [
                torch.full((size,), name in segments, dtype=torch.bool)
                for name, size in sizes.items()
            ]
        )
        return group.repeat(self.qkv_layout.num_query_groups)

    def _init_gate_rows(self) -> None:
        """Zero padding rows; freeze the bias rows that the config says must stay zero."""
        weight = self.linear_qkv.weight
        padding = self._rank_rows(self._segment_mask("gate_padding")).to(weight.device)
        if bool(padding.any()):  # headwise + FP8 only
            with torch.no_grad():
                weight[padding] = 0
        bias = getattr(self.linear_qkv, "bias", None)
        if not isinstance(bias, torch.Tensor) or bias.numel() != padding.numel():
            return
        has_qkv_bias = self.config.add_bias_linear or self.config.add_qkv_bias
        trainable = ["gate"] if self.gate_config.gate_bias else []
        if has_qkv_bias:
            trainable += ["query", "key", "value"]
        mask = self._rank_rows(self._segment_mask(*trainable)).to(bias.device)
        with torch.no_grad():
            bias[~mask] = 0
        if not bool(mask.all()):
            self.register_buffer("_bias_grad_mask", mask.to(bias.dtype), persistent=False)
            bias.register_hook(lambda grad: grad * self._bias_grad_mask)

    @property
    def qkv_split_shapes(self) -> list[int]:
        """Segments of this rank's `linear_qkv` rows per query group, for Muon's split."""
        return self.qkv_layout.rank_split_shapes(
            tp_rank=get_pg_rank(self.pg_collection.tp), tp_size=self.world_size
        )

    # ---------------------------------------------------------------- forward hooks
    def get_query_key_value_tensors(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        output_gate: bool = True,
        split_qkv: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`[sq, b, h]` -> query `[sq, b, np, hn]`, key and value `[sq, b, ng, hn]`, gate
        `[sq, b, np, hn | 1]`, for this rank's heads."""
        if not split_qkv:
            raise GateConfigError(
                "GatedSelfAttention needs split q/k/v; unset fused_single_qkv_rope."
            )
        frozen_gate_bias.warn_pending()  # after a checkpoint load: its gate biases stay frozen?
        # [sq, b, h] -> [sq, b, ng_local * group_rows]
        mixed_qkv, _ = self.linear_qkv(hidden_states)
        mixed_qkv = self._gather_own_group(mixed_qkv)
        # -> {segment: [sq, b, ng_local, rows]}
        parts = self.qkv_layout.split_groups(mixed_qkv)
        sq, batch = mixed_qkv.shape[:2]
        head_dim = self.hidden_size_per_attention_head
        # [sq, b, ng_local, hpg * hn] -> [sq, b, ng_local * hpg, hn]
        query = self._own_heads(parts["query"].reshape(sq, batch, -1, head_dim))
        # [sq, b, ng_local, hpg * g] -> [sq, b, ng_local * hpg, g]
        gate = self._own_heads(
            parts["gate"].reshape(sq, batch, -1, self.qkv_layout.gate_rows_per_head)
        )
        key, value = parts["key"], parts["value"]
        if self.q_layernorm is not None:
            query = self.q_layernorm(query)
        if self.k_layernorm is not None:
            key = self.k_layernorm(key)
        return query, key, value, gate

    def _groups_shared_by_ranks(self) -> int:
        """How many TP ranks share one query group (1 unless `num_query_groups < tp`)."""
        return max(1, self.world_size // self.qkv_layout.num_query_groups)

    def _gather_own_group(self, mixed_qkv: torch.Tensor) -> torch.Tensor:
        """With `ng < tp`, a rank holds part of a group's rows: gather, keep its whole group."""
        ranks_per_group = self._groups_shared_by_ranks()
        if ranks_per_group == 1:
            return mixed_qkv
        # [sq, b, group_rows / ranks_per_group] -> [sq, b, total_rows] -> [sq, b, group_rows]
        full = all_gather_last_dim_from_tensor_parallel_region(
            mixed_qkv, group=self.pg_collection.tp
        )
        group = get_pg_rank(self.pg_collection.tp) // ranks_per_group
        rows = self.qkv_layout.group_rows
        return full[..., group * rows : (group + 1) * rows]

    def _own_heads(self, per_head: torch.Tensor) -> torch.Tensor:
        """With `ng < tp`, keep this rank's heads of its group: `[sq, b, hpg, x] -> [sq, b, np_local, x]`."""
        ranks_per_group = self._groups_shared_by_ranks()
        if ranks_per_group == 1:
            return per_head
        # Megatron sets num_attention_heads_per_partition to the whole group's heads here.
        heads = self.qkv_layout.heads_per_group // ranks_per_group
        start = (get_pg_rank(self.pg_collection.tp) % ranks_per_group) * heads
        return per_head[:, :, start : start + heads, :]

    def _apply_output_gate(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """`x [sq, b, np * hn] * sigmoid(gate [sq, b, np, hn | 1])`, fused."""
        for observe in self.gate_observers:
            observe(self, gate.detach())
        return apply_output_gate(x, gate, sigmoid_in_fp32=self.gate_config.sigmoid_in_fp32)

    # ---------------------------------------------------------------- qk-clip (MuonClip)
    def clip_qk(self) -> None:
        """Megatron's qk-clip. With `ng < tp` Megatron expects one max logit per head of the
        rank's whole group, but a rank attends over its own heads only: gather them first."""
        # Only Transformer Engine's attention measures them (TE >= 2.9); tests set them.
        logits = getattr(self.core_attention, "current_max_attn_logits", None)
        if logits is not None and self._groups_shared_by_ranks() > 1:
            self.core_attention.current_max_attn_logits = self._group_max_logits(logits)
        super().clip_qk()

    def _group_max_logits(self, own: torch.Tensor) -> torch.Tensor:
        """`[np / tp]` max logits of this rank's heads -> `[hpg]` of its whole query group."""
        group = self.pg_collection.tp
        gathered = [torch.empty_like(own) for _ in range(get_pg_size(group))]
        torch.distributed.all_gather(gathered, own.contiguous(), group=group)
        # TP ranks hold consecutive heads: [tp, np / tp] -> [np] -> this group's [hpg]
        heads = torch.cat(gathered)
        hpg = self.qkv_layout.heads_per_group
        first = (get_pg_rank(group) // self._groups_shared_by_ranks()) * hpg
        return heads[first : first + hpg]

    def _clip_linear_qkv(self, weight: torch.Tensor) -> torch.Tensor:
        """This rank's `linear_qkv` rows with q rows scaled by `eta ** alpha` and k rows by
        `eta ** (1 - alpha)` of their group; gate, padding and v rows unchanged."""
        # Megatron's clip_qk sets eta [ng_local, 1, 1] (ng_local = 1 when ng < tp)
        eta = self.qk_clip_balancing_eta.reshape(-1).float()
        alpha = self.config.qk_clip_alpha
        # [ng_local * group_rows]
        factors = self.qkv_layout.row_factors({"query": eta**alpha, "key": eta ** (1 - alpha)})
        ranks_per_group = self._groups_shared_by_ranks()
        if ranks_per_group > 1:  # a rank holds one contiguous share of its group's rows
            share = factors.numel() // ranks_per_group
            start = (get_pg_rank(self.pg_collection.tp) % ranks_per_group) * share
            factors = factors[start : start + share]
        # [rows, h] * [rows, 1], in fp32 like Megatron's in-place multiply by an fp32 eta
        return (weight * factors.to(weight.device).unsqueeze(-1)).to(weight.dtype)
