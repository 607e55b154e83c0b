"""megatron-gate inside Megatron-LM's own training loop, without editing the training script.

`enable_megatron_gate()` wraps these functions of `megatron.training` (idempotent):

    parse_args                  add our flags; check `--spec`; gate GPTModel's layer spec
    pretrain                    run an older-API script on the 0.19 loop; close the monitor
    setup_model_and_optimizer   start-up check (no silent no-op), start-up line, start the monitor
    train                       close the monitor when training ends (see `monitor_lifetime`:
                                also when a script bound `pretrain` before this wrapping)
    train_step, checkpointing   the stability monitor's per-step and checkpoint hooks
                                (see `monitor_hooks`)

`python -m megatron_gate.run` calls it before running the script; a script edited with one of
`patches/` calls it itself.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from megatron_gate.config import GateConfig, GateConfigError
from megatron_gate.megatron_lm import arguments as gate_args
from megatron_gate.megatron_lm import monitor_hooks, monitor_lifetime, skips
from megatron_gate.megatron_lm.flops import GatedLayers, wrap_num_floating_point_operations
from megatron_gate.megatron_lm.patching import wrap
from megatron_gate.megatron_lm.pretrain_api import (
    bridge_legacy_call,
    is_legacy_call,
    takes_config_container,
)
from megatron_gate.megatron_lm.spec_swap import gate_hybrid_spec, gating_init
from megatron_gate.megatron_lm.startup import global_report, missing_gate_message, startup_line
from megatron_gate.monitor.config import MonitorConfig

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """What the wrapped functions learned about this run, in the order they learn it."""

    args: argparse.Namespace | None = None
    gate: GateConfig | None = None
    model_built: bool = False
    startup_line: str | None = None
    nan_check_notice_shown: bool = False
    gated_layers: GatedLayers | None = None
    """The built model's gated layers, all ranks together (for the FLOPs count)."""


RUN = RunState()


def _on_parsed(args: argparse.Namespace) -> None:
    """Checks and the spec swap, as soon as the arguments are known (before any model)."""
    gate_args.check_spec_importable(args)
    # A bad --stability-config must stop the run now, not after the model, the optimizer and
    # the --load checkpoint are built.
    _hand_nan_checks_to_guard(args, MonitorConfig.from_cli_args(args))
    RUN.args, RUN.gate = args, gate_args.gate_config_from_args(args)
    if RUN.gate is not None:
        _gate_model_classes(RUN.gate)


def _hand_nan_checks_to_guard(args: argparse.Namespace, config: MonitorConfig) -> None:
    """Let the guard skip NaN/Inf steps instead of Megatron stopping the run at the first one.

    Megatron-LM's `--check-for-nan-in-loss-and-grad` is on by default and raises before the
    optimizer step, so a configured `guard.skip_non_finite` would never be carried out. The
    user asked for the guard by running the monitor; Megatron's check is turned off and the
    run says so (`guard.skip_non_finite: false` keeps Megatron's check).
    """
    guard = config.guard
    wants_guard = config.enabled and guard.enabled and guard.skip_non_finite
    if not wants_guard or not getattr(args, "check_for_nan_in_loss_and_grad", False):
        return
    args.check_for_nan_in_loss_and_grad = False
    # Said once per run: Megatron parses the command line again (ft_integration.setup and
    # inprocess_restart re-read it), and before init_process_group every rank gets here.
    if not RUN.nan_check_notice_shown and _first_rank():
        RUN.nan_check_notice_shown = True
        print(
            "megatron-gate: the stability guard skips NaN/Inf steps, so Megatron's "
            "--check-for-nan-in-loss-and-grad (which stops the run) is off; set "
            "guard.skip_non_finite: false in --stability-config to keep Megatron's check.",
            flush=True,
        )


def _first_rank() -> bool:
    """Global rank 0, also before torch.distributed is initialized (torchrun's RANK)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _gate_model_classes(gate: GateConfig) -> None:
    """Gate the layer spec that GPTModel (and HybridModel, where it exists) is built with."""
    import importlib.util

    from megatron.core.models.gpt.gpt_model import GPTModel

    wrap([GPTModel], "__init__", lambda original: gating_init(original, gate))
    if importlib.util.find_spec("megatron.core.models.hybrid") is None:
        return  # megatron-core < 0.19
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    wrap(
        [HybridModel],
        "__init__",
        lambda original: gating_init(
            original, gate, spec_argument="hybrid_stack_spec", gate_spec_of=gate_hybrid_spec
        ),
    )


def _wrap_parse_args(original: Any) -> Any:
    def parse_args(extra_args_provider: Any = None, *args: Any, **kwargs: Any) -> Any:
        parsed = original(gate_args.chain_args_providers(extra_args_provider), *args, **kwargs)
        _on_parsed(parsed)
        return parsed

    return parse_args


def _wrap_pretrain(original: Any) -> Any:
    def pretrain(*args: Any, **kwargs: Any) -> Any:
        with monitor_lifetime.closing_monitor(release=True):
            if takes_config_container(original) and is_legacy_call(args, kwargs):
                return bridge_legacy_call(original, args, kwargs)
            return original(*args, **kwargs)

    return pretrain


def _parallel_sizes() -> dict[str, int]:
    from megatron.core import parallel_state as mpu

    return {
        "TP": mpu.get_tensor_model_parallel_world_size(),
        "PP": mpu.get_pipeline_model_parallel_world_size(),
        "DP": mpu.get_data_parallel_world_size(),
        "CP": mpu.get_context_parallel_world_size(),
    }


def _validated_args() -> argparse.Namespace | None:
    """Megatron's validated arguments once it has them (defaults filled in, e.g. the global
    batch size): Megatron parses the command line more than once, and the namespace seen by
    the parse wrapper may be a raw one."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return RUN.args
    validated = getattr(global_vars, "_GLOBAL_ARGS", None)
    return validated if validated is not None else RUN.args


def check_model(model_chunks: list[Any], optimizer: Any = None, scheduler: Any = None) -> str:
    """Stop a run whose gate is missing; start the monitor; return (and print) the start-up line."""
    args = _validated_args()
    report = global_report(model_chunks, _parallel_sizes())
    if args is not None and gate_args.gating_requested(args):
        message = missing_gate_message(report, requested=gate_args.describe_request(args))
        if message is not None:
            raise GateConfigError(message)
    if report.gated_layers and len(report.granularities) == 1:  # the runner gates with one
        RUN.gated_layers = GatedLayers(
            granularity=report.granularities[0], count=len(report.gated_layers)
        )
    backend = "/".join(report.backends) or None
    sinks = monitor_hooks.attach(args, model_chunks, optimizer, scheduler, backend=backend)
    monitor_lifetime.close_at_exit()
    line = startup_line(report, monitor_sinks=sinks)
    RUN.model_built, RUN.startup_line = True, line
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)
        print(_skip_line(args, optimizer), flush=True)
    return line


def _skip_line(args: argparse.Namespace | None, optimizer: Any) -> str:
    active = monitor_hooks.ACTIVE
    return skips.in_charge_line(
        guard_on=active is not None and active.monitor.guard is not None,
        threshold=skips.grad_norm_skip_threshold(optimizer),
        args=args,
    )


def _wrap_setup_model_and_optimizer(original: Any) -> Any:
    def setup_model_and_optimizer(*args: Any, **kwargs: Any) -> Any:
        model, optimizer, scheduler = original(*args, **kwargs)
        check_model(model, optimizer, scheduler)
        return model, optimizer, scheduler

    return setup_model_and_optimizer


def enable_megatron_gate() -> None:
    """Install megatron-gate's flags, spec swap, start-up check and monitor into
    `megatron.training` (once; later calls change nothing)."""
    import megatron.training as megatron_training
    from megatron.training import arguments, initialize, training

    wrap([arguments, initialize], "parse_args", _wrap_parse_args)
    wrap([megatron_training, training], "pretrain", _wrap_pretrain)
    wrap([training], "setup_model_and_optimizer", _wrap_setup_model_and_optimizer)
    wrap([training], "train", monitor_lifetime.wrap_train)
    wrap(
        [training],
        "num_floating_point_operations",
        lambda original: wrap_num_floating_point_operations(original, lambda: RUN.gated_layers),
    )
    monitor_hooks.install(training)
