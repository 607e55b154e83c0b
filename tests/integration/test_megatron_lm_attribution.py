"""Attribution in Megatron-LM's own loop at TP=2 (gloo, two processes, distributed optimizer),
with faults injected on one rank: a one-time NaN in the output layer's matmul on rank 1 and a
one-time 1e6x gradient on rank 0 are transient (their recomputed updates are applied: both
ranks' checkpoints after them are bit-identical to a run without faults), a NaN batch is
reproducible (skipped). With `--rerun-mode disabled` megatron-gate replays the step itself;
with `validate_results` Megatron's rerun state machine reruns it (its tracker file says so)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pretrain_runs import DATA, PretrainRun, checkpoint_state, differences, run_pretrain

from megatron_gate.monitor.sinks import read_records

pytestmark = pytest.mark.slow

FAULTS = "4:matmul@1,6:grad@0,8:nan"
EXPECTED = [(4, "transient", "log"), (6, "transient", "log"), (8, "reproducible", "skip_step")]


def _run(folder: Path, *flags: str) -> PretrainRun:
    monitor_yaml = folder / "monitor.yaml"
    folder.mkdir(parents=True)
    monitor_yaml.write_text(
        "log_interval: 5\nlayer_interval: 10\nsinks: {console: false}\nguard: {min_history: 4}\n"
    )
    run = run_pretrain(
        DATA / "pretrain_with_faults.py", "--train-iters", "9", "--tensor-model-parallel-size",
        "2", "--use-distributed-optimizer", "--gated-attention", "headwise",
        "--stability-config", str(monitor_yaml), "--save", str(folder / "ckpt"),
        "--save-interval", "7", "--ckpt-format", "torch", *flags,
        nproc=2, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    return run


def _guard_events(folder: Path) -> list[tuple[int, str, str]]:
    events = read_records(folder / "ckpt" / "stability")
    return [(e["step"], e.get("attribution"), e["action"]) for e in events
            if e["kind"] == "event" and e["detector"] == "guard"]  # fmt: skip


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("attribution") / "clean"
    _run(folder, "--rerun-mode", "disabled")
    return folder


@pytest.mark.parametrize("mode", ["disabled", "validate_results"])
def test_one_rank_faults_are_attributed_alike_on_every_rank(
    clean: Path, tmp_path: Path, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEGATRON_GATE_FAULTS", FAULTS)
    folder = tmp_path / mode
    tracker = tmp_path / "rejected.txt"
    run = _run(folder, "--rerun-mode", mode, "--result-rejected-tracker-filename", str(tracker))
    assert _guard_events(folder) == EXPECTED
    skipped = run.skipped()
    assert {i: n for i, n in skipped.items() if n} == {8: 1}, skipped  # only the bad batch
    # the transient faults cost no update: after them, both ranks hold what the clean run holds
    for rank in (0, 1):
        faulty, reference = (
            checkpoint_state(folder / "ckpt", 7, rank),
            checkpoint_state(clean / "ckpt", 7, rank),
        )
        assert differences(faulty, reference) == [], rank
    events = read_records(folder / "ckpt" / "stability")
    samples = [e["samples"] for e in events if e["kind"] == "event" and e.get("samples")]
    assert samples[0] == [12, 13, 14, 15]  # iteration 4 of a global batch of 4
    if mode == "validate_results":  # Megatron's machine reran the steps and wrote its verdicts
        lines = tracker.read_text().splitlines()
        statuses = sorted({(int(line.split("iteration=")[1].split()[0]),
                            line.split("status=")[1].split()[0].split(".")[-1].upper())
                           for line in lines})  # fmt: skip
        # megatron-core 0.19.2's tracker numbers a fresh run's iterations one ahead of its logs
        offset = statuses[0][0] - 4
        assert offset in (0, 1), lines
        assert [(i - offset, status) for i, status in statuses] == [
            (4, "FIRST_RERUN_NOT_REPRODUCIBLE"), (6, "FIRST_RERUN_NOT_REPRODUCIBLE"),
            (8, "FIRST_RERUN_REPRODUCIBLE"),
        ], lines  # fmt: skip
    else:
        assert not tracker.exists() or not tracker.read_text()
