"""Process launching and Megatron parallel-state set-up on gloo (tests, benchmarks, the demo).

`launch(worker, world_size=2, payload=...)` runs `worker(rank, world_size, payload)` in spawned
processes that each joined a gloo process group, and returns the workers' results by rank. A
failing rank's traceback is re-raised in the caller. Workers die with the launching process
(`megatron_gate.worker_lifetime`): a `kill -9` of the command leaves no gloo rank running, and
since only the launching process renames outputs into place, nothing is committed after it died.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_module
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import closing
from multiprocessing.managers import SyncManager
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_gate.errors import InputError
from megatron_gate.worker_lifetime import children_die_with_me, die_with_parent

Worker = Callable[[int, int, Any], Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(rank: int, world_size: int, port: int) -> None:
    """Join a gloo group on 127.0.0.1 (CPU runtime applied when CUDA is absent)."""
    from megatron_gate.cpu import enable_cpu_runtime

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    # Model-level processes (tests, converters) do not run Megatron-LM's loop: a lighter start.
    enable_cpu_runtime(training_loop=False)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)


def init_model_parallel(*, tp: int = 1, pp: int = 1, cp: int = 1, seed: int = 1234) -> None:
    """(Re)initialise Megatron's parallel state and model-parallel RNG on the current group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=cp
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def manager_dying_with_this_process(context: Any) -> SyncManager:
    """A started `multiprocessing` manager whose server process dies with this one.

    Libraries that start a manager themselves (Megatron's checkpoint writer does) leave its
    server running when their process is killed; this one is bound by `die_with_parent`.
    """
    manager = SyncManager(ctx=context)
    with children_die_with_me():
        manager.start(die_with_parent, (os.getpid(),))
    return manager


def _entry(
    rank: int, world_size: int, port: int, worker: Worker, payload: Any, queue: Any, parent: int
) -> None:
    die_with_parent(parent)
    try:
        init_process_group(rank, world_size, port)
        # Plain pickle bytes, not the queue's shared-memory tensors: those die with this process.
        result = pickle.dumps(worker(rank, world_size, payload))
        queue.put((rank, True, result))
    except InputError as error:  # the user's input: the parent re-raises it as one line
        queue.put((rank, False, InputError(str(error))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which re-raises
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(
    processes: list[Any], queue: Any, results: dict[int, Any], failures: list[str], timeout: float
) -> None:
    """Gather one report per rank; stop at the first failure, a silent death or the timeout."""
    deadline = time.monotonic() + timeout
    while len(results) < len(processes) and not failures:
        try:
            rank, ok, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead:
                failures.append(f"a rank exited with code {dead[0].exitcode} before reporting")
            elif time.monotonic() > deadline:
                failures.append(f"no result within {timeout:.0f} s")
            continue
        if ok:
            # Bytes pickled by our own spawned worker a moment ago (the queue unpickles them
            # anyway), never a user's file: results are RunResult dataclasses and tensors.
            results[rank] = pickle.loads(value)
        elif isinstance(value, InputError):
            raise value
        else:
            failures.append(f"rank {rank} failed:\n{value}")


def launch(
    worker: Worker, *, world_size: int = 2, payload: Any = None, timeout: float = 600
) -> list[Any]:
    """Run `worker(rank, world_size, payload)` on `world_size` gloo ranks; return results by rank.

    A rank's `InputError` (a bad checkpoint, say) is raised here as an `InputError` with the same
    message; any other failure as a `RuntimeError` holding the rank's traceback.
    """
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_entry, args=(rank, world_size, port, worker, payload, queue, os.getpid())
        )
        for rank in range(world_size)
    ]
    with children_die_with_me():
        for process in processes:
            process.start()
    results: dict[int, Any] = {}
    failures: list[str] = []
    try:
        _collect(processes, queue, results, failures, timeout)
    finally:
        for process in processes:
            process.join(timeout=5 if failures or len(results) < len(processes) else timeout)
            if process.is_alive():
                process.kill()
    if failures:
        raise RuntimeError("\n".join(failures))
    return [results[rank] for rank in range(world_size)]
