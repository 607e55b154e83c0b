"""Run `python -m megatron_gate.run` on a tiny GPT with mock data, as a user would (CPU, gloo).

Shared by the integration tests; each run is a real `megatron.training.pretrain` in fresh
processes (plain Python at world size 1, torchrun above).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_gate.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
DATA = Path(__file__).resolve().parent / "data"
MIN_SCRIPT = EXAMPLES / "pretrain_gpt_min.py"
SMOKE_SCRIPT = EXAMPLES / "cpu_smoke_test.sh"
SMOKE_MONITOR = EXAMPLES / "monitor_smoke.yaml"
LEGACY_SCRIPT = EXAMPLES / "pretrain_gpt_legacy.py"

# A 2-layer, hidden-64 GPT on the CPU: the flags of examples/cpu_smoke_test.sh.
TINY_GPT = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2",
    "--seq-length", "32", "--max-position-embeddings", "32",
    "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "3e-3", "--lr-decay-style", "constant", "--lr-decay-iters", "100",
    "--position-embedding-type", "rope", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "256", "--split", "1,0,0",
    "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
]  # fmt: skip
CPU_FLAGS = [
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--use-cpu-initialization", "--no-rope-fusion",
    "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-dropout-fusion",
]  # fmt: skip

_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: ([0-9.E+-]+)")
_SKIPPED = re.compile(r"iteration\s+(\d+)/.*?number of skipped iterations:\s+(\d+)")


@dataclass
class PretrainRun:
    returncode: int
    output: str

    def losses(self) -> dict[int, float]:
        """Megatron's logged `lm loss` per iteration."""
        return {int(i): float(v) for i, v in _ITERATION.findall(self.output)}

    def skipped(self) -> dict[int, int]:
        """Megatron's `number of skipped iterations` per logged iteration."""
        return {int(i): int(n) for i, n in _SKIPPED.findall(self.output)}

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]


def _environment() -> dict[str, str]:
    return {
        **os.environ,
        # examples/ too: test scripts reuse the minimal script's data and loss functions.
        "PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLES), os.environ.get("PYTHONPATH", "")]),
        "TORCHDYNAMO_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def run_smoke_script(
    out: Path, *args: str, iterations: int = 6, timeout: float = 240
) -> PretrainRun:
    """`bash examples/cpu_smoke_test.sh ARGS` (the script CI runs), writing under `out`."""
    env = {**_environment(), "OUT": str(out), "ITERS": str(iterations),
           "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}  # fmt: skip
    result = subprocess.run(
        ["bash", str(SMOKE_SCRIPT), *args], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return PretrainRun(result.returncode, result.stdout + result.stderr)


def run_pretrain(
    script: Path,
    *args: str,
    nproc: int = 1,
    timeout: float = 240,
    cpu_flags: bool = True,
    model_flags: tuple[str, ...] = tuple(TINY_GPT),
    through_megatron_gate: bool = True,
) -> PretrainRun:
    """`[torchrun] -m megatron_gate.run SCRIPT <tiny GPT flags> ARGS`; returns code and output.

    `through_megatron_gate=False` runs the script itself (through `data/run_on_cpu.py`, which
    adds only the CPU switch), as a patched Megatron-LM script is run.
    """
    env = _environment()
    port = str(free_port())
    if nproc == 1:  # no launcher: the env:// variables torchrun would set
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)  # fmt: skip
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                    "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
    entry = ["-m", "megatron_gate.run"] if through_megatron_gate else [str(DATA / "run_on_cpu.py")]
    command = [*launcher, *entry, str(script), *model_flags]
    command += [*(CPU_FLAGS if cpu_flags else []), *args]
    result = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return PretrainRun(result.returncode, result.stdout + result.stderr)


# Values that legitimately change from one saved iteration to the next.
CHANGING = {"iteration", "rng_state", "args", "num_floating_point_operations_so_far",
            "stability_monitor",  # the monitor's own history goes on (it saw the step)
            "checkpoint_version", "rerun_state_machine", "train_iters"}  # fmt: skip


def checkpoint_state(save: Path, iteration: int, rank: int) -> dict[str, Any]:
    """Megatron's `--ckpt-format torch` files of one iteration and rank (model, optimizer)."""
    folder = save / f"iter_{iteration:07d}" / f"mp_rank_{rank:02d}"
    # files this test's own run just wrote (trusted): Megatron pickles its args in them
    state = torch.load(folder / "model_optim_rng.pt", map_location="cpu", weights_only=False)
    state["distributed_optimizer"] = torch.load(
        folder / "distrib_optim.pt", map_location="cpu", weights_only=False
    )
    return state


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths at which two checkpoint states differ (tensors bit by bit; CHANGING ignored)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - CHANGING
        return [
            d for k in sorted(keys, key=str) for d in differences(a.get(k), b.get(k), f"{path}/{k}")
        ]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}/{i}")
        ]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    return [] if a == b else [path]
