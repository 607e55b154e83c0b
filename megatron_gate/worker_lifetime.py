"""Worker processes that never outlive the process that started them.

A process started inside `children_die_with_me()` finds the starter's PID in
`PARENT_PID_ENV` and binds itself to it as soon as `megatron_gate` is imported (the first import
of a spawned worker, before torch): on Linux `PR_SET_PDEATHSIG` makes the kernel SIGKILL it when
the starter dies; a daemon thread that polls `os.getppid()` covers other systems. A worker whose
starter died while it was still starting exits at once. This module imports nothing heavy.

`PR_SET_PDEATHSIG` fires when the starting *thread* exits: start workers from a thread that lives
as long as they should (the commands start them from the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

PARENT_PID_ENV = "MEGATRON_GATE_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_INTERVAL = 0.25
"""Seconds between the parent-alive checks of the watchdog thread."""

_bound_to: int | None = None


def _set_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)  # no clean-up handlers: outputs are committed by the (dead) parent only
        time.sleep(WATCHDOG_INTERVAL)


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid` ends (idempotent; see the module docstring)."""
    global _bound_to
    if _bound_to == parent_pid:
        return
    _set_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed
    _bound_to = parent_pid
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()


def bind_if_started_as_worker() -> None:
    """Called on `import megatron_gate`: bind to the starter named in `PARENT_PID_ENV`.

    The variable is removed at once, so the worker's own children (started later, with their
    own binding where megatron-gate starts them) do not mistake its PID for their parent's.
    """
    value = os.environ.pop(PARENT_PID_ENV, None)
    if value and value.isdigit():
        die_with_parent(int(value))


@contextlib.contextmanager
def children_die_with_me() -> Iterator[None]:
    """Processes started inside this block (spawned or exec'd) die with this process."""
    previous = os.environ.get(PARENT_PID_ENV)
    os.environ[PARENT_PID_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_PID_ENV, None)
        else:
            os.environ[PARENT_PID_ENV] = previous
