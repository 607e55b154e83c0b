"""Fixtures for the dashboard tests: synthetic runs and a live server on a free loopback port."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from megatron_gate.dashboard.server import Dashboard, DashboardHTTPServer
from megatron_gate.dashboard.store import RunStore
from megatron_gate.dashboard.synthetic import SyntheticRun, write_run


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    """A baseline (ungated, two loss spikes) and a gated run, 300 steps, 6 layers each."""
    baseline = SyntheticRun(name="baseline", num_layers=6, gated_layers=[], spike_steps=[120, 250])
    gated = SyntheticRun(name="gated", num_layers=6, seed=1)
    return [
        write_run(tmp_path / "runs" / "baseline", steps=300, run=baseline).parent,
        write_run(tmp_path / "runs" / "gated", steps=300, run=gated).parent,
    ]


@pytest.fixture(scope="session")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real monitor's output (tiny gated Megatron GPT, 16 steps, per-layer events), written
    once per session; tests copy it before changing it."""
    from .real_run import EVENTFUL, train_real_run

    return train_real_run(tmp_path_factory.mktemp("real") / "gated", steps=16, monitor=EVENTFUL)


@pytest.fixture
def serve() -> Iterator[Callable[..., DashboardHTTPServer]]:
    """`serve(run_dirs)` starts a dashboard server on 127.0.0.1:<free port>; stopped after the test."""
    started: list[tuple[DashboardHTTPServer, Dashboard]] = []

    def start(
        run_dirs: Sequence[Path], *, poll_seconds: float = 0.2, stale_after: float = 60.0
    ) -> DashboardHTTPServer:
        stores = [RunStore(d, stale_after=stale_after) for d in run_dirs]
        dashboard = Dashboard(stores, poll_seconds=poll_seconds)
        dashboard.refresh()  # what is on disk now is served from the first request on
        dashboard.start_polling()
        server = DashboardHTTPServer(dashboard, host="127.0.0.1", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append((server, dashboard))
        return server

    yield start
    for server, dashboard in started:
        server.shutdown()
        server.server_close()
        dashboard.stop_polling()
