"""Which attention backend a gated spec uses: Transformer Engine when asked or available."""

from __future__ import annotations

import functools

from megatron_gate.config import GateConfigError


@functools.cache
def transformer_engine_available() -> bool:
    """True when Megatron-Core can use Transformer Engine (it imports, with a GPU driver)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # noqa: BLE001 - any import failure means "no TE" here
        return False
    return bool(HAVE_TE)


def resolve_backend(backend: str) -> str:
    """Map `"auto" | "te" | "local"` to the backend that will be built, or raise."""
    if backend == "local":
        return "local"
    if backend == "te":
        if not transformer_engine_available():
            raise GateConfigError(
                "GateConfig.backend='te' but Transformer Engine cannot be imported here "
                "(it needs CUDA and the NVIDIA driver). Install megatron-gate[te] on a GPU "
                "machine, or use backend='local' or 'auto'."
            )
        return "te"
    if backend == "auto":
        return "te" if transformer_engine_available() else "local"
    raise GateConfigError(f"backend={backend!r} is unknown; use one of auto, te, local.")
