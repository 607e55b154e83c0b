"""`demo` and `sweep` refuse out-of-range numbers, bad folders and bad monitor settings up front.

Each case runs the console command; it must exit 2 with one error line before any training,
and leave the folder it was pointed at exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from error_checks import assert_one_error_line, listing, read_only_folder

from megatron_gate.cli import main

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"]
    + [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefg", "bcdefgh", strict=True)]
    + ["log_interval: *h"]
)
"""A "billion laughs" YAML: 9**8 (43 million) strings once its aliases are expanded."""


def _file(root: Path, name: str, content: str | bytes) -> str:
    path = root / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


Case = Callable[[Path], tuple[list[str], tuple[str, ...]]]
DEMO_CASES: dict[str, Case] = {
    "lr inf": lambda r: (["--lr", "inf"], ("--lr inf", "finite")),
    "lr nan": lambda r: (["--lr", "nan"], ("--lr nan",)),
    "lr -inf": lambda r: (["--lr=-inf"], ("--lr -inf",)),
    "lr far too large": lambda r: (["--lr", "1e9"], ("--lr 1e+09", "above 100")),
    "steps too many": lambda r: (["--steps", "10000000"], ("--steps 10000000", "at most")),
    "layers too many": lambda r: (["--layers", "1000"], ("--layers 1000",)),
    "hidden too large": lambda r: (["--hidden", "100000", "--heads", "4"], ("--hidden 100000",)),
    "seq-len too long": lambda r: (["--seq-len", "1000000"], ("--seq-len 1000000",)),
    "batch too large": lambda r: (["--batch-size", "1000000"], ("--batch-size 1000000",)),
    "tp too large": lambda r: (["--tp", "64", "--heads", "64", "--hidden", "128"], ("--tp 64",)),
    "seed negative": lambda r: (["--seed", "-1"], ("--seed -1",)),
    "seed too large": lambda r: (["--seed", str(2**64)], ("--seed",)),
    "checkpoint interval 0": lambda r: (
        ["--checkpoint-interval", "0"],
        ("--checkpoint-interval 0",),
    ),
    "out under a file": lambda r: (
        ["--out", str(Path(_file(r, "f", "x")) / "out")],
        ("is not a folder", "--out"),
    ),
    "figures dir is a file": lambda r: (
        ["--figures-dir", _file(r, "fig", "x")],
        ("--figures-dir",),
    ),
    "monitor value too large": lambda r: (
        ["--monitor-set", "log_interval=2000000"],
        ("log_interval", "10000"),
    ),
    "monitor threshold nan": lambda r: (
        ["--monitor-set", "detectors.loss_spike.z_threshold=.nan"],
        ("z_threshold", "finite"),
    ),
    "monitor threshold negative": lambda r: (
        ["--monitor-set", "detectors.attention_sink.threshold=-1"],
        ("threshold", ">= 0"),
    ),
    "monitor window huge": lambda r: (
        ["--monitor-set", "detectors.loss_spike.window=100000000"],
        ("window",),
    ),
    "monitor value malformed YAML": lambda r: (
        ["--monitor-set", "log_interval=[1,"],
        ("--monitor-set log_interval", "not valid YAML"),
    ),
    "monitor value a 5000-digit number": lambda r: (
        ["--monitor-set", "log_interval=" + "9" * 5000],
        ("cannot be read",),
    ),
    "monitor YAML bomb": lambda r: (
        ["--monitor-config", _file(r, "bomb.yaml", BOMB)],
        ("aliases", "bomb.yaml"),
    ),
    "monitor YAML not UTF-8": lambda r: (
        [
            "--monitor-config",
            _file(r, "latin1.yaml", "log_interval: 5 # caf\xe9\n".encode("latin-1")),
        ],
        ("not UTF-8",),
    ),  # fmt: skip
    "monitor YAML nested deeply": lambda r: (
        ["--monitor-config", _file(r, "deep.yaml", "log_interval: " + "[" * 50000)],
        ("nested deeper",),
    ),
    "monitor YAML python tag": lambda r: (
        [
            "--monitor-config",
            _file(r, "tag.yaml", "log_interval: !!python/object/apply:os.getpid []"),
        ],
        ("not valid YAML",),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(DEMO_CASES))
def test_demo_refuses_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    flags, fragments = DEMO_CASES[case](tmp_path)
    before = listing(tmp_path)
    code = main(["demo", "--out", str(tmp_path / "out"), *flags] if "--out" not in flags
                else ["demo", *flags])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    line = assert_one_error_line(err, "demo", *fragments)
    assert len(line) < 1200 and "x, x, x" not in line  # never echoes an expansion
    assert listing(tmp_path) == before


def test_demo_refuses_a_read_only_out(
    read_only_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--out", str(read_only_folder / "runs")]) == 2
    assert_one_error_line(capsys.readouterr().err, "demo", "not writable")


SWEEP_CASES: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "lr inf": (["--lrs", "1e-2,inf"], ("--lr inf",)),
    "lr nan": (["--lrs", "nan"], ("--lr nan",)),
    "lrs naming one folder twice": (["--lrs", "1e-2,0.01"], ("--lrs repeats 0.01",)),
    "seeds repeated": (["--seeds", "0,0"], ("--seeds repeats 0",)),
    "seed negative": (["--seeds", "-3"], ("--seed -3",)),
    "variants repeated": (["--variants", "baseline,baseline"], ("--variants repeats",)),
    "too many runs": (["--lrs", ",".join(f"{i}e-4" for i in range(1, 300))], ("at most 1000",)),
    "steps too many": (["--steps", "10000000"], ("--steps 10000000",)),
}


@pytest.mark.parametrize("case", list(SWEEP_CASES))
def test_sweep_refuses_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    flags, fragments = SWEEP_CASES[case]
    code = main(["sweep", "--out", str(tmp_path / "out"), *flags])
    assert code == 2
    assert_one_error_line(capsys.readouterr().err, "sweep", *fragments)
    assert listing(tmp_path) == []


__all__ = ["read_only_folder"]  # a fixture used above
