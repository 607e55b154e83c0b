"""Read run directories (the monitor's JSONL) and render the summary table and one HTML report.

    runs = [load_run(path) for path in run_dirs]
    print(markdown_table(summary_rows(runs)))
    write_demo_report(runs, Path("out/report.html"), title=..., settings={...})

The HTML is self-contained: figures are PNGs embedded as base64, so the file opens anywhere
without network access. Everything is read back from disk, so an interrupted demo still gets a
report of what finished.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_gate.monitor import schema
from megatron_gate.output_files import atomic_write, atomic_write_text, make_folders

COLORS = {"baseline": "#d62728", "qk_layernorm": "#ff7f0e", "gated_headwise": "#1f77b4",
          "gated_elementwise": "#2ca02c", "gated_qk_layernorm": "#9467bd"}  # fmt: skip


@dataclass(kw_only=True)
class RunLog:
    """One run directory's `stability.jsonl`, parsed."""

    name: str
    run_dir: Path
    status: str = "running"
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    scalars: dict[str, list[float]] = field(default_factory=dict)
    """Per-step scalars, aligned with `steps` (NaN where a step lacks one)."""
    layer_steps: list[int] = field(default_factory=list)
    layers: dict[str, list[list[float]]] = field(default_factory=dict)
    """metric -> per logged step (aligned with `layer_steps`) -> per layer (NaN for null)."""
    validation: list[tuple[int, float]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    def event_count(self, detector: str) -> int:
        """Events of one detector (e.g. "loss_spike", "attention_logit_growth")."""
        return sum(1 for e in self.events if e.get("detector") == detector)

    def final_layers(self, metric: str) -> list[float]:
        """The metric per layer at the last logged step ([] when never logged)."""
        values = self.layers.get(metric)
        return values[-1] if values else []

    def final_train_loss(self, window: int = 10) -> float:
        losses = [v for v in self.scalars.get("loss", [])[-window:] if math.isfinite(v)]
        if self.status == "aborted" or not losses:
            return float("nan")
        return sum(losses) / len(losses)

    def final_validation_loss(self) -> float:
        return self.validation[-1][1] if self.validation else float("nan")


def _read_validation(path: Path) -> list[tuple[int, float]]:
    points = []
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
            points.append((int(record["step"]), _number(record["validation_loss"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn last line of an interrupted run
    return points


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def load_run(run_dir: Path) -> RunLog:
    """Parse `run_dir/stability.jsonl` (and the demo's `validation.jsonl`); torn lines are skipped."""
    from megatron_gate.monitor.sinks.jsonl import read_records

    run_dir = Path(run_dir)
    run = RunLog(name=run_dir.name, run_dir=run_dir)
    step_scalars: dict[int, dict[str, float]] = {}
    path = run_dir / schema.JSONL_NAME
    for record in read_records(path) if path.exists() else []:
        kind = record.get("kind")
        if kind == "run_start":
            run.name = record.get("run", run.name)
            run.model = record.get("model", {})
            run.config = run.model.get("train", {})
        elif kind == "step":
            step = int(record["step"])
            scalars = {k: _number(v) for k, v in record.get("scalars", {}).items()}
            step_scalars.setdefault(step, {}).update(scalars)
            if record.get("layers"):
                run.layer_steps.append(step)
                for metric, values in record["layers"].items():
                    run.layers.setdefault(metric, []).append([_number(v) for v in values])
        elif kind == "event" and schema.opens_episode(record):  # one per episode, not its closing
            run.events.append(record)
        elif kind == "run_end":
            run.status = record.get("status", run.status)
    run.validation = _read_validation(run_dir / "validation.jsonl")
    run.steps = sorted(s for s, values in step_scalars.items() if values)
    names = sorted({name for values in step_scalars.values() for name in values})
    run.scalars = {
        name: [step_scalars[s].get(name, float("nan")) for s in run.steps] for name in names
    }
    # Pad metrics that appear on only some logged steps (e.g. a gate metric) to full length.
    for metric, values in run.layers.items():
        missing = len(run.layer_steps) - len(values)
        if missing:
            run.layers[metric] = [[math.nan] * len(values[0])] * missing + values
    return run


# ---------------------------------------------------------------------- tables
def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summary_rows(runs: Sequence[RunLog]) -> list[dict[str, str]]:
    """One row per run: losses, spike counts, and per-layer metrics at the last logged step."""
    rows = []
    for run in runs:
        max_h = run.final_layers("max_abs_residual")
        rows.append(
            {
                "run": run.name,
                "status": run.status,
                "steps": str(run.last_step),
                "final train loss": _fmt(run.final_train_loss(), 4),
                "final val loss": _fmt(run.final_validation_loss(), 4),
                "loss spikes": str(run.event_count("loss_spike")),
                "grad-norm spikes": str(run.event_count("grad_norm_spike")),
                "all events": str(len(run.events)),
                "max abs(h) per layer": " / ".join(_fmt(v) for v in max_h) or "-",
                "first-token share": _fmt(_mean(run.final_layers("first_token_attention_share"))),
                "max attn logit": _fmt(max(run.final_layers("max_attention_logit") or [math.nan])),
                "mean gate": _fmt(_mean(run.final_layers("gate_mean"))),
            }
        )
    return rows


def markdown_table(rows: Sequence[dict[str, str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    if not rows:
        return ""
    columns = list(rows[0])
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in columns]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(row[c].ljust(w) for c, w in zip(columns, widths, strict=True)) + " |"
        )
    return "\n".join(lines)


def html_table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "<p>No runs.</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------- figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    """The figure as PNG bytes (then closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _color(name: str, index: int) -> str:
    return COLORS.get(name, f"C{index}")


def _log_y(ax: Any) -> None:
    """Log y scale when the axes hold positive data (an empty or all-NaN run stays linear)."""
    ys = [float(y) for line in ax.get_lines() for y in line.get_ydata()]
    if any(math.isfinite(y) and y > 0 for y in ys):
        ax.set_yscale("log")


def _plain_ticks(ax: Any) -> None:
    """Decimal tick labels on a log axis (2.5, 3, 4 rather than 2.5 x 10^0)."""
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))


def smoothed(values: Sequence[float], *, weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction; non-finite values are carried over."""
    out, average, total = [], 0.0, 0.0
    for value in values:
        if math.isfinite(value):
            average = weight * average + (1 - weight) * value
            total = weight * total + (1 - weight)
        out.append(average / total if total else math.nan)
    return out


def _spike_steps(run: RunLog, metric: str) -> list[int]:
    return [int(e["step"]) for e in run.events if e.get("detector") == f"{metric}_spike"]


def curves_figure(runs: Sequence[RunLog]) -> Any:
    """Train loss (with validation points) and grad norm; spikes marked with x."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4))
    for index, run in enumerate(runs):
        color = _color(run.name, index)
        for ax, metric in zip(axes, ("loss", "grad_norm"), strict=True):
            values = run.scalars.get(metric, [])
            ax.plot(run.steps, values, color=color, lw=0.6, alpha=0.3)
            ax.plot(run.steps, smoothed(values), color=color, lw=1.6, label=f"{run.name} (EMA)")
            by_step = dict(zip(run.steps, values, strict=True))
            spikes = [s for s in _spike_steps(run, metric) if s in by_step]
            ax.scatter(spikes, [by_step[s] for s in spikes], marker="x", s=40, color=color,
                       linewidths=1.5, zorder=3, label=f"{run.name} spikes ({len(spikes)})")  # fmt: skip
        if run.validation:
            steps, values = zip(*run.validation, strict=True)
            axes[0].plot(steps, values, "o--", color=color, ms=4, lw=0.8, label=f"{run.name} val")
    for ax, title in zip(
        axes, ("loss (train, faint: per step; o: validation)", "global grad norm"), strict=True
    ):
        _log_y(ax)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _plain_ticks(axes[0])
    return figure


def heatmap_figure(runs: Sequence[RunLog], metric: str, *, title: str, log: bool = False) -> Any:
    """Per-layer `metric` over logged steps, one panel per run, one shared colour scale."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    plt = _pyplot()
    figure, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.2), squeeze=False)
    grids = [np.array(run.layers.get(metric, []), dtype=float).T for run in runs]
    finite = np.concatenate([g[np.isfinite(g)].ravel() for g in grids if g.size] or [np.zeros(1)])
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if log:
        norm = LogNorm(vmin=max(low, 1e-3), vmax=max(high, low * 1.01, 1e-3 * 1.01))
    else:
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1e-6)
    image = None
    for ax, run, grid in zip(axes[0], runs, grids, strict=True):
        ax.set_title(run.name)
        ax.set_xlabel("step")
        ax.set_ylabel("layer")
        if not grid.size:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        steps = run.layer_steps
        # [layers, logged steps]; extent maps columns to steps and rows to layers 1..L
        image = ax.imshow(grid, aspect="auto", origin="lower", norm=norm, cmap="magma",
                          extent=(steps[0], steps[-1], 0.5, grid.shape[0] + 0.5),
                          interpolation="nearest")  # fmt: skip
        ax.set_yticks(range(1, grid.shape[0] + 1))
    if image is not None:
        figure.colorbar(image, ax=axes[0].tolist(), shrink=0.9)
    figure.suptitle(title, y=1.02)
    return figure


def _has_finite(grid: list[list[float]]) -> bool:
    return any(math.isfinite(v) for row in grid for v in row)


def gate_figure(runs: Sequence[RunLog]) -> Any | None:
    """Gate sparsity and mean gate per layer over steps, for the gated runs."""
    gated = [run for run in runs if _has_finite(run.layers.get("gate_mean", []))]
    if not gated:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for run in gated:
        for ax, metric in zip(axes, ("gate_sparsity", "gate_mean"), strict=True):
            grid = run.layers.get(metric)
            for layer in range(len(grid[0]) if grid else 0):
                ax.plot(run.layer_steps, [row[layer] for row in grid], lw=1,
                        label=f"{run.name} layer {layer + 1}")  # fmt: skip
    axes[0].set_title(f"gate sparsity: share of sigmoid(gate) < {schema.GATE_SPARSITY_THRESHOLD}")
    axes[1].set_title("mean sigmoid(gate)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return figure


def logit_figure(runs: Sequence[RunLog]) -> Any:
    """Max attention logit (max over layers) over steps."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 3.6))
    for index, run in enumerate(runs):
        grid = run.layers.get("max_attention_logit", [])
        ax.plot(run.layer_steps, [max(row) for row in grid] if grid else [],
                color=_color(run.name, index), label=run.name)  # fmt: skip
    ax.set_title("max attention logit (over layers and heads)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure


def demo_figures(runs: Sequence[RunLog]) -> list[tuple[str, str, bytes]]:
    """(file stem, caption, PNG) for every figure of the demo report."""
    figures = [
        ("curves", "Loss and grad norm. x = spike detected by the monitor.", curves_figure(runs)),
        ("max_abs_residual", "Per-layer max |h| of the residual stream (log colour scale).",
         heatmap_figure(runs, "max_abs_residual", title="max |h| per layer", log=True)),
        ("first_token_share", "Share of attention that queries put on the first token.",
         heatmap_figure(runs, "first_token_attention_share", title="first-token attention share")),
        ("max_attention_logit", "Largest pre-softmax attention logit.", logit_figure(runs)),
    ]  # fmt: skip
    gates = gate_figure(runs)
    if gates is not None:
        figures.append(("gates", "Gate sparsity and mean gate per layer (gated run).", gates))
    return [(stem, caption, figure_png(figure)) for stem, caption, figure in figures]


# ---------------------------------------------------------------------- HTML
_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0} img{max-width:100%} figcaption{color:#555;font-size:13px}
code{background:#f5f5f5;padding:1px 4px}
"""


def html_page(title: str, sections: Sequence[str]) -> str:
    body = "\n".join(sections)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>"
    )


def html_figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def html_settings(settings: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in settings.items()
    )
    return f"<table><tbody>{rows}</tbody></table>"


def event_counts(runs: Sequence[RunLog]) -> list[dict[str, str]]:
    """Events per detector (rows) and run (columns)."""
    detectors = sorted({str(e.get("detector")) for run in runs for e in run.events})
    return [
        {"detector": d, **{run.name: str(run.event_count(d)) for run in runs}} for d in detectors
    ]


def _events_section(runs: Sequence[RunLog], limit: int = 30) -> str:
    rows = [
        {"run": run.name, "step": str(e.get("step")), "detector": str(e.get("detector")),
         "layer": str(e.get("layer") or "-"), "message": str(e.get("message", ""))}
        for run in runs for e in run.events
    ]  # fmt: skip
    if not rows:
        return "<h2>Monitor events</h2><p>No detector fired.</p>"
    shown = html_table(rows[:limit])
    more = (
        f"<p>... and {len(rows) - limit} more (see the JSONL files).</p>"
        if len(rows) > limit
        else ""
    )
    return (
        f"<h2>Monitor events</h2>{html_table(event_counts(runs))}"
        f"<p>First {min(limit, len(rows))}:</p>{shown}{more}"
    )


def write_demo_report(
    runs: Sequence[RunLog],
    path: Path,
    *,
    title: str,
    settings: dict[str, Any],
    figures_dir: Path | None = None,
) -> list[Path]:
    """Write the self-contained HTML report (and, with `figures_dir`, the PNGs); return paths."""
    figures = demo_figures(runs)
    written = []
    if figures_dir is not None:
        make_folders(figures_dir)
        for stem, _caption, png in figures:
            target = figures_dir / f"demo_{stem}.png"
            atomic_write(target, lambda partial, png=png: partial.write_bytes(png))
            written.append(target)
    sections = [
        "<h2>Summary</h2>",
        html_table(summary_rows(runs)),
        "<p>Per-layer values are at the last logged step; spikes are counted over the run.</p>",
        *(html_figure(png, caption) for _stem, caption, png in figures),
        _events_section(runs),
        "<h2>Settings</h2>",
        html_settings(settings),
        "<h2>Run directories</h2><ul>"
        + "".join(f"<li><code>{html.escape(str(run.run_dir))}</code></li>" for run in runs)
        + "</ul>",
    ]
    atomic_write_text(path, html_page(title, sections), make_folder=True)
    return [path, *written]


# ---------------------------------------------------------------------- sweep
def sweep_figure(runs: Sequence[Any], summaries: Sequence[Any]) -> Any:
    """Final loss, max attention logit, max |h| and first-token share against the LR."""
    plt = _pyplot()
    panels = (
        ("final_loss", "final validation loss (diverged = loss at init)", True),
        ("max_attention_logit", "max attention logit", True),
        ("max_abs_residual", "max |h| (residual stream)", True),
        ("first_token_share", "first-token attention share", False),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for index, summary in enumerate(summaries):
        color = _color(summary.variant, index)
        mine = [r for r in runs if r.variant == summary.variant]
        for ax, (metric, title, log) in zip(axes, panels, strict=True):
            if metric == "final_loss":
                lrs = list(summary.loss_by_lr)
                ax.plot(lrs, [summary.loss_by_lr[lr] for lr in lrs], "o-", color=color,
                        label=f"{summary.variant} (LRS {summary.lr_sensitivity:.2f})")  # fmt: skip
            else:
                lrs = sorted({r.lr for r in mine})
                means = [_mean([getattr(r, metric) for r in mine if r.lr == lr]) for lr in lrs]
                ax.plot(lrs, means, "o-", color=color, label=summary.variant)
            points = [(r.lr, getattr(r, metric)) for r in mine]
            points = [(x, y) for x, y in points if math.isfinite(y)]
            if points:
                ax.scatter(*zip(*points, strict=True), color=color, s=10, alpha=0.5)
            ax.set_xscale("log")
            if log:
                _log_y(ax)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("peak learning rate")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    _plain_ticks(axes[0])
    return figure


def write_sweep_report(
    runs: Sequence[Any],
    summaries: Sequence[Any],
    path: Path,
    sensitivity_rows: Sequence[dict[str, str]],
    run_rows: Sequence[dict[str, str]],
    *,
    settings: dict[str, Any],
    figure_path: Path | None = None,
) -> None:
    """The sweep's self-contained HTML: sensitivity table, plot, one row per run."""
    sections = ["<h2>LR sensitivity (lower is better)</h2>", html_table(sensitivity_rows)]
    if runs:
        png = figure_png(sweep_figure(runs, summaries))
        if figure_path is not None:
            make_folders(figure_path.parent)
            atomic_write(figure_path, lambda partial: partial.write_bytes(png))
        caption = "Seed means (lines) and single runs (dots) against the peak learning rate."
        sections.append(html_figure(png, caption))
    sections += [
        "<h2>Runs</h2>",
        html_table(run_rows),
        "<h2>Settings</h2>",
        html_settings(settings),
    ]
    page = html_page("megatron-gate sweep: learning-rate sensitivity", sections)
    atomic_write_text(path, page, make_folder=True)
