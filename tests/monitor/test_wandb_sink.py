"""The W&B sink in offline mode: a real wandb run written to disk, with the monitor's keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb", reason="wandb is not installed (pip install wandb)")

# In a child process: wandb keeps global state and a service process per interpreter.
_RUN = """
import sys
from megatron_gate.monitor.sinks import WandbSink
sink = WandbSink(project="megatron-gate-test", run_name="offline-test", run_dir=sys.argv[1])
for step in (1, 2, 3):
    sink.write({"kind": "step", "step": step, "time": 0.0,
                "scalars": {"loss": 4.0 - step, "grad_norm": None},
                "layers": {"max_abs_residual": [10.0 * step, None]}})
sink.write({"kind": "event", "step": 3, "time": 0.0, "detector": "loss_spike",
            "severity": "warning", "metric": "loss", "value": 1.0, "threshold": 0.5,
            "layer": None, "action": "log", "message": "test event"})
sink.close()
"""


@pytest.mark.slow
def test_wandb_sink_writes_an_offline_run(tmp_path: Path) -> None:
    env = dict(
        os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DISABLE_GIT="true",
        WANDB_CONSOLE="off", WANDB_CACHE_DIR=str(tmp_path / "cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "config"), WANDB_DATA_DIR=str(tmp_path / "data"),
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _RUN, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")  # W&B's record log: protobuf records, keys as text
    data = log.read_bytes()
    for key in (
        b"stability/loss",
        b"stability/layer_01/max_abs_residual",
        b"stability/events/loss_spike",
    ):
        assert key in data, key
    assert b"stability/layer_02/max_abs_residual" not in data  # None is not logged
    assert b"stability/grad_norm" not in data
