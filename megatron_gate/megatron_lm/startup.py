"""Start-up check and start-up line: what the built model really gates, across all ranks.

A gate that was asked for but is not in the model (a `--spec` that failed to import, a model
class the spec swap does not reach) must stop the run before it trains, not after a week.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core.transformer.attention import SelfAttention

from megatron_gate.attention import GatedSelfAttention

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class GateReport:
    """The attention layers of a model (all ranks together) and which of them are gated."""

    attention_layers: tuple[int, ...] = ()
    """1-based layer numbers of every self-attention layer."""
    gated_layers: tuple[int, ...] = ()
    """1-based layer numbers of gated ones."""
    granularities: tuple[str, ...] = ()
    backends: tuple[str, ...] = ()
    """"te" or "local", from the class of each gated layer's `linear_qkv`."""
    parallel: dict[str, int] = field(default_factory=dict)


def _backend(attention: SelfAttention) -> str:
    module = type(attention.linear_qkv).__module__
    return "te" if "transformer_engine" in module else "local"


def local_report(model_chunks: Iterable[torch.nn.Module]) -> GateReport:
    """What this rank's model chunks hold."""
    attention, gated, granularities, backends = set(), set(), set(), set()
    for chunk in model_chunks:
        for module in chunk.modules():
            if not isinstance(module, SelfAttention):
                continue
            attention.add(module.layer_number)
            if isinstance(module, GatedSelfAttention):
                gated.add(module.layer_number)
                granularities.add(module.gate_config.granularity)
                backends.add(_backend(module))
    return GateReport(
        attention_layers=tuple(sorted(attention)),
        gated_layers=tuple(sorted(gated)),
        granularities=tuple(sorted(granularities)),
        backends=tuple(sorted(backends)),
    )


def merge_reports(reports: Sequence[GateReport], parallel: dict[str, int]) -> GateReport:
    """One report from every rank's report (TP ranks hold the same layers; PP stages differ)."""

    def union(name: str) -> tuple:
        return tuple(sorted({value for report in reports for value in getattr(report, name)}))

    return GateReport(
        attention_layers=union("attention_layers"),
        gated_layers=union("gated_layers"),
        granularities=union("granularities"),
        backends=union("backends"),
        parallel=parallel,
    )


def global_report(model_chunks: Iterable[torch.nn.Module], parallel: dict[str, int]) -> GateReport:
    """Merge the reports of all ranks (one `all_gather_object` at start-up)."""
    report = local_report(model_chunks)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return merge_reports([report], parallel)
    gathered: list[GateReport | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    return merge_reports([item for item in gathered if item is not None], parallel)


def _ranges(numbers: Sequence[int]) -> str:
    """`(1, 2, 3, 5)` -> `"1-3,5"`."""
    parts: list[str] = []
    start = previous = None
    for number in [*numbers, None]:
        if start is not None and number == previous + 1:
            previous = number
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = number
    return ",".join(parts) or "none"


def startup_line(report: GateReport, *, monitor_sinks: Sequence[str]) -> str:
    """The one line a run logs at start-up: gated layers, granularity, backend, monitor sinks."""
    parallel = " ".join(f"{name}={size}" for name, size in report.parallel.items())
    sinks = ", ".join(monitor_sinks) if monitor_sinks else "off"
    # Layers outside the GPT decoder spec (e.g. multi-token-prediction layers) stay ungated.
    ungated = sorted(set(report.attention_layers) - set(report.gated_layers))
    note = f" (not gated: {_ranges(ungated)})" if ungated and report.gated_layers else ""
    total = len(report.attention_layers)
    # A hybrid pattern ("*-*-") numbers all its layers: say that only some are attention layers.
    if report.attention_layers != tuple(range(1, total + 1)):
        note = " attention layers" + note
    return (
        f"megatron-gate: gated attention on layers {_ranges(report.gated_layers)} of "
        f"{total}{note} | granularity {'/'.join(report.granularities) or '-'} | "
        f"backend {'/'.join(report.backends) or '-'} | {parallel} | monitor sinks: {sinks}"
    )


def missing_gate_message(report: GateReport, *, requested: str) -> str | None:
    """The start-up error when a requested gate is missing from the model, else None."""
    if report.gated_layers:
        return None
    return (
        f"{requested} was given, but the built model has no GatedSelfAttention layer "
        f"({len(report.attention_layers)} self-attention layers, none gated), so training would "
        "silently run without the gate. Stopping before training. megatron-gate gates the layer "
        "spec given to megatron.core's GPTModel or HybridModel: build the model with one of them "
        "(not a custom or legacy model class), or pass --spec megatron_gate.spec "
        "headwise_spec|elementwise_spec (megatron_gate.hybrid_spec headwise|elementwise for a "
        "HybridModel)."
    )
