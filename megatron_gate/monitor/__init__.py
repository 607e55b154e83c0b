"""Stability monitor: collectors -> one reduction -> detectors -> actions -> sinks, and every
step the guard (finite and spike tests on the device -> one flag -> `torch.where` step).

    from megatron_gate.monitor import MonitorConfig, StabilityMonitor

    monitor = StabilityMonitor(MonitorConfig.from_yaml("monitor.yaml"), models=[model],
                               run_dir="runs/exp1", optimizer=optimizer)
    for step in range(steps):
        monitor.start_step(step)
        loss = train_forward_backward(...)
        decision = monitor.end_step(step, loss=loss, grad_norm=grad_norm, tokens=tokens)
        monitor.step_optimizer(optimizer, decision)   # skips; the guard's verdict on the device
    monitor.close()

See docs/monitor.md.
"""

from __future__ import annotations

from typing import Any

# The names below pull in torch; `schema` (and the dashboard, `watch` and monitoring/ that read
# only the schema) must import without it, so they load on first use.
_LAZY = {
    "Decision": "megatron_gate.monitor.actions",
    "RollbackRequest": "megatron_gate.monitor.actions",
    "StabilityAbort": "megatron_gate.monitor.actions",
    "DetectorConfig": "megatron_gate.monitor.config",
    "DetectorsConfig": "megatron_gate.monitor.config",
    "GuardConfig": "megatron_gate.monitor.config",
    "MonitorConfig": "megatron_gate.monitor.config",
    "MonitorConfigError": "megatron_gate.monitor.config",
    "SinksConfig": "megatron_gate.monitor.config",
    "Event": "megatron_gate.monitor.detectors",
    "StabilityMonitor": "megatron_gate.monitor.monitor",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'megatron_gate.monitor' has no attribute {name!r}")
