"""Who skips a step of a Megatron-LM run, and one count per skipped step.

Three mechanisms can act on one step:

    Megatron's grad_norm_skip_threshold  in optimizer.step, right after the grad norm: the update
                                         is not applied (step_with_ready_grads never runs)
    the stability guard                  in step_with_ready_grads: NaN/Inf and spikes
    Megatron's --check-for-spiky-loss    the rerun state machine reruns the step's forward and
                                         backward to attribute a spike; it never skips an update

A step is skipped once, by the first of the first two that fires (Megatron's threshold is
checked first; the guard then does not apply anything either). Megatron counts every step whose
update was not applied as one skipped iteration; the monitor's `skipped_steps` counts the
guard's skips, and `count_once` adds each step that Megatron did not apply and the guard did not
reject (its threshold, a policy skip, a rollback, an fp16 overflow), so the two counts agree.
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def grad_norm_skip_threshold(optimizer: Any) -> float:
    """The smallest `grad_norm_skip_threshold` Megatron applies (inf: none). Megatron-Core 0.19
    checks it in `ChainedOptimizer.step`, per chained optimizer."""
    chained = getattr(optimizer, "chained_optimizers", None) or []
    values = [getattr(getattr(sub, "config", None), "grad_norm_skip_threshold", math.inf)
              for sub in chained]  # fmt: skip
    return min(values, default=math.inf)


def guard_rejected(decision: Any) -> bool:
    """Whether the guard rejected the step of `decision` (reads its flag on the host)."""
    accept = getattr(decision, "accept", None)
    return accept is not None and not bool(accept)


def count_once(monitor: Any, decision: Any, *, megatron_skipped: bool) -> bool:
    """Add a step that Megatron did not apply, and the guard did not reject, to the monitor's
    `skipped_steps`; return whether it was added."""
    if not megatron_skipped or decision is None or guard_rejected(decision):
        return False
    monitor.skipped_steps += 1
    return True


def in_charge_line(*, guard_on: bool, threshold: float, args: argparse.Namespace | None) -> str:
    """The one start-up line that says which mechanism skips steps."""
    deciders = []
    if math.isfinite(threshold):
        deciders.append(f"Megatron's grad_norm_skip_threshold={threshold:g}")
    if guard_on:
        deciders.append("the stability guard (NaN/Inf, spikes)")
    who = " first, then ".join(deciders) or "none (the guard is off, no grad_norm_skip_threshold)"
    line = f"megatron-gate: step skips: {who}; each skipped step counts once in Megatron's "
    line += "'skipped iterations' and the monitor's skipped_steps"
    spiky = args is not None and getattr(args, "check_for_spiky_loss", False)
    if spiky and getattr(args, "rerun_mode", "disabled") != "disabled":
        line += "; --check-for-spiky-loss reruns a spiky step to attribute it, never skips it"
    return line
