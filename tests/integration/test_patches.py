"""Each patch in patches/ applies to its Megatron-LM version's `pretrain_gpt.py`, and the lines it
adds make Megatron's real argument parser accept megatron-gate's flags.

The test data keeps only the lines of upstream `pretrain_gpt.py` (at the named tag) that each
patch's hunk touches, so the check needs no Megatron-LM checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_runs import DATA, REPO

PATCHES = sorted((REPO / "patches").glob("megatron-lm-*-pretrain_gpt.patch"))


def _version(patch: Path) -> str:
    return patch.name.removeprefix("megatron-lm-").removesuffix("-pretrain_gpt.patch")


def _added_lines(patch: Path) -> list[str]:
    """The lines the patch adds (without the leading `+`)."""
    text = patch.read_text().splitlines()
    return [line[1:] for line in text if line.startswith("+") and not line.startswith("+++")]


def test_a_patch_for_each_supported_version_only() -> None:
    # Support begins at megatron-core 0.16 (docs/megatron-lm.md): 0.12-0.15 cannot build the gate.
    assert {_version(p) for p in PATCHES} == {"core_v0.16.1", "core_v0.19.0"}


@pytest.mark.parametrize("patch", PATCHES, ids=_version)
def test_patch_applies_to_its_version(patch: Path, tmp_path: Path) -> None:
    # Stored as .context so that formatters leave the upstream lines as they are.
    context = DATA / "megatron_lm" / _version(patch) / "pretrain_gpt.py.context"
    shutil.copy(context, tmp_path / "pretrain_gpt.py")
    subprocess.run(["git", "apply", "--check", str(patch)], cwd=tmp_path, check=True)
    subprocess.run(["patch", "-p1", "--dry-run", "-i", str(patch)], cwd=tmp_path, check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run(["git", "apply", str(patch)], cwd=tmp_path, check=True)
    patched = (tmp_path / "pretrain_gpt.py").read_text().splitlines()
    start = patched.index('if __name__ == "__main__":')
    added = _added_lines(patch)
    assert patched[start + 1 : start + 1 + len(added)] == added
    assert len(patch.read_text().splitlines()) <= 16  # a small diff


def test_added_lines_make_megatron_parse_the_flags(tmp_path: Path) -> None:
    """Run what every patch adds, then Megatron's own `parse_args`, in a fresh interpreter."""
    added = {tuple(_added_lines(patch)) for patch in PATCHES}
    assert len(added) == 1  # every version gets the same lines
    lines = [line.strip() for line in next(iter(added))]
    program = "\n".join(
        [*lines, "from megatron.training.arguments import parse_args",
         "args = parse_args()",
         "print(args.gated_attention, args.gate_bias, args.monitor_config, args.no_monitor)"]
    )  # fmt: skip
    monitor_yaml = tmp_path / "monitor.yaml"
    monitor_yaml.write_text("log_interval: 5\n")  # read at parsing (a bad config stops there)
    result = subprocess.run(
        [sys.executable, "-c", program, "--gated-attention", "headwise", "--gate-bias",
         "--stability-config", str(monitor_yaml)],
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"headwise True {monitor_yaml} False"
