"""Checks shared by the bad-input suites: one error line, the exit code, nothing written."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ERROR_LINE = re.compile(r"^megatron-gate (?P<command>[a-z]+): error: (?P<message>\S.*)$")


def assert_one_error_line(stderr: str, command: str, *fragments: str) -> str:
    """`stderr` is exactly one `megatron-gate COMMAND: error: ...` line holding `fragments`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if ERROR_LINE.match(line)]
    assert len(lines) == 1 and len(errors) == 1, stderr
    match = ERROR_LINE.match(errors[0])
    assert match and match["command"] == command, errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def listing(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included (temporaries must not be left behind)."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with `options` on `folder` for the block; skip the test where not allowed."""
    folder.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {options}")
    try:
        yield folder
    finally:
        # Lazy: a writer that failed on a full disk may still hold a handle for a moment.
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nothing can be written to: chmod for a normal user, a read-only tmpfs for root
    (root ignores permission bits)."""
    folder = tmp_path / "ro"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m"):
        yield folder


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: a checkpoint bigger than that cannot be written there."""
    with tmpfs(tmp_path / "small", "size=256k") as folder:
        yield folder
