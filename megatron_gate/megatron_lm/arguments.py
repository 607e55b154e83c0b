"""megatron-gate's flags in Megatron-LM's argument parser, and what they ask for.

    --gated-attention {headwise,elementwise}   gate every GPT self-attention layer
    --gate-bias                                give the gate rows a trainable bias
    --stability-config monitor.yaml            stability monitor config (= --monitor-config)
    --stability-dir DIR                        where stability.jsonl goes (<--save>/stability)
    --monitor-set KEY=VALUE, --no-monitor      the monitor's own flags
    --grad-norm-skip-threshold X               Megatron-Core's OptimizerConfig field, which
                                               Megatron-LM 0.19 has no flag for

`add_megatron_gate_args(parser)` is an `extra_args_provider` (Megatron passes the parser and
uses what it returns); `chain_args_providers` puts it in front of a script's own provider.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

from megatron_gate.config import GRANULARITIES, GateConfig, GateConfigError

ArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

GATE_FLAG = "--gated-attention"
SPEC_MODULE = "megatron_gate.spec"
HYBRID_SPEC_MODULE = "megatron_gate.hybrid_spec"
SPEC_MODULES = (SPEC_MODULE, HYBRID_SPEC_MODULE)
"""megatron-gate's modules for `--spec MODULE NAME`; each lists its names in `SPEC_NAMES`."""


def _add_monitor_args(parser: argparse.ArgumentParser) -> None:
    from megatron_gate.monitor.config import MonitorConfig

    MonitorConfig.add_cli_arguments(parser)
    # `--stability-config` is the name in launch lines; it fills the monitor's own flag.
    parser.add_argument(
        "--stability-config",
        dest="monitor_config",
        default=None,
        metavar="YAML",
        help="Stability monitor config (YAML); same as --monitor-config.",
    )
    parser.add_argument(
        "--stability-dir",
        default=None,
        metavar="DIR",
        help="Where the monitor writes stability.jsonl (default: <--save>/stability).",
    )


def add_megatron_gate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add megatron-gate's flags to `parser` (once; a second call changes nothing)."""
    if GATE_FLAG in parser._option_string_actions:
        return parser
    group = parser.add_argument_group("megatron-gate")
    group.add_argument(
        GATE_FLAG,
        choices=GRANULARITIES,
        default=None,
        help="Gate the output of every GPT self-attention layer (Qiu et al., 2025): one sigmoid "
        "gate per head channel (elementwise) or per head (headwise).",
    )
    group.add_argument(
        "--gate-bias",
        action="store_true",
        help="Give the gate rows a trainable bias (off by default).",
    )
    _add_monitor_args(parser)
    if "--grad-norm-skip-threshold" not in parser._option_string_actions:
        # Megatron-LM builds its OptimizerConfig from the args of the same names.
        group.add_argument(
            "--grad-norm-skip-threshold",
            type=float,
            default=float("inf"),
            metavar="X",
            help="Megatron-Core skips the step when the global grad norm exceeds X (default: "
            "off). Counted once with the stability guard's skips (docs/megatron-lm.md).",
        )
    return parser


def chain_args_providers(provider: ArgsProvider | None) -> ArgsProvider:
    """An `extra_args_provider` adding megatron-gate's flags, then the script's own."""

    def provide(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        parser = add_megatron_gate_args(parser)
        return provider(parser) if provider is not None else parser

    provide.__wrapped__ = provider  # type: ignore[attr-defined]
    return provide


def gate_config_from_args(args: argparse.Namespace) -> GateConfig | None:
    """The gate `--gated-attention` asks for, or None when it is not given."""
    granularity = getattr(args, "gated_attention", None)
    if granularity is None:
        return None
    return GateConfig(granularity=granularity, gate_bias=bool(getattr(args, "gate_bias", False)))


def names_gated_spec(spec: list[str]) -> bool:
    """True when `--spec MODULE NAME` names one of megatron-gate's gated specs."""
    if len(spec) != 2 or spec[0] not in SPEC_MODULES:
        return False
    return spec[1] in importlib.import_module(spec[0]).GATED_SPEC_NAMES


def spec_asks_for_gate(args: argparse.Namespace) -> bool:
    """True when `--spec` names one of megatron-gate's gated specs."""
    return names_gated_spec(getattr(args, "spec", None) or [])


def gating_requested(args: argparse.Namespace) -> bool:
    """Whether the run asked for gated attention (by flag or by `--spec`)."""
    return gate_config_from_args(args) is not None or spec_asks_for_gate(args)


def check_spec_importable(args: argparse.Namespace) -> None:
    """Raise for a `--spec MODULE NAME` that cannot be imported.

    Megatron only logs a failed `--spec` import and then trains its default spec: a typo would
    silently drop the gate (or any custom spec).
    """
    spec = getattr(args, "spec", None)
    if not spec or spec == ["local"]:
        return
    if len(spec) != 2:
        raise GateConfigError(
            f"expected MODULE NAME (--spec {' '.join(spec)}): "
            f"e.g. --spec {SPEC_MODULE} headwise_spec"
        )
    module_name, name = spec
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise GateConfigError(
            f"module {module_name!r} cannot be imported ({error}), and Megatron would silently "
            f"train its default spec (--spec {module_name} {name}): fix the module path, e.g. "
            f"--spec {SPEC_MODULE} headwise_spec"
        ) from error
    names = getattr(module, "SPEC_NAMES", None) if module_name in SPEC_MODULES else None
    if names is not None and name not in names:
        raise GateConfigError(
            f"{module_name} has no spec {name!r} (--spec {module_name} {name}): "
            f"use one of {', '.join(names)}"
        )
    if not hasattr(module, name):
        raise GateConfigError(
            f"{module_name} has no {name!r} (--spec {module_name} {name}): check the name"
        )


def describe_request(args: Any) -> str:
    """How the run asked for the gate, for error messages."""
    gate = gate_config_from_args(args)
    if gate is not None:
        return f"{GATE_FLAG} {gate.granularity}"
    return "--spec " + " ".join(getattr(args, "spec", None) or [])
