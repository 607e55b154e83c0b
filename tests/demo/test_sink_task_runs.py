"""The Bigram-Backcopy task through `megatron-gate demo` and `sweep`: options, preset, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_gate.cli import build_parser, main
from megatron_gate.demo.cli import PRESETS
from megatron_gate.demo.trainer import VARIANTS, TrainConfig, build_model
from megatron_gate.monitor import schema

TINY = ["--task", "bigram-backcopy", "--layers", "2", "--hidden", "32", "--heads", "2",
        "--seq-len", "16", "--batch-size", "4", "--lr", "1e-2", "--quiet"]  # fmt: skip


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / schema.JSONL_NAME).read_text().splitlines()]


def _layered(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if r["kind"] == "step" and r.get("layers")]


def test_demo_preset_sink_sets_the_task_and_the_model_options() -> None:
    args = build_parser("demo").parse_args(["demo", "--preset", "sink", "--steps", "7"])
    assert args.task == "bigram-backcopy" and args.heads == 1 and args.steps == 7
    assert args.position_embedding == "learned_absolute" and args.weight_decay == 1e-4
    assert "probe_queries=63" in args.monitor_set
    again = build_parser("demo").parse_args(["demo", "--preset", "sink"])
    assert again.steps == PRESETS["sink"]["steps"]
    again.monitor_set.append("x=1")  # the preset's own list is never shared
    assert "x=1" not in PRESETS["sink"]["monitor_set"]


def test_demo_on_the_task_logs_sink_metrics_split_by_query_type(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "4", *TINY, "--position-embedding", "learned_absolute",
                 "--out", str(out), "--monitor-set", "probe_queries=15"])  # fmt: skip
    assert code == 0
    for name in ("baseline", "gated_headwise"):
        records = _records(out / name)
        model = records[0]["model"]
        assert model["position_embedding"] == "learned_absolute"
        assert "bigram-backcopy" in model["data"]
        last = _layered(out / name)[-1]
        for metric in schema.SINK_LAYER_METRICS:
            assert len(last["layers"][metric]) == 2
            assert all(v is not None for v in last["layers"][metric]), metric
        for metric in schema.HEAD_METRICS:
            assert [len(row) for row in last["heads"][metric]] == [2, 2]
        # a quarter of the queries are triggers: both classes are measured, and all = their mix
        flagged = last["layers"]["first_token_share_flagged"]
        unflagged = last["layers"]["first_token_share_unflagged"]
        every = last["layers"]["first_token_attention_share"]
        for low_high, value in zip(zip(flagged, unflagged, strict=True), every, strict=True):
            assert min(low_high) - 1e-6 <= value <= max(low_high) + 1e-6
    report = (out / "report.html").read_text()
    assert "Attention sink (last layer)" in report and "BOS residual" in report


@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
def test_softmax_variants_build_megatrons_offset_softmax(softmax_type: str) -> None:
    from megatron_gate.distributed import init_model_parallel

    name = "softmax_" + softmax_type.replace("-", "_")
    config = TrainConfig(layers=1, hidden=32, heads=2, seq_len=16, batch_size=2)
    init_model_parallel(tp=1)
    model = build_model(config, VARIANTS[name], vocab_size=128, device=torch.device("cpu"))
    core = model.decoder.layers[0].self_attention.core_attention
    assert core.config.softmax_type == softmax_type and core.softmax_offset.shape == (2,)
    learned = isinstance(core.softmax_offset, torch.nn.Parameter)
    assert learned == (softmax_type == "learnable")


def test_sweep_on_the_task_with_tensor_parallel_heads(tmp_path: Path) -> None:
    """TP=2 (two gloo processes, one head each) reports both heads as TP=1 does.

    ("learnable" is left out: Megatron initialises each rank's offsets on its own, so its TP=2
    model is another model.)"""
    common = ["sweep", "--lrs", "1e-2", "--seeds", "0", "--variants",
              "baseline,softmax_off_by_one", "--steps", "2", *TINY[:-1]]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "tp1")]) == 0
    assert main([*common, "--tp", "2", "--out", str(tmp_path / "tp2")]) == 0
    for variant in ("baseline", "softmax_off_by_one"):
        one, two = (_layered(tmp_path / tp / "runs" / variant / "lr0.01_seed0")[0]
                    for tp in ("tp1", "tp2"))  # fmt: skip
        assert one["step"] == two["step"] == 1
        for metric in schema.HEAD_METRICS:
            for row_one, row_two in zip(one["heads"][metric], two["heads"][metric], strict=True):
                assert row_two == pytest.approx(row_one, rel=1e-4, abs=1e-6)
        for metric in ("value_norm_ratio_first_token", "residual_norm_ratio_first_token"):
            assert two["layers"][metric] == pytest.approx(one["layers"][metric], rel=1e-4)
