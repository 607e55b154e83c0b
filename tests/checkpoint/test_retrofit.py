"""Retrofit: a gated model built from a non-gated checkpoint gives the same logits, bit for bit.

Real Megatron-Core models in one gloo process: a plain GPT (with and without linear biases) and a
GPT with Megatron's native `attention_output_gate=True`; their state dicts are retrofitted and
loaded into `GatedSelfAttention` models of both granularities.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.checkpoint.convert import read_megatron, write_megatron
from megatron_gate.checkpoint.model import GptShape, build_gpt_from_shape
from megatron_gate.checkpoint.retrofit import retrofit, retrofit_state_dict
from megatron_gate.checkpoint.safe_io import CheckpointError
from megatron_gate.demo.tiny_gpt import causal_mask, position_ids
from megatron_gate.distributed import init_model_parallel, launch

SEQ, BATCH = 16, 2
PLAIN = GptShape(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=128,
    granularity=None,
    qk_layernorm=True,
)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    tokens = torch.randint(
        0, PLAIN.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        return model(tokens, position_ids(BATCH, SEQ), causal_mask(SEQ))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _load(shape: GptShape, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = build_gpt_from_shape(shape).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    return model


def _gate_grad_norm(model: torch.nn.Module, shape: GptShape) -> float:
    """Norm of the loss gradient reaching the (zero) gate rows: the gate must start learning."""
    tokens = torch.randint(
        0, PLAIN.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)
    )
    logits = model(tokens, position_ids(BATCH, SEQ), causal_mask(SEQ))
    logits.float().pow(2).mean().backward()
    grad = model.decoder.layers[0].self_attention.linear_qkv.weight.grad
    return shape.qkv_layout().split_weight(grad)["gate"].norm().item()


def _randomise_biases(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)


def _worker(_rank: int, _world: int, _payload: Any) -> dict[str, Any]:
    init_model_parallel(tp=1, pp=1, seed=3)
    results: dict[str, Any] = {}
    for bias in (False, True):
        plain_shape = PLAIN.replace(add_bias_linear=bias)
        plain = build_gpt_from_shape(plain_shape).eval()
        _randomise_biases(plain)
        reference = _logits(plain)
        for granularity in ("elementwise", "headwise"):
            shape, state = retrofit_state_dict(_state(plain), plain_shape, granularity=granularity)
            gated = _load(shape, state)
            logits = _logits(gated)
            results[f"{granularity}-bias{bias}"] = {
                "equal": torch.equal(logits, reference),
                "max_diff": (logits - reference).abs().max().item(),
                "gated_class": type(gated.decoder.layers[0].self_attention).__name__,
                "gate_grad": _gate_grad_norm(gated, shape),
            }
    # Megatron's native elementwise gate: same rows, imported unchanged.
    native = build_gpt_from_shape(PLAIN, attention_output_gate=True).eval()
    reference = _logits(native)
    gated = _load(PLAIN.replace(granularity="elementwise"), _state(native))
    results["native"] = {
        "max_diff": (_logits(gated) - reference).abs().max().item(),
        "gated_class": type(gated.decoder.layers[0].self_attention).__name__,
        "native_state": {k: v.numpy() for k, v in _state(native).items()},  # tensors can't leave
    }
    return results


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return launch(_worker, world_size=1)[0]


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
@pytest.mark.parametrize("bias", [False, True])
def test_retrofit_gives_identical_logits(results: dict, granularity: str, bias: bool) -> None:
    result = results[f"{granularity}-bias{bias}"]
    assert result["gated_class"] == "GatedSelfAttention"
    assert result["equal"], result["max_diff"]
    assert result["gate_grad"] > 0


def test_native_attention_output_gate_imports_unchanged(results: dict, tmp_path: Path) -> None:
    assert results["native"]["gated_class"] == "GatedSelfAttention"
    assert results["native"]["max_diff"] < 1e-6
    # Through files: a native checkpoint (shape says no gate, rows are elementwise) is imported.
    state = {k: torch.from_numpy(v) for k, v in results["native"]["native_state"].items()}
    native_file = tmp_path / "native.pt"
    write_megatron(native_file, PLAIN.replace(granularity="elementwise"), state, force=False)
    retrofit(native_file, tmp_path / "gated.pt", source_gate="native")
    shape, imported = read_megatron(tmp_path / "gated.pt")
    assert shape.granularity == "elementwise"
    assert all(torch.equal(imported[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="headwise model cannot reproduce"):
        retrofit(native_file, tmp_path / "h.pt", source_gate="native", granularity="headwise")


def test_retrofit_file_doubles_projection_and_zeroes_gates(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(5)
    from megatron_gate.checkpoint.model import expected_full_shapes

    state = {k: torch.randn(s, generator=generator) for k, s in expected_full_shapes(PLAIN).items()}
    write_megatron(tmp_path / "plain.pt", PLAIN, state, force=False)
    retrofit(tmp_path / "plain.pt", tmp_path / "gated.pt", granularity="headwise")
    shape, gated = read_megatron(tmp_path / "gated.pt")
    key = "decoder.layers.1.self_attention."
    heads = shape.qkv_layout().split_weight(gated[key + "linear_qkv.weight"])
    plain_heads = PLAIN.qkv_layout().split_weight(state[key + "linear_qkv.weight"])
    assert heads["gate"].shape == (4, 1, 64) and not heads["gate"].any()
    for part in ("query", "key", "value"):
        assert torch.equal(heads[part], plain_heads[part])
    assert torch.equal(gated[key + "linear_proj.weight"], 2 * state[key + "linear_proj.weight"])
    with pytest.raises(CheckpointError, match="already gated"):
        retrofit(tmp_path / "gated.pt", tmp_path / "twice.pt")
    assert not (tmp_path / "twice.pt").exists()
