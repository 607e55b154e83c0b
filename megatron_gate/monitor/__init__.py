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

from megatron_gate.monitor.actions import Decision, RollbackRequest, StabilityAbort
from megatron_gate.monitor.config import (
    DetectorConfig,
    DetectorsConfig,
    GuardConfig,
    MonitorConfig,
    MonitorConfigError,
    SinksConfig,
)
from megatron_gate.monitor.detectors import Event
from megatron_gate.monitor.monitor import StabilityMonitor

__all__ = [
    "Decision",
    "DetectorConfig",
    "DetectorsConfig",
    "Event",
    "GuardConfig",
    "MonitorConfig",
    "MonitorConfigError",
    "RollbackRequest",
    "SinksConfig",
    "StabilityAbort",
    "StabilityMonitor",
]
