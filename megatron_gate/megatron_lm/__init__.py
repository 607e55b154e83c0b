"""megatron-gate in Megatron-LM's training loop: flags, spec swap, start-up check, monitor."""

from megatron_gate.megatron_lm.arguments import add_megatron_gate_args
from megatron_gate.megatron_lm.integration import enable_megatron_gate

__all__ = ["add_megatron_gate_args", "enable_megatron_gate"]
