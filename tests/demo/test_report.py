"""The demo report reads the monitor's JSONL: counts, per-layer values, torn lines, HTML."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_gate.demo import report
from megatron_gate.monitor import schema


def _write_run(run_dir: Path, *, name: str, gated: bool) -> None:
    run_dir.mkdir(parents=True)
    records = [{"kind": "run_start", "run": name, "model": {"train": {"lr": 0.1, "seed": 3}}}]
    for step in range(1, 21):
        record = {
            "kind": "step",
            "step": step,
            "scalars": {"loss": 5.0 - step / 10, "grad_norm": 1.0},
        }
        if step % 10 == 0:
            record["layers"] = {
                "max_abs_residual": [step * 1.0, step * 2.0],
                "first_token_attention_share": [0.2, 0.4],
                "max_attention_logit": [3.0, 7.0],
                "gate_mean": [0.25, 0.75] if gated else [None, None],
            }
        records.append(record)
    records += [
        {"kind": "event", "step": 12, "detector": "loss_spike", "metric": "loss", "value": 9.0},
        {"kind": "event", "step": 15, "detector": "loss_spike", "metric": "loss", "value": 9.0},
        {"kind": "event", "step": 20, "detector": "attention_logit_growth", "layer": 2},
        {"kind": "run_end", "step": 20, "status": "completed"},
    ]
    lines = [json.dumps({"schema": schema.SCHEMA, **r}) for r in records]
    (run_dir / schema.JSONL_NAME).write_text("\n".join(lines) + '\n{"kind": "step", "st')
    (run_dir / "validation.jsonl").write_text('{"step": 20, "validation_loss": 3.25}\n')


def test_summary_reads_counts_and_last_layer_values(tmp_path: Path) -> None:
    _write_run(tmp_path / "baseline", name="baseline", gated=False)
    _write_run(tmp_path / "gated", name="gated_headwise", gated=True)
    runs = [report.load_run(tmp_path / "baseline"), report.load_run(tmp_path / "gated")]
    assert runs[0].config == {"lr": 0.1, "seed": 3}
    assert runs[0].steps == list(range(1, 21)) and runs[0].layer_steps == [10, 20]
    rows = report.summary_rows(runs)
    base, gated = rows
    assert base["status"] == "completed" and base["steps"] == "20"
    assert base["loss spikes"] == "2" and base["all events"] == "3"
    expected_final = sum(5.0 - s / 10 for s in range(11, 21)) / 10
    assert base["final train loss"] == f"{expected_final:.4g}"
    assert base["final val loss"] == "3.25"
    assert base["max abs(h) per layer"] == "20 / 40"
    assert base["first-token share"] == "0.3" and base["max attn logit"] == "7"
    assert base["mean gate"] == "-" and gated["mean gate"] == "0.5"
    counts = {row["detector"]: row for row in report.event_counts(runs)}
    assert counts["loss_spike"]["baseline"] == "2"
    assert counts["attention_logit_growth"]["gated_headwise"] == "1"


def test_html_report_is_self_contained(tmp_path: Path) -> None:
    _write_run(tmp_path / "baseline", name="baseline", gated=False)
    _write_run(tmp_path / "gated", name="gated_headwise", gated=True)
    runs = [report.load_run(tmp_path / "baseline"), report.load_run(tmp_path / "gated")]
    written = report.write_demo_report(
        runs, tmp_path / "report.html", title="t", settings={"lr": 0.1}, figures_dir=tmp_path / "f"
    )
    html = (tmp_path / "report.html").read_text()
    pngs = [p for p in written if p.suffix == ".png"]
    assert (
        html.count("data:image/png;base64,") == len(pngs) == 5
    )  # curves, 2 heatmaps, logit, gates
    assert "<script" not in html and "src='http" not in html
    assert not list(tmp_path.glob(".*.tmp"))
