"""Checks shared by the bad-input suites: one error line, the exit code, nothing written."""

from __future__ import annotations

import re
from pathlib import Path

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
