"""Fault tests: `kill -9` of a command that started gloo workers, and stale temporaries.

The commands run as real subprocesses; their process trees are read from /proc (Linux only).
After the parent is killed, every worker (and the manager process a worker started) must be gone
within a few seconds, and no output may be committed by a worker that outlived its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_gate.checkpoint.safe_io import remove_stale_partials

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
GONE_WITHIN = 5.0


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of `pid`, None when it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            parents[int(entry.name)] = stat[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _wait_for(condition, timeout: float, what: str):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _kill_and_check(parent: subprocess.Popen, victims: set[int]) -> None:
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline and any(_alive(pid) for pid in victims):
        time.sleep(0.1)
    survivors = [pid for pid in victims if _alive(pid)]
    names = {pid: _cmdline(pid)[-80:] for pid in survivors}
    for pid in survivors:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes outlived their killed parent: {names}"


WORKER_MODULE = """
import multiprocessing, time
from megatron_gate.distributed import manager_dying_with_this_process

def work(rank, world_size, payload):
    # A worker that, like Megatron's checkpoint writer, started a manager process of its own.
    manager = manager_dying_with_this_process(multiprocessing.get_context("spawn"))
    queue = manager.Queue()
    folder, seconds = payload
    open(f"{folder}/ready-{rank}", "w").close()
    time.sleep(seconds)
    return rank, queue is not None
"""


def test_two_gloo_workers_and_their_manager_die_with_a_killed_parent(tmp_path: Path) -> None:
    """`demo --tp 2` / `reshard --check-tp 2` shape: two ranks, each with a child of its own."""
    (tmp_path / "sleeper.py").write_text(textwrap.dedent(WORKER_MODULE))
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from megatron_gate.distributed import launch
        from sleeper import work
        if __name__ == "__main__":
            launch(work, world_size=2, payload=(sys.argv[1], 600))
    """)
    )
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        # Both ranks and both managers up: a parent with >= 4 descendants besides the tracker.
        _wait_for(
            lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)),
            timeout=180,
            what="two workers with a manager each",
        )
        tree = _descendants(parent.pid)
        _kill_and_check(parent, tree)
    finally:
        if parent.poll() is None:
            parent.kill()


def _hf_model(tmp_path: Path) -> Path:
    import torch

    from megatron_gate.checkpoint import hf_qwen3_next
    from megatron_gate.checkpoint.convert import write_hf_dir
    from megatron_gate.checkpoint.model import GptShape

    shape = GptShape(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                     num_query_groups=2, kv_channels=8, vocab_size=64, qk_layernorm=True)  # fmt: skip
    tensors = {k: torch.randn(v) for k, v in hf_qwen3_next.expected_hf_shapes(shape).items()}
    return write_hf_dir(
        tmp_path / "hf", hf_qwen3_next.config_from_shape(shape), tensors, force=False
    )


def test_killed_torch_dist_convert_leaves_no_worker_and_commits_nothing(tmp_path: Path) -> None:
    source, out = _hf_model(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "megatron_gate.cli", "convert", "--from", "hf", "--to",
               "megatron", str(source), str(out), "--megatron-format", "torch_dist"]  # fmt: skip
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    parent = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        # Kill while the worker starts (seconds before it could write): it must not go on alone.
        tree = _wait_for(lambda: _descendants(parent.pid) or None, timeout=120, what="the worker")
        _kill_and_check(parent, tree)
    finally:
        if parent.poll() is None:
            parent.kill()
    time.sleep(1.0)
    assert not out.exists(), "an output was committed after the command was killed"
    # What the killed run may have left is removed by the next run writing there.
    remove_stale_partials(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]


def _dead_pid() -> int:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    return int(finished.stdout)


def test_next_run_removes_partials_of_dead_runs_and_keeps_live_ones(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / f".out.pt.partial-{dead}").write_bytes(b"x" * 1000)
    (tmp_path / f".dist.partial-{dead}").mkdir()
    (tmp_path / f".dist.partial-{dead}" / "shard").write_bytes(b"x")
    live = tmp_path / f".other.partial-{os.getpid()}"
    live.write_bytes(b"mine")
    user_file = tmp_path / "notes.partial-1"  # not ours: no leading dot
    user_file.write_text("keep")
    removed = remove_stale_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [f".out.pt.partial-{dead}", f".dist.partial-{dead}"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, user_file.name])


def test_output_set_aside_by_a_dead_forced_run_is_restored(tmp_path: Path) -> None:
    """A run killed between the two renames of `--force` leaves the old output aside: put back."""
    dead = _dead_pid()
    (tmp_path / f".out.pt.old-{dead}").write_text("previous output")
    remove_stale_partials(tmp_path)
    assert (tmp_path / "out.pt").read_text() == "previous output"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pt"]


def test_a_workers_input_error_reaches_the_command_as_one(tmp_path: Path) -> None:
    """A bad checkpoint found inside a gloo worker is an `InputError` (one line, exit 2), not a
    `RuntimeError` carrying the worker's traceback."""
    from megatron_gate.checkpoint.model import GptShape
    from megatron_gate.checkpoint.reshard import verify_loadable
    from megatron_gate.errors import InputError

    shape = GptShape(num_layers=1, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
                     num_query_groups=2, kv_channels=8, vocab_size=64)  # fmt: skip
    with pytest.raises(InputError, match="not a torch_dist checkpoint") as raised:
        verify_loadable(tmp_path / "missing", shape, tp=1, pp=1)
    assert "Traceback" not in str(raised.value)
