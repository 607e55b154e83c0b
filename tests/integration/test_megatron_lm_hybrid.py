"""HybridModel through `python -m megatron_gate.run` with a hybrid entry script (CPU, gloo):
the `*` layers of the pattern are gated, the start-up check and the monitor see them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_runs import EXAMPLES, TINY_GPT, run_pretrain

from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow
pytest.importorskip("megatron.training.models.hybrid", reason="needs megatron-core >= 0.19")

HYBRID_SCRIPT = EXAMPLES / "pretrain_hybrid_min.py"
PATTERN = "*-*-"


def _hybrid_flags() -> tuple[str, ...]:
    flags = list(TINY_GPT)
    flags[flags.index("--num-layers") + 1] = str(len(PATTERN))
    return (*flags, "--hybrid-layer-pattern", PATTERN)


def _run(tmp_path: Path, *args: str):
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text("log_interval: 1\nlayer_interval: 2\nsinks:\n  console: false\n")
    return run_pretrain(
        HYBRID_SCRIPT, "--train-iters", "4", "--stability-config", str(monitor_yaml),
        "--stability-dir", str(tmp_path / "stability"), *args, model_flags=_hybrid_flags(),
    )  # fmt: skip


def test_gated_attention_flag_gates_the_pattern_attention_layers(tmp_path: Path) -> None:
    # Megatron-Core ships only a TE hybrid stack spec: on the CPU the local one is named.
    run = _run(tmp_path, "--gated-attention", "headwise", "--spec", "megatron_gate.hybrid_spec",
               "local")  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    assert run.lines("megatron-gate: gated attention on layers 1,3 of 2 attention layers | "
                     "granularity headwise | backend local | TP=1 PP=1 DP=1 CP=1")  # fmt: skip
    assert sorted(run.losses()) == [1, 2, 3, 4]
    records = read_records(tmp_path / "stability")
    assert records[0]["model"]["gated_layers"] == [1, 3]
    layer_step = next(r for r in records if r["kind"] == "step" and r["step"] == 2)
    gate_mean = layer_step["layers"]["gate_mean"]
    assert [value is not None for value in gate_mean] == [True, False, True, False]
    assert records[-1]["kind"] == "run_end" and records[-1]["status"] == "completed"


def test_conflicting_gate_requests_on_a_hybrid_model_stop(tmp_path: Path) -> None:
    """`--spec megatron_gate.hybrid_spec headwise` is gated already: another granularity stops."""
    run = _run(tmp_path, "--gated-attention", "elementwise", "--spec",
               "megatron_gate.hybrid_spec", "headwise")  # fmt: skip
    assert run.returncode == 2, run.output[-3000:]
    assert "megatron-gate run: error: --gated-attention elementwise conflicts with a spec" in (
        run.output
    )
    assert not run.losses()
