"""Tables and figures of the Bigram-Backcopy comparison (`megatron-gate sweep --preset sink`).

    .venv/bin/python bench/sink_report.py SWEEP_OUT [SWEEP_OUT ...] --out bench/results/sink

Reads every finished run under `SWEEP_OUT/runs/<variant>/lr<lr>_seed<seed>/` and writes
`OUT/summary.md` (per learning rate: every variant's mean [95% bootstrap CI over seeds] and the
paired difference to the baseline), `OUT/summary.json` (every run's numbers) and
`OUT/share_over_steps.png` (last-layer first-token share of non-trigger queries per variant,
mean over seeds) and `OUT/final.png` (the final diagnostics with their CIs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from regime_points import bootstrap_ci

from megatron_gate.demo.report import RunLog, load_run, markdown_table

VARIANT_ORDER = ("baseline", "gated_headwise", "gated_elementwise", "qk_layernorm",
                 "softmax_off_by_one", "softmax_learnable")  # fmt: skip
SINK_SHARE = 0.9
"""The issue's sink criterion: last-layer first-token share of non-trigger queries."""


def _last_layer(run: RunLog, metric: str) -> float:
    values = run.final_layers(metric)
    return values[-1] if values else math.nan


def _peak(run: RunLog, metric: str) -> float:
    values = [v for row in run.layers.get(metric, []) for v in row if math.isfinite(v)]
    return max(values, default=math.nan)


def _first_event_step(run: RunLog, detector: str) -> float:
    steps = [float(e["step"]) for e in run.events if e.get("detector") == detector]
    return min(steps, default=math.nan)


METRICS: dict[str, tuple[str, Callable[[RunLog], float]]] = {
    "val_loss": ("val loss", lambda r: r.final_validation_loss()),
    "share_nontrigger": ("share non-trigger (last layer)",
                         lambda r: _last_layer(r, "first_token_share_unflagged")),
    "share_trigger": ("share trigger (last layer)",
                      lambda r: _last_layer(r, "first_token_share_flagged")),
    "share_layer1": ("share non-trigger (layer 1)",
                     lambda r: (r.final_layers("first_token_share_unflagged") or [math.nan])[0]),
    "value_drain": ("value norm BOS/other (last layer)",
                    lambda r: _last_layer(r, "value_norm_ratio_first_token")),
    "bos_ratio": ("BOS residual/median (max over layers)",
                  lambda r: max(r.final_layers("residual_norm_ratio_first_token") or [math.nan])),
    "kurtosis": ("kurtosis (max over layers)",
                 lambda r: max(r.final_layers("kurtosis_residual") or [math.nan])),
    "peak_max_h": ("peak max abs(h)", lambda r: _peak(r, "max_abs_residual")),
    "sink_step": ("sink event step", lambda r: _first_event_step(r, "sink_formation")),
}  # fmt: skip


def read_runs(sweep_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per completed run: variant, lr, seed, every metric, and its share trajectory."""
    rows = []
    for sweep in sweep_dirs:
        for path in sorted(Path(sweep).glob("runs/*/lr*_seed*/stability.jsonl")):
            run = load_run(path.parent)
            if run.status != "completed":
                continue
            lr, seed = path.parent.name.removeprefix("lr").split("_seed")
            trajectory = [row[-1] for row in run.layers.get("first_token_share_unflagged", [])]
            rows.append({"variant": run.name, "lr": float(lr), "seed": int(seed),
                         **{key: fn(run) for key, (_label, fn) in METRICS.items()},
                         "steps": run.layer_steps, "trajectory": trajectory})  # fmt: skip
    return rows


def _ci_text(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    mean, low, high = bootstrap_ci(finite)
    missing = f" ({len(values) - len(finite)} n/a)" if len(finite) < len(values) else ""
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]{missing}"


def lr_tables(rows: list[dict[str, Any]], lr: float) -> tuple[list[dict], list[dict]]:
    """(per-variant means with CIs, paired differences to the baseline) at one LR."""
    mine = {(r["variant"], r["seed"]): r for r in rows if r["lr"] == lr}
    variants = [v for v in VARIANT_ORDER if any(key[0] == v for key in mine)]
    means, differences = [], []
    for variant in variants:
        seeds = sorted(s for v, s in mine if v == variant)
        sinks = sum(mine[(variant, s)]["share_nontrigger"] >= SINK_SHARE for s in seeds)
        means.append({"variant": variant, "seeds": ",".join(map(str, seeds)),
                      f"sink (>= {SINK_SHARE})": f"{sinks}/{len(seeds)}",
                      **{label: _ci_text([mine[(variant, s)][key] for s in seeds])
                         for key, (label, _fn) in METRICS.items()}})  # fmt: skip
        shared = [s for s in seeds if ("baseline", s) in mine]
        if variant != "baseline" and shared:
            differences.append({"variant - baseline": variant, "seeds": ",".join(map(str, shared)),
                                **{label: _ci_text([mine[(variant, s)][key]
                                                    - mine[("baseline", s)][key] for s in shared])
                                   for key, (label, _fn) in METRICS.items()
                                   if key != "sink_step"}})  # fmt: skip
    return means, differences


def share_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Last-layer share of non-trigger queries over steps: mean over seeds per variant and LR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({r["lr"] for r in rows})
    figure, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 3.8), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        for index, variant in enumerate(VARIANT_ORDER):
            runs = [r for r in rows if r["lr"] == lr and r["variant"] == variant]
            if not runs:
                continue
            length = min(len(r["trajectory"]) for r in runs)
            mean = [sum(r["trajectory"][i] for r in runs) / len(runs) for i in range(length)]
            low = [min(r["trajectory"][i] for r in runs) for i in range(length)]
            high = [max(r["trajectory"][i] for r in runs) for i in range(length)]
            steps = runs[0]["steps"][:length]
            ax.plot(steps, mean, color=f"C{index}", label=f"{variant} (n={len(runs)})")
            ax.fill_between(steps, low, high, color=f"C{index}", alpha=0.15)
        ax.axhline(SINK_SHARE, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"lr {lr:g}: last layer, non-trigger queries (band: min-max over seeds)",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("first-token share")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def final_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Final share, value drain and BOS ratio per variant: mean over seeds with bootstrap CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("share_nontrigger", "value_drain", "bos_ratio", "val_loss")
    lrs = sorted({r["lr"] for r in rows})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, key in zip(axes, panels, strict=True):
        for offset, lr in enumerate(lrs):
            for index, variant in enumerate(VARIANT_ORDER):
                values = [r[key] for r in rows if r["lr"] == lr and r["variant"] == variant
                          and math.isfinite(r[key])]  # fmt: skip
                if not values:
                    continue
                mean, low, high = bootstrap_ci(values)
                ax.errorbar([index + 0.25 * offset], [mean], yerr=[[mean - low], [high - mean]],
                            marker="os"[offset % 2], color=f"C{index}", capsize=3,
                            label=f"lr {lr:g}" if index == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(VARIANT_ORDER)))
        ax.set_xticklabels([v.replace("_", "\n", 1) for v in VARIANT_ORDER], fontsize=7)
        ax.set_title(METRICS[key][0], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Bigram-Backcopy: mean over seeds, 95% bootstrap CI (o / s: the two LRs)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    parts = []
    for lr in sorted({r["lr"] for r in rows}):
        means, differences = lr_tables(rows, lr)
        parts.append(f"### lr {lr:g}\n\nMean [95% bootstrap CI over seeds]\n\n{markdown_table(means)}\n"
                     f"Paired differences (same seed, same batches)\n\n{markdown_table(differences)}")  # fmt: skip
    (out / "summary.md").write_text("\n".join(parts))
    if rows:
        share_figure(rows, out / "share_over_steps.png")
        final_figure(rows, out / "final.png")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep output folders")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sink"))
    args = parser.parse_args(argv)
    rows = read_runs(args.sweeps)
    write_summary(rows, args.out)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
