"""A write the machine refuses, on a real small file system: a full disk (a tmpfs of a few KiB
or MiB, filled) and a read-only folder, wherever the project writes. Each time: exit 2, one
error line naming the path and the cause, no partial file left, earlier good outputs intact.

The folders are tmpfs mounts made by the test (`error_checks.tmpfs`); where the machine cannot
mount one, the tests skip and say so.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from error_checks import ERROR_LINE, listing, read_only_folder, small_disk, tmpfs

from megatron_gate.checkpoint.convert import write_megatron
from megatron_gate.checkpoint.model import GptShape, expected_full_shapes
from megatron_gate.cli import main
from megatron_gate.dashboard.synthetic import SyntheticRun, write_run
from megatron_gate.demo.trainer import latest_checkpoint
from megatron_gate.errors import OutputError
from megatron_gate.monitor import schema
from megatron_gate.monitor.sinks.jsonl import JsonlSink

FULL = "No space left on device"
READ_ONLY = "Read-only file system"
TINY_DEMO = ["--layers", "2", "--hidden", "32", "--heads", "4", "--seq-len", "16",
             "--batch-size", "2", "--lr", "1e-2", "--quiet"]  # fmt: skip


def _error_line(stderr: str, command: str, *fragments: str) -> str:
    """The run may have printed progress first: its last line is the one error line."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert errors[0].startswith(f"megatron-gate {command}: error: writing the output failed (")
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def _leftovers(root: Path) -> list[str]:
    return [name for name in listing(root) if ".partial-" in name or name.endswith(".tmp")]


def _whole_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.splitlines()]


def _fill(folder: Path) -> None:
    """Take every free byte of `folder`'s file system (as another writer would)."""
    with open(folder / "filler", "wb") as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\0" * (64 << 10))
            filler.flush()


# ---------------------------------------------------------------------- the JSONL sink
def test_jsonl_sink_on_a_full_disk_keeps_whole_lines(tmp_path: Path) -> None:
    record = {"kind": "step", "step": 0, "time": 0.0, "scalars": {"loss": 1.0}, "pad": "x" * 900}
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        sink = JsonlSink(disk / "run")
        written = 0
        with pytest.raises(OutputError) as refused:
            for step in range(10_000):
                sink.write_many([{**record, "step": step}, {**record, "step": step, "n": 2}])
                written += 2
        sink.close()
        assert f"{disk / 'run' / schema.JSONL_NAME}: {FULL}" in str(refused.value)
        records = _whole_lines(disk / "run" / schema.JSONL_NAME)
        assert len(records) == written > 0  # the refused pair left nothing behind


def test_jsonl_sink_in_a_read_only_folder(read_only_folder: Path) -> None:
    with pytest.raises(OutputError, match=f"{read_only_folder / 'run'}: (Read-only|Permission)"):
        JsonlSink(read_only_folder / "run")


# ---------------------------------------------------------------------- demo and sweep
def test_demo_when_the_disk_fills_up_keeps_its_last_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's case: another writer fills the disk after the first checkpoint."""
    with tmpfs(tmp_path / "disk", "size=6m") as disk:
        out = disk / "out"
        latest = out / "baseline" / "checkpoint" / "latest.json"

        def fill_after_first_checkpoint() -> None:
            deadline = time.monotonic() + 300
            while not latest.exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            _fill(disk)

        filler = threading.Thread(target=fill_after_first_checkpoint, daemon=True)
        filler.start()
        code = main(["demo", "--steps", "60", "--checkpoint-interval", "4", *TINY_DEMO,
                     "--monitor-set", "log_interval=2", "--out", str(out)])  # fmt: skip
        filler.join()
        assert code == 2
        _error_line(capsys.readouterr().err, "demo", FULL, str(out / "baseline"))
        assert _leftovers(disk) == []
        meta, folder = latest_checkpoint(out / "baseline")
        state = torch.load(folder / "tp_rank_00.pt", map_location="cpu", weights_only=True)
        assert state["step"] == meta["step"] >= 4
        assert [p.name for p in folder.parent.glob("step_*")] == [folder.name]
        steps = [r["step"] for r in _whole_lines(out / "baseline" / schema.JSONL_NAME)
                 if r["kind"] == "step"]  # fmt: skip
        assert steps and steps[-1] < 60  # it stopped at the refused write


def test_demo_on_a_disk_too_small_for_a_checkpoint(
    small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--steps", "8", "--checkpoint-interval", "2", *TINY_DEMO,
                 "--out", str(small_disk / "out")])  # fmt: skip
    assert code == 2
    _error_line(capsys.readouterr().err, "demo", FULL, str(small_disk / "out" / "baseline"))
    assert _leftovers(small_disk) == []
    assert latest_checkpoint(small_disk / "out" / "baseline") is None
    assert list((small_disk / "out" / "baseline").glob("checkpoint/step_*")) == []


def test_sweep_on_a_full_disk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "disk", "size=48k") as disk:
        code = main(["sweep", "--steps", "40", *TINY_DEMO[:-3], "--lrs", "1e-2", "--seeds", "0",
                     "--variants", "baseline", "--out", str(disk / "sweep")])  # fmt: skip
        assert code == 2
        _error_line(capsys.readouterr().err, "sweep", FULL, str(disk / "sweep"))
        assert _leftovers(disk) == []
        for jsonl in disk.rglob(schema.JSONL_NAME):
            _whole_lines(jsonl)


# ---------------------------------------------------------------------- dashboard export
def test_dashboard_export_on_a_full_disk_keeps_the_earlier_report(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", steps=50, run=SyntheticRun(num_layers=2)).parent
    report = small_disk / "report.html"
    report.write_text("<html>the earlier report</html>")
    code = main(["dashboard", str(run_dir), "--export", str(report)])  # plotly.js: > 1 MB
    assert code == 2
    _error_line(capsys.readouterr().err, "dashboard", f"{report}: {FULL}")
    assert report.read_text() == "<html>the earlier report</html>"
    assert _leftovers(small_disk) == []


def test_dashboard_export_into_a_read_only_folder(
    tmp_path: Path, read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = write_run(tmp_path / "run", steps=20, run=SyntheticRun(num_layers=2)).parent
    code = main(["dashboard", str(run_dir), "--export", str(read_only_folder / "r.html")])
    assert code == 2
    _error_line(capsys.readouterr().err, "dashboard", str(read_only_folder / "r.html"))
    assert listing(read_only_folder) == []


# ---------------------------------------------------------------------- checkpoint commands
PLAIN = GptShape(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                 num_query_groups=2, kv_channels=8, vocab_size=4096, granularity=None)  # fmt: skip


def _plain_checkpoint(root: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    tensors = {key: torch.randn(size, generator=generator)
               for key, size in expected_full_shapes(PLAIN).items()}  # fmt: skip
    return write_megatron(root / "plain.pt", PLAIN, tensors, force=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["retrofit", "{source}", "{out}/retrofit.pt", "--megatron-format", "torch"],
        ["reshard", "{source}", "{out}/dist", "--megatron-format", "torch_dist"],
    ],
    ids=["retrofit", "reshard torch_dist"],
)
def test_checkpoint_command_on_a_full_disk_keeps_the_earlier_output(
    tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Another writer takes the space between the free-space check and the write (the check is
    skipped here to stand for that): the write itself fails."""
    from megatron_gate.checkpoint import convert, safe_io

    source = _plain_checkpoint(tmp_path)
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        args = [a.format(source=source, out=disk) for a in argv]
        assert main(args) == 0  # an earlier good output
        target = Path(args[2])
        before = {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
        capsys.readouterr()
        for module in (convert, safe_io):
            monkeypatch.setattr(module, "check_free_space", lambda *_args: None)
        _fill(disk)
        code = main([*args, "--force"])
        (disk / "filler").unlink()
        assert code == 2
        _error_line(capsys.readouterr().err, args[0], str(target), FULL)
        assert _leftovers(disk) == []
        after = {p: p.read_bytes() for p in [target, *target.rglob("*")] if p.is_file()}
        assert after == before


@pytest.mark.parametrize("command", ["retrofit", "reshard"])
def test_checkpoint_command_into_a_read_only_folder(
    tmp_path: Path, read_only_folder: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = _plain_checkpoint(tmp_path)
    target = read_only_folder / "out"
    assert main([command, str(source), str(target), "--megatron-format", "torch_dist"]) == 2
    line = capsys.readouterr().err.strip()
    assert ERROR_LINE.match(line) and str(read_only_folder) in line and "\n" not in line
    assert listing(read_only_folder) == []


__all__ = ["read_only_folder", "small_disk"]  # fixtures used above
