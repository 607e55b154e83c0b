"""`megatron-gate watch`: the terminal view, checked in a real terminal (tmux) on a growing run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_gate.cli import main
from megatron_gate.dashboard.synthetic import SyntheticRun, to_line, write_run
from megatron_gate.dashboard.watch import bucket_maxima, sparkline
from megatron_gate.monitor.schema import JSONL_NAME
from megatron_gate.monitor.sinks.jsonl import JsonlSink


def test_sparkline_keeps_a_spike_and_gaps() -> None:
    assert sparkline([1.0, 2.0, None, 8.0], 10) == "▁▂ █"
    assert sparkline([None, None], 5) == ""
    assert sparkline([3.0, 3.0], 5) == "▁▁"  # a flat series draws flat
    x = list(range(100))
    y = [1.0] * 100
    y[57] = 50.0
    buckets = bucket_maxima(x, y, 10)
    assert len(buckets) == 10 and buckets[5] == 50.0 and buckets[0] == 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["{missing}"], "run directory does not exist (RUN_DIR"),
        (["{run}", "--interval", "0"], "(--interval 0.0)"),
        (["{run}", "--interval", "inf"], "(--interval inf)"),
        (["{run}", "--window", "5"], "(--window 5)"),
        (["{run}", "--stale-after", "nan"], "(--stale-after nan)"),
    ],
)
def test_bad_input_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], message: str
) -> None:
    run = write_run(tmp_path / "run", steps=5).parent
    argv = ["watch", *(a.format(missing=tmp_path / "missing", run=run) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-gate watch: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_once_draws_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = SyntheticRun(name="gated", num_layers=4, gated_layers=[2, 4], spike_steps=[33])
    write_run(tmp_path / "gated", steps=40, run=run, finished=False)
    assert main(["watch", str(tmp_path / "gated"), "--once", "--stale-after", "3600"]) == 0
    out = capsys.readouterr().out
    assert "step 40" in out and "running" in out and "STALE" not in out
    assert "loss_spike" in out and "max |h|" in out
    assert any(block in out for block in "▁▂▃▄▅▆▇█")


def _tmux(socket: str, *args: str) -> str:
    return subprocess.run(
        ["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=30, check=True
    ).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_watch_under_tmux_follows_the_run(tmp_path: Path) -> None:
    run = SyntheticRun(name="live", num_layers=4, gated_layers=[2, 4], spike_steps=[15])
    path = tmp_path / "live" / JSONL_NAME
    path.parent.mkdir()
    path.write_text(to_line(run.run_start()) + "".join(to_line(r) for r in run.records(1, 10)))
    socket = f"megatron-gate-test-{uuid.uuid4().hex[:8]}"  # a private tmux server
    command = (
        f"cd {Path.cwd()} && {sys.executable} -m megatron_gate.cli watch {path.parent} "
        "--interval 0.3"
    )
    env_prefix = f"PYTHONPATH={os.pathsep.join(sys.path)} "
    _tmux(socket, "new-session", "-d", "-x", "170", "-y", "45", env_prefix + command)
    try:
        screen = _wait_for_screen(socket, "step 10")
        assert "live" in screen and "running" in screen
        sink = JsonlSink(path.parent)  # the run goes on, written as the monitor writes it
        for step in range(11, 31):
            for record in run.step(step):
                sink.write(record)
        sink.close()
        screen = _wait_for_screen(socket, "step 30")
        assert "loss_spike" in screen  # the event at step 15 is listed
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, timeout=30)


def _wait_for_screen(socket: str, text: str, timeout: float = 30.0) -> str:
    deadline = time.time() + timeout
    while True:
        screen = _tmux(socket, "capture-pane", "-p", "-t", "0")
        if text in screen:
            return screen
        if time.time() > deadline:
            raise AssertionError(f"{text!r} not on the screen after {timeout} s:\n{screen}")
        time.sleep(0.3)
