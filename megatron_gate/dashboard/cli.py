"""`megatron-gate dashboard RUN_DIR [RUN_DIR ...]`: a live page over the monitor's JSONL.

megatron-gate dashboard runs/baseline runs/gated            # http://127.0.0.1:8765/
megatron-gate dashboard runs/ --port 0                      # every run under runs/, any free port
megatron-gate dashboard runs/baseline --export report.html  # one self-contained file, no server
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_gate.dashboard.store import STALE_INTERVALS, STALE_MIN_SECONDS
from megatron_gate.errors import InputError
from megatron_gate.monitor.schema import JSONL_NAME

if TYPE_CHECKING:
    from megatron_gate.dashboard.store import RunStore

DEFAULT_PORT = 8765


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """RUN_DIR ... and --stale-after: shared by `dashboard` and `watch`."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help=f"a run directory holding {JSONL_NAME}, or a directory of such run directories",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=STALE_MIN_SECONDS,
        metavar="SECONDS",
        help="mark a run without run_end stale after this long without a record (default "
        f"{STALE_MIN_SECONDS:g}; a slow run gets {STALE_INTERVALS}x its own logging interval)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `dashboard` command's arguments."""
    add_run_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the page)",
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free)"
    )
    parser.add_argument(
        "--export",
        metavar="REPORT.html",
        type=Path,
        help="write the dashboard as one self-contained HTML file and exit (no server)",
    )


class DashboardArgumentError(InputError):
    """A bad command-line value, found before anything is read or served."""


def check_run_arguments(args: argparse.Namespace) -> list[Path]:
    """The arguments of `add_run_arguments` checked; the run directories, expanded by
    `find_run_dirs`."""
    from megatron_gate.dashboard.store import find_run_dirs

    if not (math.isfinite(args.stale_after) and args.stale_after > 0):
        raise DashboardArgumentError(
            f"not a positive number of seconds (--stale-after {args.stale_after}): give e.g. 60"
        )
    for raw in args.run_dirs:
        path = Path(raw)
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise DashboardArgumentError(
                f"run directory {what} (RUN_DIR {raw}): pass the directory the monitor writes "
                f"{JSONL_NAME} into"
            )
    return find_run_dirs(args.run_dirs)


def _check(args: argparse.Namespace) -> list[Path]:
    if not 0 <= args.port <= 65535:
        raise DashboardArgumentError(
            f"port is out of range (--port {args.port}): use 0-65535 (0: any free)"
        )
    run_dirs = check_run_arguments(args)
    if args.export is not None:
        if args.export.is_dir():
            raise DashboardArgumentError(
                f"the export target is a directory (--export {args.export}): give a file name"
            )
        if not args.export.parent.resolve().is_dir():
            raise DashboardArgumentError(
                f"the export's directory does not exist (--export {args.export}): "
                f"create {args.export.parent} first"
            )
        missing = [str(d) for d in run_dirs if not (d / JSONL_NAME).is_file()]
        if missing:
            raise DashboardArgumentError(
                f"nothing to export: no {JSONL_NAME} ({', '.join(missing)}): pass run "
                "directories the monitor has written to"
            )
    return run_dirs


def run_names(run_dirs: list[Path]) -> list[str]:
    """Short unique names: the directory name, with its parent's where two would clash."""
    names = [d.resolve().name for d in run_dirs]
    clashing = {n for n in names if names.count(n) > 1}
    names = [
        f"{d.resolve().parent.name}/{n}" if n in clashing else n
        for d, n in zip(run_dirs, names, strict=True)
    ]
    if len(set(names)) != len(names):
        raise DashboardArgumentError(
            f"two RUN_DIRs name the same run ({', '.join(sorted(names))}): pass each run once"
        )
    return [n.replace("/", "-") for n in names]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    """Serve the dashboard until Ctrl-C, or write `--export` and return. Bad input raises
    `InputError` (one line, exit 2, by `megatron_gate.cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_dirs = _check(args)
    names = run_names(run_dirs)
    try:
        from megatron_gate.dashboard import page  # noqa: F401 - finds plotly.js, or says how
    except ModuleNotFoundError as error:
        raise DashboardArgumentError(str(error)) from None
    if args.export is not None:
        return _export(args, run_dirs, names)
    return _serve(args, run_dirs, names)


def _export(args: argparse.Namespace, run_dirs: list[Path], names: list[str]) -> int:
    """`--export FILE`: the page with every run's data inlined; a refused write is one line."""
    from megatron_gate.dashboard.export import export_html
    from megatron_gate.dashboard.store import load_run

    stores = [
        load_run(d, name=n, stale_after=args.stale_after)
        for d, n in zip(run_dirs, names, strict=True)
    ]
    path = export_html(stores, args.export)  # OutputError: the path and the cause
    for store in stores:
        _report_skipped(store)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, opens without network)")
    return 0


def _serve(args: argparse.Namespace, run_dirs: list[Path], names: list[str]) -> int:
    """The live server on `--host:--port`, polling the runs, until Ctrl-C."""
    from megatron_gate.dashboard.server import Dashboard, DashboardHTTPServer
    from megatron_gate.dashboard.store import RunStore

    dashboard = Dashboard(
        [
            RunStore(d, name=n, stale_after=args.stale_after)
            for d, n in zip(run_dirs, names, strict=True)
        ]
    )
    dashboard.start_polling()
    try:
        server = DashboardHTTPServer(dashboard, host=args.host, port=args.port)
    except OSError as error:
        dashboard.stop_polling()
        raise DashboardArgumentError(
            f"cannot bind {args.host}:{args.port} (--host/--port): {error.strerror or error}; "
            "pick another --port (0: any free)"
        ) from None
    if not _is_loopback(args.host):
        print(
            f"WARNING: --host {args.host} serves the page (the runs' metrics, not their files) "
            "to other machines; there is no authentication",
            file=sys.stderr,
        )
    print(
        f"stability dashboard for {', '.join(names)} at {server.url}  (Ctrl-C to stop)", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dashboard.stop_polling()
    return 0


def _report_skipped(store: RunStore) -> None:
    if store.tail.skipped_total:
        print(
            f"{store.name}: {store.tail.skipped_total} malformed line(s) skipped", file=sys.stderr
        )
