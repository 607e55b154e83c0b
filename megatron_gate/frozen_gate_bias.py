"""Warn when a loaded checkpoint puts non-zero gate-bias rows into a model whose gate bias is off.

With `gate_bias=False` and a `linear_qkv` bias (`add_bias_linear` / `add_qkv_bias`), the gate
rows of that bias are zeroed and their gradient is masked (`GatedSelfAttention._init_gate_rows`).
A checkpoint trained with a gate bias, e.g. Megatron's native `attention_output_gate` with
`add_bias_linear`, loads its gate-bias rows anyway: the forward pass uses them, the optimizer
never moves them. That is almost never what was meant, so it is said once, naming the layers.

The check runs where the bias changes (a `load_state_dict` post-hook on every gated layer); the
one warning is given at the next forward pass, when every layer of this rank has been loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

_LOADED_FROZEN: set[int] = set()
"""Layer numbers whose frozen gate-bias rows came non-zero out of a checkpoint (this process)."""


def note_loaded_frozen_gate_bias(module: Any, _incompatible_keys: Any = None) -> None:
    """`load_state_dict` post-hook of a `GatedSelfAttention`: remember non-zero frozen rows."""
    mask = getattr(module, "_bias_grad_mask", None)
    bias = getattr(module.linear_qkv, "bias", None)
    if mask is None or not isinstance(bias, torch.Tensor):
        return
    gate_rows = module._rank_rows(module._segment_mask("gate")).to(bias.device)
    frozen_gate_rows = gate_rows & (mask == 0)
    if bool(bias.detach()[frozen_gate_rows].ne(0).any()):
        _LOADED_FROZEN.add(int(module.layer_number))


def warn_pending() -> None:
    """Give the warning for the layers noted since the last one (called at each forward pass)."""
    if not _LOADED_FROZEN:
        return
    layers = ", ".join(str(number) for number in sorted(_LOADED_FROZEN))
    _LOADED_FROZEN.clear()
    logger.warning(
        "megatron-gate: the loaded checkpoint has non-zero gate-bias rows in linear_qkv of layers "
        "%s, but this model's gate bias is off (--gate-bias / GateConfig.gate_bias): the forward "
        "pass uses those biases and training never updates them. To keep training them, pass "
        "--gate-bias (GateConfig(gate_bias=True)); to drop them, zero those rows in the checkpoint.",
        layers,
    )
