"""Bad input to `demo` and `sweep`: a clear error (exit 2) before any training or file."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_gate.cli import main


def _demo_args(tmp_path: Path, case: str) -> tuple[list[str], str]:
    out = tmp_path / "out"
    if case == "lr-zero":
        return ["--lr", "0"], "--lr 0.0: the learning rate must be > 0"
    if case == "lr-negative":
        return ["--lr", "-0.01"], "--lr -0.01: the learning rate must be > 0"
    if case == "data-missing":
        return ["--data", str(tmp_path / "nope.txt")], "no such file"
    if case == "data-empty":
        (tmp_path / "empty.txt").write_text("")
        return ["--data", str(tmp_path / "empty.txt")], "no text in it"
    if case == "heads-not-divisible-by-tp":
        return ["--tp", "3"], "--heads = 4 is not divisible by --tp 3"
    if case == "hidden-not-divisible-by-heads":
        return ["--hidden", "30"], "--hidden 30 is not divisible by --heads 4"
    if case == "out-is-a-file":
        out.write_text("not a folder")
        return [], "is a file"
    if case == "out-holds-a-run":
        (out / "baseline").mkdir(parents=True)
        (out / "baseline" / "stability.jsonl").write_text("{}\n")
        return [], "already holds a run"
    if case == "monitor-key-unknown":
        return ["--monitor-set", "detectors.loss_spike.zscore=3"], "unknown monitor config key"
    if case == "steps-zero":
        return ["--steps", "0"], "--steps 0: must be a positive integer"
    raise AssertionError(case)


CASES = [
    "lr-zero", "lr-negative", "data-missing", "data-empty", "heads-not-divisible-by-tp",
    "hidden-not-divisible-by-heads", "out-is-a-file", "out-holds-a-run", "steps-zero", "monitor-key-unknown",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_demo_rejects_bad_input_before_training(tmp_path: Path, capsys, case: str) -> None:  # noqa: ANN001
    flags, message = _demo_args(tmp_path, case)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = main(["demo", "--out", str(tmp_path / "out"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a rejected run must not write anything"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lrs", "1e-3,-1"], "--lr -1.0: the learning rate must be > 0"),
        (["--lrs", "1e-3,abc"], "--lrs '1e-3,abc'"),
        (["--variants", "baseline,nope"], "unknown ['nope']"),
        (["--seeds", ""], "--seeds is empty"),
    ],
)
def test_sweep_rejects_bad_input(tmp_path: Path, capsys, flags: list[str], message: str) -> None:  # noqa: ANN001
    code = main(["sweep", "--out", str(tmp_path / "out"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_only_the_run_folders(tmp_path: Path) -> None:
    from megatron_gate.demo.cli import prepare_out

    out = tmp_path / "out"
    (out / "baseline").mkdir(parents=True)
    (out / "baseline" / "stability.jsonl").write_text("{}\n")
    (out / "keep.txt").write_text("user file")
    prepare_out(out, ["baseline", "gated_headwise"], overwrite=True)
    assert not (out / "baseline").exists()
    assert (out / "keep.txt").read_text() == "user file"
