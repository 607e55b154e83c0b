"""`GptShape`: the architecture a Megatron checkpoint holds, and how to build that GPT.

A Megatron checkpoint stores tensors, not the model's shape; converters, the retrofit and the
resharder need both. `GptShape` is the small, JSON-serialisable description they share (written
next to every checkpoint megatron-gate produces as `megatron_gate_model.json`, or inside a
full state-dict file), and `build_gpt_from_shape` builds the matching Megatron-Core `GPTModel`
with Megatron's local modules (CPU-friendly, fp32) on the current parallel state.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megatron_gate.checkpoint.safe_io import CheckpointError
from megatron_gate.layout import QkvLayout, build_layout

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

SHAPE_FILE = "megatron_gate_model.json"


@dataclass(frozen=True, kw_only=True)
class GptShape:
    """Architecture of a (gated or plain) Megatron-Core GPT, as its checkpoint needs it."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    """`ng`: key/value heads (GQA)."""
    kv_channels: int
    """`hn`: head dim."""
    vocab_size: int
    max_sequence_length: int = 4096
    granularity: str | None = "elementwise"
    """Gate granularity of every attention layer: "elementwise", "headwise" or None (no gate)."""
    rotary_percent: float = 1.0
    """Share of each head's channels that are rotated (Qwen3-Next: `partial_rotary_factor`)."""
    rotary_base: float = 10000.0
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    layernorm_zero_centered_gamma: bool = False
    """Norm weights are stored as `w` with scale `1 + w` (TE only); else as the scale itself."""
    qk_layernorm: bool = False
    gated_linear_unit: bool = True
    """SwiGLU MLP: `linear_fc1` rows are `[gate_proj; up_proj]`."""
    activation: str = "silu"
    add_bias_linear: bool = False
    untie_embeddings_and_output_weights: bool = True

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.granularity not in ("elementwise", "headwise", None):
            raise CheckpointError(
                f"GptShape.granularity={self.granularity!r}; use 'elementwise', 'headwise' or None."
            )
        if self.activation not in ACTIVATIONS:
            raise CheckpointError(
                f"GptShape.activation={self.activation!r}; use one of {', '.join(ACTIVATIONS)}."
            )
        if self.num_attention_heads % self.num_query_groups:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}."
            )

    def qkv_layout(self) -> QkvLayout:
        """Fused `linear_qkv` rows of one layer (full model, no FP8 padding)."""
        return build_layout(
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            head_dim=self.kv_channels,
            granularity=self.granularity,
        )

    def replace(self, **changes: Any) -> GptShape:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> GptShape:
        """Inverse of `to_dict`; unknown or missing fields raise a `CheckpointError`."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise CheckpointError(f"unknown model-shape fields {unknown}; known: {sorted(known)}.")
        try:
            return cls(**fields)
        except TypeError as error:
            raise CheckpointError(f"incomplete model shape: {error}") from error

    def save_json(self, path: Path) -> None:
        """Write the shape as JSON (callers write into a temporary directory)."""
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load_json(cls, path: str | Path) -> GptShape:
        """Read a shape written by `save_json` (a JSON object of `GptShape` fields)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(
                f"model shape file {path} does not exist; pass --model-config with a "
                f"{SHAPE_FILE} describing the model."
            )
        fields = read_json_object(path, what="model shape")
        try:
            return cls.from_dict(fields)
        except CheckpointError as error:
            raise CheckpointError(f"{error} ({path})") from None


MAX_JSON_BYTES = 16 << 20
"""Config and index JSON files larger than this are refused unread."""


def read_json_object(path: Path, *, what: str) -> dict[str, Any]:
    """The JSON object in `path`; a `CheckpointError` naming the file for anything else."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(
                f"{what} file is larger than {MAX_JSON_BYTES >> 20} MiB ({path}): pass the "
                "small JSON file the model was saved with."
            )
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise CheckpointError(
            f"{what} file is not valid UTF-8 JSON ({path}): {str(error)[:200]}; fix or "
            "regenerate the file."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{what} file holds a {type(data).__name__}, not a JSON object ({path}): expected "
            '{"field": value, ...}.'
        )
    return data


_FIELD_KINDS = {"int": int, "float": float, "bool": bool, "str": str}


def _check_field_types(shape: GptShape) -> None:
    """Every field has its declared type; sizes are >= 1 and floats finite (no ZeroDivision or
    a 0-layer model later)."""
    for field in dataclasses.fields(shape):
        value = getattr(shape, field.name)
        declared = str(field.type).replace(" ", "")
        if declared == "str|None" and value is None:
            continue
        kind = _FIELD_KINDS[declared.split("|")[0]]
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise CheckpointError(
                f"model shape field {field.name}={value!r} is not a {declared} (model config): "
                "fix the value in config.json or --model-config."
            )
        positive = kind in (int, float) and field.name not in ("rotary_percent",)
        if (
            (kind is float and not math.isfinite(value))
            or (positive and value <= 0)
            or (field.name == "rotary_percent" and not 0 < value <= 1)
        ):
            raise CheckpointError(
                f"model shape field {field.name}={value!r} is out of range (model config): "
                "sizes must be >= 1, numbers finite and > 0, rotary_percent in (0, 1]."
            )


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def transformer_config(shape: GptShape, **overrides: Any) -> TransformerConfig:
    """The fp32, CPU-friendly `TransformerConfig` of `shape`."""
    from megatron_gate.demo.tiny_gpt import tiny_config

    fields: dict[str, Any] = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        kv_channels=shape.kv_channels,
        normalization=shape.normalization,
        layernorm_epsilon=shape.layernorm_epsilon,
        layernorm_zero_centered_gamma=shape.layernorm_zero_centered_gamma,
        qk_layernorm=shape.qk_layernorm,
        gated_linear_unit=shape.gated_linear_unit,
        activation_func=ACTIVATIONS[shape.activation],
        add_bias_linear=shape.add_bias_linear,
    )
    fields.update(overrides)
    return tiny_config(**fields)


def layer_spec(shape: GptShape) -> ModuleSpec:
    """Megatron's local GPT layer spec, gated with `shape.granularity` (plain when None)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_gate.spec import gated_gpt_layer_spec

    if shape.granularity is None:
        return get_gpt_layer_local_spec(
            qk_layernorm=shape.qk_layernorm, normalization=shape.normalization
        )
    return gated_gpt_layer_spec(
        granularity=shape.granularity,
        backend="local",
        qk_layernorm=shape.qk_layernorm,
        normalization=shape.normalization,
    )


def build_gpt_from_shape(
    shape: GptShape, *, pre_process: bool = True, post_process: bool = True, **config_overrides: Any
) -> torch.nn.Module:
    """A Megatron-Core `GPTModel` of `shape` on this rank's pipeline stage (parallel state set)."""
    from megatron.core.models.gpt import GPTModel

    if shape.layernorm_zero_centered_gamma:
        raise CheckpointError(
            "layernorm_zero_centered_gamma=True needs Transformer Engine norms; Megatron's local "
            "RMSNorm cannot build it. Convert with zero-centred gamma off (weights stored as 1 + w)."
        )
    return GPTModel(
        config=transformer_config(shape, **config_overrides),
        transformer_layer_spec=layer_spec(shape),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=shape.rotary_percent,
        rotary_base=shape.rotary_base,
    )


def expected_full_shapes(shape: GptShape) -> dict[str, tuple[int, ...]]:
    """Every tensor of the full (TP=1, PP=1) state dict of `shape`, with its shape.

    Keys are those of `GPTModel.state_dict()` with Megatron's local modules.
    """
    hidden, ffn = shape.hidden_size, shape.ffn_hidden_size
    heads_dim = shape.num_attention_heads * shape.kv_channels
    shapes: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (shape.vocab_size, hidden)
    }
    fc1_rows = 2 * ffn if shape.gated_linear_unit else ffn
    for index in range(shape.num_layers):
        prefix = f"decoder.layers.{index}."
        layer = {
            "input_layernorm.weight": (hidden,),
            "self_attention.linear_qkv.weight": (shape.qkv_layout().total_rows, hidden),
            "self_attention.linear_proj.weight": (hidden, heads_dim),
            "pre_mlp_layernorm.weight": (hidden,),
            "mlp.linear_fc1.weight": (fc1_rows, hidden),
            "mlp.linear_fc2.weight": (hidden, ffn),
        }
        if shape.qk_layernorm:
            layer["self_attention.q_layernorm.weight"] = (shape.kv_channels,)
            layer["self_attention.k_layernorm.weight"] = (shape.kv_channels,)
        if shape.add_bias_linear:
            layer["self_attention.linear_qkv.bias"] = (shape.qkv_layout().total_rows,)
            layer["self_attention.linear_proj.bias"] = (hidden,)
            layer["mlp.linear_fc1.bias"] = (fc1_rows,)
            layer["mlp.linear_fc2.bias"] = (hidden,)
        shapes.update({prefix + name: size for name, size in layer.items()})
    shapes["decoder.final_layernorm.weight"] = (hidden,)
    if shape.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (shape.vocab_size, hidden)
    return shapes


def _named(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_tensors(
    tensors: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...]],
    *,
    source: str,
    hint: str,
) -> None:
    """Raise a `CheckpointError` naming missing, unexpected and mis-shaped tensors.

    `tensors` must hold exactly `expected`: an extra tensor (say `model.layers.2.*` when the
    config declares two layers) would otherwise be dropped silently. `hint` says which
    description the tensors were compared with (config.json, --model-config, ...).
    """
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            f"{source}: tensor {_named(missing)} is missing ({len(missing)} missing) ({hint}): "
            "pass the complete checkpoint or fix the model description."
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {_named(unexpected)} ({len(unexpected)} unexpected) "
            f"({hint}): the checkpoint holds more than its description declares (e.g. more "
            "layers); fix the description or remove the extra tensors."
        )
    for key, size in expected.items():
        found = tuple(tensors[key].shape)
        if found != size:
            raise CheckpointError(
                f"{source}: tensor {key} has shape {list(found)}, expected {list(size)} ({hint})."
            )


def check_full_state_dict(
    state_dict: dict[str, torch.Tensor], shape: GptShape, *, source: str
) -> None:
    """Raise a `CheckpointError` naming missing, unexpected or mis-shaped tensors."""
    tensors = {key: value for key, value in state_dict.items() if not key.endswith("_extra_state")}
    check_tensors(tensors, expected_full_shapes(shape), source=source, hint="model shape")


def shape_from_hf_config(config: dict[str, Any], **architecture: Any) -> GptShape:
    """A `GptShape` from the fields every Llama-family Hugging Face `config.json` shares.

    `architecture` holds what the family decides itself (granularity, RoPE, norms, ...).
    Raises a `CheckpointError` for an activation other than SiLU.
    """
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json hidden_act={config['hidden_act']!r}; expected 'silu'.")
    heads, hidden = hf_int(config, "num_attention_heads"), hf_int(config, "hidden_size")
    return GptShape(
        num_layers=hf_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        ffn_hidden_size=hf_int(config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=hf_int(config, "num_key_value_heads", heads),
        kv_channels=hf_int(config, "head_dim", hidden // heads),
        vocab_size=hf_int(config, "vocab_size"),
        max_sequence_length=hf_int(config, "max_position_embeddings", 4096),
        normalization="RMSNorm",
        layernorm_epsilon=config.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        **architecture,
    )


def hf_int(config: dict[str, Any], name: str, default: int | None = None) -> int:
    """`config[name]` as a positive int (`default` when absent or null); a `CheckpointError`
    naming the field otherwise."""
    value = config.get(name)
    if value is None:
        if default is None:
            raise CheckpointError(
                f"config.json lacks {name} (config.json): add it (a positive integer)."
            )
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"config.json {name}={value!r} is not a positive integer (config.json): fix the value."
        )
    return value


def hf_config_fields(shape: GptShape) -> dict[str, Any]:
    """Inverse of `shape_from_hf_config`: the shared Llama-family `config.json` fields."""
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_query_groups,
        "head_dim": shape.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_sequence_length,
        "rms_norm_eps": shape.layernorm_epsilon,
        "tie_word_embeddings": not shape.untie_embeddings_and_output_weights,
        "attention_bias": False,
    }
