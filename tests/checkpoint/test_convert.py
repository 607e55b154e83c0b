"""Conversion between Hugging Face Qwen3-Next / the paper's Qwen3 and Megatron gated GPTs.

Real models on both sides: a tiny random `transformers` `Qwen3NextForCausalLM` (full-attention,
dense layers, partial rotary, GQA) saved as safetensors, and Megatron-Core `GPTModel`s built from
the converted checkpoints in one gloo process. Logits are compared in fp32; round trips bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.checkpoint import hf_qwen3_next, paper_qwen3
from megatron_gate.checkpoint.convert import convert, read_hf_dir, read_megatron
from megatron_gate.checkpoint.model import GptShape, build_gpt_from_shape
from megatron_gate.demo.tiny_gpt import causal_mask, position_ids
from megatron_gate.distributed import init_model_parallel, launch

transformers = pytest.importorskip("transformers")

SEQ, BATCH, VOCAB = 12, 2, 96
LOGIT_TOL = 2e-5


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere, norms included (their init is all zeros / ones)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def _qwen3_next(tmp: Path) -> tuple[Path, torch.Tensor]:
    config = transformers.Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        layer_types=["full_attention"] * 2,
        num_experts=0,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000.0,
            "partial_rotary_factor": 0.25,
        },
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.Qwen3NextForCausalLM(config).eval()
    _randomise(model, seed=2)
    with torch.no_grad():
        logits = model(_tokens()).logits
    model.save_pretrained(tmp / "hf")
    return tmp / "hf", logits


def _qwen3_baseline(tmp: Path) -> tuple[Path, torch.Tensor]:
    """`transformers` Qwen3: the paper's baseline (no gate flag) has exactly its tensors."""
    config = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = transformers.Qwen3ForCausalLM(config).eval()
    _randomise(model, seed=3)
    with torch.no_grad():
        logits = model(_tokens()).logits
    model.save_pretrained(tmp / "qwen3")
    return tmp / "qwen3", logits


def _hf_logits(path: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    with torch.no_grad():
        return model.eval()(_tokens()).logits


def _megatron_logits(
    shape: GptShape, state: dict[str, torch.Tensor], **config_overrides: Any
) -> torch.Tensor:
    model = build_gpt_from_shape(shape, **config_overrides).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(key.endswith("_extra_state") for key in missing)
    with torch.no_grad():
        return model(_tokens(), position_ids(BATCH, SEQ), causal_mask(SEQ))


def _paper_gate_reference(q_proj: torch.Tensor, x: torch.Tensor, shape: GptShape) -> torch.Tensor:
    """The authors' forward: `q_proj(x).view(s, b, ng, -1).split([hpg*hn, hpg*g])`, gate per head."""
    layout = shape.qkv_layout()
    sizes = layout.segment_sizes
    projected = (x @ q_proj.T).view(*x.shape[:2], shape.num_query_groups, -1)
    _, gate = torch.split(projected, [sizes["query"], sizes["gate"]], dim=-1)
    return gate.reshape(*x.shape[:2], shape.num_attention_heads, layout.gate_rows_per_head)


def _paper_gate_check(granularity: str) -> dict[str, Any]:
    """Megatron's gate (from `linear_qkv`) == the authors' gate (from `q_proj`) for every head."""
    shape = GptShape(
        num_layers=1, hidden_size=64, ffn_hidden_size=80, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, vocab_size=VOCAB, granularity=granularity,
    )  # fmt: skip
    torch.manual_seed(4)
    model = build_gpt_from_shape(shape).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    paper = paper_qwen3.megatron_to_paper(state, shape)
    x = torch.randn(SEQ, BATCH, shape.hidden_size)
    attention = model.decoder.layers[0].self_attention
    with torch.no_grad():
        _, _, _, gate = attention.get_query_key_value_tensors(x)
    expected = _paper_gate_reference(paper["model.layers.0.self_attn.q_proj.weight"], x, shape)
    back = paper_qwen3.paper_to_megatron(paper, shape)
    return {
        "gate_diff": (gate - expected).abs().max().item(),
        "round_trip_exact": all(torch.equal(back[k], state[k]) for k in state),
        "gate_shape": tuple(gate.shape),
    }


def _worker(_rank: int, _world: int, paths: dict[str, str]) -> dict[str, Any]:
    init_model_parallel(tp=1, pp=1)
    results = {}
    for name in ("next", "next_zero_centred", "baseline"):
        shape, state = read_megatron(paths[name])
        if shape.layernorm_zero_centered_gamma:
            continue  # TE-only norms: no local model; checked bit for bit instead
        results[name] = _megatron_logits(shape, state).numpy()  # tensors cannot leave a worker
    # Negative controls: the parity test must notice a wrong rotary convention or width.
    shape, state = read_megatron(paths["next"])
    results["next_interleaved_rope"] = _megatron_logits(
        shape, state, rotary_interleaved=True
    ).numpy()
    results["next_full_rope"] = _megatron_logits(shape.replace(rotary_percent=1.0), state).numpy()
    for granularity in ("elementwise", "headwise"):
        results[f"paper-{granularity}"] = _paper_gate_check(granularity)
    return results


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("convert")
    hf_dir, hf_logits = _qwen3_next(tmp)
    baseline_dir, baseline_logits = _qwen3_baseline(tmp)
    paths = {
        "next": convert(hf_dir, tmp / "next.pt", from_format="hf", to_format="megatron"),
        "next_zero_centred": convert(
            hf_dir, tmp / "next_zc.pt", from_format="hf", to_format="megatron",
            zero_centered_gamma=True,
        ),
        "baseline": convert(baseline_dir, tmp / "base.pt", from_format="paper", to_format="megatron"),
    }  # fmt: skip
    results = launch(_worker, world_size=1, payload={k: str(v) for k, v in paths.items()})[0]
    for name in ("next", "baseline", "next_interleaved_rope", "next_full_rope"):
        results[name] = torch.from_numpy(results[name])
    return {
        "tmp": tmp, "hf_dir": hf_dir, "hf_logits": hf_logits, "baseline_dir": baseline_dir,
        "baseline_logits": baseline_logits, "paths": paths, "results": results,
    }  # fmt: skip


def test_qwen3_next_logits_match_megatron(converted: dict) -> None:
    diff = (converted["results"]["next"] - converted["hf_logits"]).abs().max().item()
    assert diff < LOGIT_TOL, diff
    assert converted["hf_logits"].abs().max() > 0.1  # not a trivially small output


@pytest.mark.parametrize("control", ["next_interleaved_rope", "next_full_rope"])
def test_wrong_rotary_convention_is_detected(converted: dict, control: str) -> None:
    """Interleaved-pair RoPE or full-width RoPE on the same weights must not match HF."""
    diff = (converted["results"][control] - converted["hf_logits"]).abs().max().item()
    assert diff > 100 * LOGIT_TOL, diff


def test_paper_baseline_logits_match_megatron(converted: dict) -> None:
    diff = (converted["results"]["baseline"] - converted["baseline_logits"]).abs().max().item()
    assert diff < LOGIT_TOL, diff


def test_megatron_to_qwen3_next_logits_and_round_trip(converted: dict) -> None:
    tmp = converted["tmp"]
    back = convert(
        converted["paths"]["next"], tmp / "hf_back", from_format="megatron", to_format="hf"
    )
    diff = (_hf_logits(back) - converted["hf_logits"]).abs().max().item()
    assert diff < LOGIT_TOL, diff
    # Megatron -> HF -> Megatron is bit-exact (g - 1 + 1 == g for norm scales in [0.5, 2]).
    again = convert(back, tmp / "next_again.pt", from_format="hf", to_format="megatron")
    _, first = read_megatron(converted["paths"]["next"])
    _, second = read_megatron(again)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # HF -> Megatron -> HF: every tensor bit-exact except norms (w -> 1 + w -> w loses < 1 ulp of 1).
    _, original = read_hf_dir(converted["hf_dir"])
    _, returned = read_hf_dir(back)
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        if key.endswith("norm.weight") or key.endswith("layernorm.weight"):
            assert (tensor - returned[key]).abs().max() <= 2**-23, key
        else:
            assert torch.equal(tensor, returned[key]), key


def test_zero_centred_round_trip_is_bit_exact(converted: dict) -> None:
    tmp = converted["tmp"]
    shape, state = read_megatron(converted["paths"]["next_zero_centred"])
    assert shape.layernorm_zero_centered_gamma
    _, hf = read_hf_dir(converted["hf_dir"])
    assert torch.equal(state["decoder.final_layernorm.weight"], hf["model.norm.weight"])
    back = convert(
        converted["paths"]["next_zero_centred"],
        tmp / "hf_zc",
        from_format="megatron",
        to_format="hf",
    )
    _, returned = read_hf_dir(back)
    assert all(torch.equal(hf[k], returned[k]) for k in hf)


def test_qwen3_next_q_proj_is_per_head_query_then_gate(converted: dict) -> None:
    """The HF q_proj rows of head h are [q_h | gate_h]: check against the fused Megatron rows."""
    shape, state = read_megatron(converted["paths"]["next"])
    _, hf = read_hf_dir(converted["hf_dir"])
    heads = shape.qkv_layout().split_weight(
        state["decoder.layers.1.self_attention.linear_qkv.weight"]
    )
    q_proj = hf["model.layers.1.self_attn.q_proj.weight"]
    hn = shape.kv_channels
    for head in range(shape.num_attention_heads):
        rows = q_proj[head * 2 * hn : (head + 1) * 2 * hn]
        assert torch.equal(rows[:hn], heads["query"][head])
        assert torch.equal(rows[hn:], heads["gate"][head])


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
def test_paper_layout_gate_per_head_and_round_trip(converted: dict, granularity: str) -> None:
    result = converted["results"][f"paper-{granularity}"]
    assert result["gate_diff"] < 1e-5
    assert result["round_trip_exact"]
    assert result["gate_shape"][-1] == (16 if granularity == "elementwise" else 1)


def test_paper_round_trip_through_files_is_bit_exact(converted: dict, tmp_path: Path) -> None:
    back = convert(
        converted["paths"]["baseline"],
        tmp_path / "paper",
        from_format="megatron",
        to_format="paper",
    )
    config, returned = read_hf_dir(back)
    _, original = read_hf_dir(converted["baseline_dir"])
    assert paper_qwen3.granularity_of(config) is None
    assert all(torch.equal(original[k], returned[k]) for k in original)


def test_headwise_cannot_become_qwen3_next() -> None:
    shape = GptShape(
        num_layers=1, hidden_size=64, ffn_hidden_size=80, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, vocab_size=VOCAB, granularity="headwise",
    )  # fmt: skip
    with pytest.raises(ValueError, match="granularity='headwise'.*paper"):
        hf_qwen3_next.config_from_shape(shape)


@pytest.mark.parametrize("granularity", ["elementwise", "headwise"])
def test_paper_gated_files_round_trip(tmp_path: Path, granularity: str) -> None:
    from megatron_gate.checkpoint.convert import write_hf_dir

    shape = GptShape(
        num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
        num_query_groups=2, kv_channels=8, vocab_size=VOCAB, granularity=granularity,
        qk_layernorm=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(9)
    tensors = {
        key: torch.randn(size, generator=generator)
        for key, size in paper_qwen3.expected_paper_shapes(shape).items()
    }
    source = write_hf_dir(
        tmp_path / "paper", paper_qwen3.config_from_shape(shape), tensors, force=False
    )
    megatron = convert(source, tmp_path / "m.pt", from_format="paper", to_format="megatron")
    assert read_megatron(megatron)[0].granularity == granularity
    back = convert(megatron, tmp_path / "back", from_format="megatron", to_format="paper")
    config, returned = read_hf_dir(back)
    assert paper_qwen3.granularity_of(config) == granularity
    assert returned.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], returned[k]) for k in tensors)
