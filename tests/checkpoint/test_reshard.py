"""torch_dist checkpoints of gated GPTs saved at one TP/PP layout and loaded at another.

One 2-process gloo launch runs every case. On each rank a TP=1/PP=1 reference model gives the
full weights, the gate logits of every head and the logits. The full weights are sliced into a
model at the save layout (plain reference slicing kept here), saved with
`megatron.core.dist_checkpointing`, and loaded into a freshly initialised model at each load
layout. Checked after each load: every local tensor equals the reference's slice bit for bit,
every head's gate logits equal the reference head's, and the logits match.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from megatron_gate.checkpoint.model import GptShape, build_gpt_from_shape
from megatron_gate.checkpoint.reshard import load_distributed, save_distributed
from megatron_gate.demo.tiny_gpt import random_batch, run_pipeline
from megatron_gate.distributed import init_model_parallel, launch

SEQ, BATCH = 16, 2
BASE = GptShape(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vocab_size=128,
    max_sequence_length=SEQ,
    qk_layernorm=True,
    rotary_percent=0.5,
)
# (name, granularity, query groups, save layout (tp, pp), load layouts)
CASES: list[tuple[str, str, int, tuple[int, int], list[tuple[int, int]]]] = [
    ("elementwise-tp2", "elementwise", 2, (2, 1), [(1, 1), (1, 2)]),
    ("elementwise-tp1", "elementwise", 2, (1, 1), [(2, 1)]),
    ("headwise-tp2", "headwise", 2, (2, 1), [(1, 1), (1, 2)]),
    ("headwise-tp1", "headwise", 2, (1, 1), [(2, 1)]),
    ("elementwise-groups<tp", "elementwise", 1, (2, 1), [(1, 1)]),
    ("elementwise-groups<tp-load", "elementwise", 1, (1, 1), [(2, 1)]),
    ("headwise-groups<tp", "headwise", 1, (2, 1), [(1, 1)]),
    ("headwise-groups<tp-load", "headwise", 1, (1, 1), [(2, 1)]),
]


def _batch() -> dict[str, torch.Tensor]:
    return random_batch(
        batch=BATCH, seq_len=SEQ, vocab_size=BASE.vocab_size, seed=3, with_labels=False
    )


def _build(shape: GptShape, pp: int) -> torch.nn.Module:
    from megatron.core import parallel_state

    return build_gpt_from_shape(
        shape,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
    ).eval()


def _global_name(model: torch.nn.Module, name: str) -> str:
    """Local `decoder.layers.i.` -> the global layer index (pipeline stages renumber from 0)."""
    layers = model.decoder.layers
    return re.sub(
        r"decoder\.layers\.(\d+)\.",
        lambda m: f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.",
        name,
    )


def _reference_shard(full: torch.Tensor, name: str, param: torch.nn.Parameter) -> torch.Tensor:
    """This TP rank's slice of a full tensor: a plain split, SwiGLU's fc1 split per half."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=param.partition_dim)[rank]


def _capture_gates(model: torch.nn.Module) -> dict[int, torch.Tensor]:
    """Record each layer's pre-sigmoid gate `[sq, b, np_local, g]` by global layer index."""
    captured: dict[int, torch.Tensor] = {}
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        layer.self_attention.gate_observers.append(
            lambda _module, gate, index=index: captured.__setitem__(index, gate.clone())
        )
    return captured


def _forward(model: torch.nn.Module, pp: int) -> torch.Tensor | None:
    """Full-vocabulary logits `[b, s, v]` on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        if pp == 1:
            logits = model(**_batch())
        else:
            stored = run_pipeline(
                model,
                _batch(),
                loss_fn=lambda out: (out.sum(), {"logits": out.detach()}),
                forward_only=True,
            )
            if not parallel_state.is_pipeline_last_stage():
                return None
            logits = stored[0]["logits"]
    return gather_from_tensor_model_parallel_region(logits)


def _check_load(
    shape: GptShape, directory: Path, layout: tuple[int, int], reference: dict[str, Any]
) -> dict[str, float]:
    from megatron.core import parallel_state

    tp, pp = layout
    init_model_parallel(tp=tp, pp=pp, seed=1000 + tp * 10 + pp)  # weights differ before the load
    model = _build(shape, pp)
    load_distributed(model, directory)
    for name, param in model.named_parameters():
        expected = _reference_shard(reference["weights"][_global_name(model, name)], name, param)
        assert torch.equal(param, expected), f"{name} at TP={tp}, PP={pp} differs after the load"
    gates = _capture_gates(model)
    logits = _forward(model, pp)
    heads = shape.num_attention_heads // tp
    first = parallel_state.get_tensor_model_parallel_rank() * heads
    gate_diff = 0.0
    for index, gate in gates.items():
        expected = reference["gates"][index][:, :, first : first + heads]
        gate_diff = max(gate_diff, (gate - expected).abs().max().item())
    logit_diff = None if logits is None else (logits - reference["logits"]).abs().max().item()
    return {"gate_diff": gate_diff, "logit_diff": logit_diff, "gates_seen": len(gates)}


def _run_case(tmp: Path, name: str, granularity: str, groups: int, save, loads) -> dict:  # noqa: ANN001
    shape = BASE.replace(granularity=granularity, num_query_groups=groups)
    init_model_parallel(tp=1, pp=1, seed=5)
    full = _build(shape, pp=1)
    gates = _capture_gates(full)
    reference = {
        "weights": {n: p.detach().clone() for n, p in full.named_parameters()},
        "logits": _forward(full, pp=1),
        "gates": gates,
    }
    tp, pp = save
    init_model_parallel(tp=tp, pp=pp, seed=77)
    model = _build(shape, pp)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            full_tensor = reference["weights"][_global_name(model, param_name)]
            param.copy_(_reference_shard(full_tensor, param_name, param))
    directory = tmp / name
    save_distributed(model, directory, shape=shape)
    return {f"tp{t}pp{p}": _check_load(shape, directory, (t, p), reference) for t, p in loads}


def _worker(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    return {case[0]: _run_case(Path(tmp), *case) for case in CASES}


@pytest.fixture(scope="module")
def reshard_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return launch(_worker, world_size=2, payload=str(tmp_path_factory.mktemp("reshard")))


@pytest.mark.parametrize("case", [case[0] for case in CASES])
def test_reshard_keeps_every_gate_row_with_its_head(reshard_results: list, case: str) -> None:
    for load, _ in reshard_results[0][case].items():
        per_rank = [rank_results[case][load] for rank_results in reshard_results]
        assert all(result["gate_diff"] < 1e-5 for result in per_rank), (load, per_rank)
        assert sum(result["gates_seen"] for result in per_rank) >= BASE.num_layers
        logit_diffs = [r["logit_diff"] for r in per_rank if r["logit_diff"] is not None]
        assert logit_diffs, "no rank produced logits"
        assert max(logit_diffs) < 1e-5, (load, logit_diffs)
