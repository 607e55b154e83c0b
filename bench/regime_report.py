"""Tables and figures of the regime search (`bench/regime_search.py summary`).

Writes `OUT/summary.json` (every run's row), `OUT/search.md` (the search table),
`OUT/final_<point>.md` (a four-variant comparison with bootstrap CIs over seeds),
`OUT/final_<point>.png` (per-layer first-token share and peak max|h| with their CIs) and
`OUT/trajectory.png` (the baseline's first-token share over training in the longer runs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regime_points import SEARCH, VARIANT_ORDER, bootstrap_ci

SINK_THRESHOLD = 0.3
"""A baseline first-token share at or above this in some layer counts as a sink (issue 15)."""
UNIFORM_SHARE = 0.079
"""What the probe reads at sequence 128 under uniform attention (8 sampled queries)."""


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _layers(values: Sequence[float], digits: int = 2) -> str:
    return " / ".join(_fmt(v, digits) for v in values)


def _finite_max(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return max(finite, default=math.nan)


def _markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)\n"
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row[key] for key in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


LOGGING_KEYS = ("log_interval", "eval_interval")
"""Point keys that change what is recorded, not the regime (left out of the "changed" column)."""


def _factors(point: dict[str, Any]) -> str:
    factors = [f"{k}={v}" for k, v in point.items() if k not in LOGGING_KEYS]
    return ", ".join(factors) or "(base point without BOS)"


def search_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One line per baseline run of the search, in the order of `SEARCH`."""
    order = {name: index for index, name in enumerate(SEARCH)}
    baseline = [r for r in rows if r["variant"] == "baseline"]
    baseline.sort(key=lambda r: (order.get(r["name"], 99), r["seed"]))
    return [
        {
            "point": r["name"],
            "seed": str(r["seed"]),
            "changed": _factors(r["point"]),
            "status": r["status"],
            "first-token share per layer (end)": _layers(r["first_token_share_final"]),
            "peak share": _fmt(_finite_max(r["first_token_share_peak"]), 2),
            "sink (>= 0.3)": "yes"
            if _finite_max(r["first_token_share_final"]) >= SINK_THRESHOLD
            else "no",
            "peak max abs(h) per layer": _layers(r["max_abs_residual_peak"], 3),
            "max attn logit": _fmt(r["max_attention_logit"]),
            "events": ", ".join(f"{k} {v}" for k, v in sorted(r["events"].items())) or "none",
            "max loss jump": _fmt(r["max_loss_jump"]),
            "val loss": _fmt(r["final_validation_loss"], 4),
            "wall s": f"{r['wall_seconds']:.0f}",
            "CPU s": f"{r['cpu_seconds']:.0f}",
            "TFLOP": f"{r['train_flops'] / 1e12:.2f}",
        }
        for r in baseline
    ]


# ---------------------------------------------------------------------- final comparison
FINAL_METRICS: dict[str, tuple[str, Any]] = {
    "val loss": ("final validation loss", lambda r: r["final_validation_loss"]),
    "max share": (
        "largest first-token share of any layer at the end",
        lambda r: _finite_max(r["first_token_share_final"]),
    ),
    "peak share": (
        "largest first-token share of any layer at any logged step",
        lambda r: _finite_max(r["first_token_share_peak"]),
    ),
    "mean share": (
        "first-token share at the end, mean over layers",
        lambda r: sum(r["first_token_share_final"]) / len(r["first_token_share_final"]),
    ),
    "peak max abs(h)": (
        "largest |h| of the residual stream, any layer, any logged step",
        lambda r: _finite_max(r["max_abs_residual_peak"]),
    ),
    "max attn logit": ("largest attention logit", lambda r: r["max_attention_logit"]),
    "max loss jump": (
        "largest loss rise over its 20-step running minimum",
        lambda r: r["max_loss_jump"],
    ),  # fmt: skip
}


def _ci_text(values: Sequence[float], digits: int = 3) -> str:
    if len(values) < 2:  # one seed: no interval to speak of
        return _fmt(values[0], digits) if values else "-"
    mean, low, high = bootstrap_ci(values)
    return f"{_fmt(mean, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"


def final_rows(rows: list[dict[str, Any]], point: str) -> tuple[list[dict], list[dict], dict]:
    """(per-variant means with CIs, paired differences to the baseline, raw values).

    Each variant uses the seeds it finished; a difference uses the seeds it shares with the
    baseline (paired: same seed, same batches).
    """
    mine = [r for r in rows if r["name"] == point and r["status"] == "completed"]
    by = {(r["variant"], r["seed"]): r for r in mine}
    seeds = {v: sorted(s for (name, s) in by if name == v) for v in VARIANT_ORDER}
    values = {
        v: {m: {s: fn(by[(v, s)]) for s in seeds[v]} for m, (_d, fn) in FINAL_METRICS.items()}
        for v in VARIANT_ORDER
    }
    means = [
        {
            "variant": v,
            "seeds": ",".join(map(str, seeds[v])) or "-",
            **{m: _ci_text(list(values[v][m].values())) for m in FINAL_METRICS},
        }  # fmt: skip
        for v in VARIANT_ORDER
    ]
    differences = []
    for v in VARIANT_ORDER[1:]:
        shared = [s for s in seeds[v] if s in seeds["baseline"]]
        differences.append({
            "variant - baseline": v, "seeds": ",".join(map(str, shared)) or "-",
            **{m: _ci_text([values[v][m][s] - values["baseline"][m][s] for s in shared])
               for m in FINAL_METRICS},
        })  # fmt: skip
    raw = {v: {m: {str(s): x for s, x in d.items()} for m, d in values[v].items()}
           for v in VARIANT_ORDER}  # fmt: skip
    return means, differences, {"seeds": seeds, "values": raw}


def final_figure(rows: list[dict[str, Any]], point: str, path: Path) -> None:
    """Per-layer first-token share and peak max|h|: mean over seeds with bootstrap CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["name"] == point and r["status"] == "completed"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    panels = (("first_token_share_final", "first-token attention share (end)", False),
              ("max_abs_residual_peak", "peak max|h| (over the run)", True))  # fmt: skip
    for ax, (key, title, log) in zip(axes, panels, strict=True):
        for index, variant in enumerate(VARIANT_ORDER):
            runs = [r[key] for r in mine if r["variant"] == variant]
            if not runs:
                continue
            layers = range(1, len(runs[0]) + 1)
            stats = [bootstrap_ci([run[i] for run in runs]) for i in range(len(runs[0]))]
            offset = (index - 1.5) * 0.08
            ax.errorbar([x + offset for x in layers], [s[0] for s in stats],
                        yerr=[[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]],
                        marker="o", capsize=3, label=f"{variant} (n={len(runs)})")  # fmt: skip
        if log:
            ax.set_yscale("log")
        if key == "first_token_share_final":
            ax.axhline(SINK_THRESHOLD, color="grey", linestyle=":", linewidth=1)
            ax.axhline(UNIFORM_SHARE, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(layers))
        ax.set_xlabel("layer")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{point}: mean over seeds, 95% bootstrap CI")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def search_figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Baseline's largest per-layer first-token share and peak max|h| at each search point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows if r["variant"] == "baseline" and r["seed"] == 0]
    order = {name: index for index, name in enumerate(SEARCH)}
    table.sort(key=lambda r: order.get(r["name"], 99))
    names = [r["name"] for r in table]
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    positions = range(len(names))
    axes[0].bar(
        [x - 0.2 for x in positions],
        width=0.4,
        label="at the end",
        height=[_finite_max(r["first_token_share_final"]) for r in table],
    )
    axes[0].bar([x + 0.2 for x in positions], width=0.4, label="peak over the run",
                height=[_finite_max(r["first_token_share_peak"]) for r in table])  # fmt: skip
    axes[0].set_xticks(list(positions), names)
    axes[0].axhline(SINK_THRESHOLD, color="grey", linestyle=":")
    axes[0].legend(fontsize=8)
    axes[0].set_title("baseline: first-token share, max over layers")
    axes[1].bar(names, [_finite_max(r["max_abs_residual_peak"]) for r in table])
    axes[1].set_yscale("log")
    axes[1].set_title("baseline: peak max|h| (any layer)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def trajectory_figure(rows: list[dict[str, Any]], path: Path, *, min_steps: int = 400) -> None:
    """Baseline's largest per-layer first-token share over training, for the longer runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows if r["variant"] == "baseline" and r["seed"] == 0
             and r["config"]["steps"] >= min_steps]  # fmt: skip
    order = {name: index for index, name in enumerate(SEARCH)}
    table.sort(key=lambda r: order.get(r["name"], 99))
    figure, ax = plt.subplots(figsize=(8, 4))
    for row in table:
        steps, shares = zip(*row["first_token_share_trajectory"], strict=True)
        ax.plot(steps, shares, label=row["name"], linewidth=1)
    ax.axhline(SINK_THRESHOLD, color="grey", linestyle=":", linewidth=1)
    ax.axhline(UNIFORM_SHARE, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("largest first-token share (any layer)")
    ax.set_title(f"baseline, seed 0, runs of >= {min_steps} steps (dotted: sink, dashed: uniform)")
    if table:  # (an empty figure when no run is that long)
        ax.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------- LR sweep with CIs
def _sweep_values(runs: list[dict[str, Any]]) -> tuple[list[float], dict[str, dict[int, dict]]]:
    """(the LRs, variant -> seed -> {"sensitivity", "best", lr: val loss}) of `sweep.json` runs.

    A seed's LR sensitivity is Wortsman et al.'s (`megatron_gate.demo.sweep.lr_sensitivity`) over
    that seed's runs; a diverged run counts as its loss at initialisation.
    """
    from megatron_gate.demo.sweep import lr_sensitivity

    lrs = sorted({r["lr"] for r in runs})
    table: dict[str, dict[int, dict]] = {}
    for variant in VARIANT_ORDER:
        for seed in sorted({r["seed"] for r in runs if r["variant"] == variant}):
            mine = {r["lr"]: r for r in runs if r["variant"] == variant and r["seed"] == seed}
            if set(mine) != set(lrs):  # an unfinished seed has no sensitivity yet
                continue
            init = sum(r["initial_loss"] for r in mine.values()) / len(mine)
            losses = {lr: r["final_loss"] for lr, r in mine.items()}
            capped = [min(v, init) if math.isfinite(v) else init for v in losses.values()]
            table.setdefault(variant, {})[seed] = {
                "sensitivity": lr_sensitivity(losses, init),
                "best": min(capped),
                **losses,
            }
    return lrs, table


def sweep_rows(runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Per variant: LR sensitivity, its paired difference to the baseline, the best loss and the
    validation loss at each LR, each as mean [95% bootstrap CI over seeds]."""
    lrs, table = _sweep_values(runs)
    base = table.get("baseline", {})
    rows = []
    for variant, seeds in table.items():
        shared = [s for s in seeds if s in base]
        delta = [seeds[s]["sensitivity"] - base[s]["sensitivity"] for s in shared]
        rows.append({
            "variant": variant, "seeds": ",".join(map(str, seeds)),
            "LR sensitivity": _ci_text([v["sensitivity"] for v in seeds.values()]),
            "- baseline (paired)": _ci_text(delta) if variant != "baseline" else "-",
            "best loss": _ci_text([v["best"] for v in seeds.values()]),
            **{f"val loss @ {lr:g}": _ci_text([v[lr] for v in seeds.values()]) for lr in lrs},
        })  # fmt: skip
    return rows


def write_sweep_summary(sweep_dir: Path) -> None:
    """`SWEEP/sweep_ci.{md,png}`: the LR sensitivity of `SWEEP/sweep.json` with CIs over seeds."""
    runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
    text = ("LR sensitivity (Wortsman et al. 2023; lower is better) and final validation loss, "
            "mean [95% bootstrap CI over seeds]; a diverged run counts as its loss at init.\n\n"
            + _markdown(sweep_rows(runs)))  # fmt: skip
    (sweep_dir / "sweep_ci.md").write_text(text)
    sweep_figure(runs, sweep_dir / "sweep_ci.png")
    print(f"wrote {sweep_dir}/sweep_ci.md, sweep_ci.png")


def sweep_figure(runs: list[dict[str, Any]], path: Path) -> None:
    """Final validation loss against the peak LR per variant: mean over seeds with its CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs, table = _sweep_values(runs)
    figure, ax = plt.subplots(figsize=(7, 4))
    for index, (variant, seeds) in enumerate(table.items()):
        stats = [bootstrap_ci([v[lr] for v in seeds.values()]) for lr in lrs]
        shift = 1 + (index - 1.5) * 0.04  # side by side on the log axis
        ax.errorbar([lr * shift for lr in lrs], [m for m, _lo, _hi in stats],
                    yerr=[[m - lo for m, lo, _hi in stats], [hi - m for m, _lo, hi in stats]],
                    marker="o", capsize=3, label=f"{variant} (n={len(seeds)})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (nats/byte)")
    ax.set_title("LR sweep at the base point: mean over seeds, 95% bootstrap CI")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_summary(out: Path, rows: list[dict[str, Any]], *, finals: Sequence[str] = ()) -> None:
    """Every table and figure of the search from the run rows; `final_<point>.*` per final."""
    (out / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    (out / "search.md").write_text(_markdown(search_rows(rows)))
    search_figure(rows, out / "search.png")
    trajectory_figure(rows, out / "trajectory.png")
    write_finals(out, rows, finals)
    print(f"wrote {out}/summary.json, search.md, search.png, trajectory.png")


def write_finals(out: Path, rows: list[dict[str, Any]], finals: Sequence[str]) -> None:
    """`OUT/final_<point>.{md,json,png}`: the four-variant comparison at each of `finals`."""
    legend = "\n".join(f"- {m}: {d}" for m, (d, _fn) in FINAL_METRICS.items())
    for final in finals:
        means, differences, raw = final_rows(rows, final)
        text = (f"Point `{final}`; mean [95% bootstrap CI over seeds]\n\n"
                f"{_markdown(means)}\nPaired differences (same seed, same batches):\n\n"
                f"{_markdown(differences)}\n{legend}\n")  # fmt: skip
        (out / f"final_{final}.md").write_text(text)
        (out / f"final_{final}.json").write_text(json.dumps(raw, indent=1))
        final_figure(rows, final, out / f"final_{final}.png")
    if finals:
        print(f"wrote {out}/" + ", ".join(f"final_{final}.*" for final in finals))
