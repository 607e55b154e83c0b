"""When the stability monitor of a Megatron-LM run writes its last steps and `run_end`.

A script may bind `pretrain` before megatron-gate wraps it (Megatron-LM's `pretrain_gpt.py` does
`from megatron.training import pretrain` at the top, and a patched script calls
`enable_megatron_gate()` only later, in `__main__`). Closing therefore hangs on three points that
do not depend on import order, and the first one reached wins (`close` is idempotent):

    training.train returns / raises   looked up in `training`'s globals by `pretrain` itself, so
                                      always wrapped; every rank is still alive for the final
                                      flush. Early exits (`--exit-interval`, `--exit-duration-in-mins`,
                                      the SIGTERM handler) leave `train` through `sys.exit`.
    pretrain returns / raises         where `pretrain` is wrapped (`megatron_gate.run`, the API
                                      bridge)
    interpreter exit (`atexit`)       anything else: a crash between start-up and `train`

The monitor object stays reachable after `train` closes it, so the checkpoint `pretrain` saves
after training still carries the monitor's state.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from megatron_gate.megatron_lm import monitor_hooks


def _status_of(error: BaseException | None) -> str:
    """`run_end` status for how a block was left (`None`: it returned)."""
    if error is None:
        return "completed"
    if isinstance(error, SystemExit):
        return "completed" if error.code in (0, None) else "interrupted"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def close_active(status: str, *, release: bool) -> None:
    """Close the active monitor with `status` (once); `release` also forgets it."""
    loop = monitor_hooks.ACTIVE
    if loop is None:
        return
    loop.monitor.close(status)
    if release:
        monitor_hooks.ACTIVE = None


@contextlib.contextmanager
def closing_monitor(*, release: bool) -> Iterator[None]:
    """Close the active monitor when the block returns or fails, with the matching status."""
    try:
        yield
    except BaseException as error:
        close_active(_status_of(error), release=release)
        raise
    close_active("completed", release=release)


def wrap_train(original: Any) -> Any:
    """`training.train` that closes the monitor when training ends (keeping it for the final save)."""

    def train(*args: Any, **kwargs: Any) -> Any:
        with closing_monitor(release=False):
            return original(*args, **kwargs)

    return train


def _close_at_exit() -> None:
    # The interpreter records an uncaught exception in `sys.last_value` before exit handlers run.
    crashed = getattr(sys, "last_value", None) is not None
    close_active("failed" if crashed else "interrupted", release=True)


_REGISTERED: list[bool] = []


def close_at_exit() -> None:
    """Register the interpreter-exit fallback (once per process)."""
    if not _REGISTERED:
        atexit.register(_close_at_exit)
        _REGISTERED.append(True)
