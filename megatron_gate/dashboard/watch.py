"""`megatron-gate watch RUN_DIR [RUN_DIR ...]`: the live run in a terminal (for ssh-only login nodes).

megatron-gate watch runs/gated                 # redraws every 2 s until Ctrl-C
megatron-gate watch runs/ --window 500         # sparklines over the last 500 logged steps
megatron-gate watch runs/gated --once          # one frame, then exit (scripts, CI logs)

Per run: status (stale when records stopped without a run_end), the latest scalars with
sparklines, per-layer maxima over the window, and the newest events. Reads the same JSONL
through the same store as the page; needs `rich`, never torch.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from megatron_gate.dashboard.cli import (
    DashboardArgumentError,
    add_run_arguments,
    check_run_arguments,
    run_names,
)
from megatron_gate.dashboard.store import RunStore

SPARK = "▁▂▃▄▅▆▇█"
WATCHED_SCALARS = ("loss", "grad_norm", "update_norm", "learning_rate", "tokens_per_second")
LAYER_COLUMNS = (
    ("max_abs_residual", "max |h|"),
    ("first_token_attention_share", "first-token share"),
    ("gate_sparsity", "gate sparsity"),
)
SEVERITY_STYLES = {"info": "cyan", "warning": "yellow", "critical": "bold white on red"}
STATUS_STYLES = {"running": "green", "completed": "blue", "aborted": "red", "failed": "red"}
RECENT_EVENTS = 8
MAX_LAYER_ROWS = 24  # deeper models: the layers with the largest max |h|


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `watch` command's arguments."""
    add_run_arguments(parser)
    parser.add_argument(
        "--interval", type=float, default=2.0, help="seconds between redraws (default 2)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=200,
        help="logged steps the sparklines and per-layer maxima cover (default 200)",
    )
    parser.add_argument("--once", action="store_true", help="draw one frame and exit")


def _check(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.interval) and 0.1 <= args.interval <= 3600):
        raise DashboardArgumentError(
            f"redraw interval out of range (--interval {args.interval}): use 0.1-3600 seconds"
        )
    if not 10 <= args.window <= 100_000:
        raise DashboardArgumentError(
            f"window out of range (--window {args.window}): use 10-100000 logged steps"
        )


def bucket_maxima(x: Sequence[float], y: Sequence[float | None], width: int) -> list[float | None]:
    """`y` over the range of `x` in `width` equal buckets, each its maximum (a spike stays)."""
    if not x:
        return []
    lo, hi = x[0], x[-1]
    span = (hi - lo) or 1
    buckets: list[float | None] = [None] * width
    for xi, yi in zip(x, y, strict=True):
        if yi is None:
            continue
        k = min(width - 1, int((xi - lo) / span * width))
        buckets[k] = yi if buckets[k] is None else max(buckets[k], yi)
    return buckets


def sparkline(values: Sequence[float | None], width: int) -> str:
    """`values` (None: not logged) as at most `width` block characters, scaled to their range."""
    values = list(values)[-width:]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0
    return "".join(
        " " if v is None else SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))]
        for v in values
    )


def fmt_age(seconds: float | None) -> str:
    """`12 s ago`, `5 min ago`, `2.5 h ago` (the page words it the same way)."""
    if seconds is None:
        return "no record yet"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _number(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _layer_maxima(heatmaps: dict[str, Any]) -> dict[str, list[float | None]]:
    """Per metric, each layer's maximum over the window (None where never logged)."""
    maxima = {}
    for metric, _ in LAYER_COLUMNS:
        rows = heatmaps.get(metric, {}).get("z", [])
        maxima[metric] = [max((v for v in row if v is not None), default=None) for row in rows]
    return maxima


class WatchView:
    """Builds one frame (a rich renderable) from the run stores."""

    def __init__(self, stores: Sequence[RunStore], *, window: int, width: int = 40) -> None:
        self.stores = stores
        self.window = window
        self.width = width

    def frame(self) -> Any:
        from rich.console import Group

        return Group(*(self._run_panel(store) for store in self.stores))

    def _run_panel(self, store: RunStore) -> Any:
        from rich.columns import Columns
        from rich.console import Group
        from rich.panel import Panel

        summary = store.summary()
        last = summary["last_step"]
        start = None if last is None else last - self.window + 1
        view = store.view(start=start, points=10 * self.width, heatmap_buckets=self.width)
        body = Group(
            self._header(summary),
            Columns([self._scalars(view), self._layers(view)], padding=(0, 4)),
            self._events(store.recent_events(RECENT_EVENTS)),
        )
        return Panel(body, title=f"[b]{store.name}[/b]", title_align="left")

    def _header(self, summary: dict[str, Any]) -> Any:
        from rich.text import Text

        status = summary["status"]
        text = Text()
        text.append(f" {status} ", style=f"reverse {STATUS_STYLES.get(status, 'white')}")
        if summary["stale"]:
            text.append(" STALE ", style="bold black on yellow")
        text.append(f"  step {_number(summary['last_step'])}", style="bold")
        text.append(f"  ·  last record {fmt_age(summary['last_record_age'])}")
        text.append(f"  ·  {summary['num_layers']} layers  ·  {summary['events']} events")
        if summary["skipped_lines"]:
            text.append(f"  ·  {summary['skipped_lines']} malformed line(s)", style="yellow")
        return text

    def _scalars(self, view: dict[str, Any]) -> Any:
        from rich.table import Table

        table = Table(title="latest scalars", title_justify="left", box=None, pad_edge=False)
        for column in ("metric", "latest", f"last {self.window} logged steps", "min", "max"):
            table.add_column(
                column, justify="right" if column in ("latest", "min", "max") else "left"
            )
        for metric in WATCHED_SCALARS:
            series = view["scalars"].get(metric)
            if not series:
                continue
            ys = series["y"]
            finite = [y for y in ys if y is not None]
            table.add_row(
                metric,
                _number(ys[-1] if ys else None),
                sparkline(bucket_maxima(series["x"], ys, self.width), self.width),
                _number(min(finite, default=None)),
                _number(max(finite, default=None)),
            )
        return table

    def _layers(self, view: dict[str, Any]) -> Any:
        from rich.table import Table

        maxima = _layer_maxima(view["heatmaps"])
        table = Table(title="per-layer maxima (window)", title_justify="left", box=None)
        table.add_column("layer", justify="right")
        for _, title in LAYER_COLUMNS:
            table.add_column(title, justify="right")
        layers = max((len(v) for v in maxima.values()), default=0)
        order = list(range(layers))
        if layers > MAX_LAYER_ROWS:  # keep the layers most likely in trouble
            residual = maxima["max_abs_residual"] + [None] * layers
            order = sorted(order, key=lambda i: -(residual[i] or 0.0))[:MAX_LAYER_ROWS]
            order.sort()
        for i in order:
            cells = [maxima[m][i] if i < len(maxima[m]) else None for m, _ in LAYER_COLUMNS]
            table.add_row(str(i + 1), *map(_number, cells))
        return table

    def _events(self, events: list[dict[str, Any]]) -> Any:
        from rich.table import Table

        table = Table(title="recent events", title_justify="left", box=None, expand=True)
        for column in ("step", "severity", "detector", "layer", "action", "message"):
            table.add_column(column, justify="right" if column in ("step", "layer") else "left")
        for event in reversed(events):
            severity = str(event["severity"])
            detector = str(event["detector"])
            if event.get("kind"):
                detector += f" · {event['kind']}"
            table.add_row(
                str(event["step"]),
                f"[{SEVERITY_STYLES.get(severity, 'white')}]{severity}[/]",
                detector,
                _number(event["layer"]),
                str(event["action"]),
                str(event["message"])[:200],
                style=None,
            )
        if not events:
            table.add_row("", "", "none yet", "", "", "")
        return table


def run(args: argparse.Namespace) -> int:
    """Redraw the runs every `--interval` seconds until Ctrl-C (or once with `--once`)."""
    try:
        _check(args)
        run_dirs = check_run_arguments(args)
        names = run_names(run_dirs)
    except DashboardArgumentError as error:
        print(f"megatron-gate watch: error: {error}", file=sys.stderr)
        return 2
    try:
        from rich.console import Console
        from rich.live import Live
    except ModuleNotFoundError:
        print(
            "megatron-gate watch: error: the terminal view needs rich (import rich): "
            "pip install 'rich>=13'",
            file=sys.stderr,
        )
        return 2
    stores = [
        RunStore(d, name=n, stale_after=args.stale_after)
        for d, n in zip(run_dirs, names, strict=True)
    ]
    console = Console()
    view = WatchView(stores, window=args.window, width=max(10, min(80, console.width // 4)))
    for store in stores:
        store.refresh()
    if args.once:
        console.print(view.frame())
        return 0
    try:
        with Live(view.frame(), console=console, auto_refresh=False, screen=True) as live:
            while True:
                time.sleep(args.interval)
                for store in stores:
                    store.refresh()
                live.update(view.frame(), refresh=True)
    except KeyboardInterrupt:
        pass
    return 0
