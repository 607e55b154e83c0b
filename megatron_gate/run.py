"""Run an existing Megatron-LM training script with gated attention and the stability monitor.

    torchrun --nproc-per-node 8 -m megatron_gate.run pretrain_gpt.py <its usual args> \\
        --gated-attention headwise --stability-config monitor.yaml

The script runs unmodified, as `__main__`, after megatron-gate has added its flags to
Megatron's parser, the gate to GPTModel's layer spec and the monitor to the training loop (see
`megatron_gate.megatron_lm`). Without CUDA the CPU runtime is applied first, so the same line
runs a smoke test on a laptop (add the CPU flags of docs/megatron-lm.md).

A run that asks for the gate and would train without it stops at start-up with exit code 2.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch

from megatron_gate.config import GateConfigError

USAGE = "usage: python -m megatron_gate.run SCRIPT.py [script args] [--gated-attention ...]"
ERROR_EXIT_CODE = 2


def _fail(message: str) -> int:
    print(f"megatron-gate run: error: {message}", file=sys.stderr, flush=True)
    return ERROR_EXIT_CODE


def _asks_for_gate(script_args: list[str]) -> bool:
    from megatron_gate.megatron_lm.arguments import GATE_FLAG, names_gated_spec

    flags = [arg.split("=")[0] for arg in script_args]
    return GATE_FLAG in flags or any(
        arg == "--spec" and names_gated_spec(script_args[i + 1 : i + 3])
        for i, arg in enumerate(script_args)
    )


def _prepare_runtime() -> None:
    from megatron_gate.cpu import enable_cpu_runtime
    from megatron_gate.cpu.training_loop import prebuilt_dataset_helpers

    if not torch.cuda.is_available():
        enable_cpu_runtime()  # the model, the training loop and the dataset helpers
    prebuilt_dataset_helpers()  # a wheel has no Makefile for them, on GPUs too


def run_script(script: str, script_args: list[str]) -> int:
    """Run `script` as `__main__` with `script_args` under megatron-gate; return an exit code."""
    from megatron_gate.megatron_lm import enable_megatron_gate
    from megatron_gate.megatron_lm.integration import RUN
    from megatron_gate.monitor.config import MonitorConfigError

    if not os.path.isfile(script):
        return _fail(
            f"training script does not exist ({script}): pass the path of a script. {USAGE}"
        )
    _prepare_runtime()
    enable_megatron_gate()
    sys.argv = [script, *script_args]
    # Like `python script.py`: the script's folder first on the path (Megatron-LM's scripts
    # import their neighbours, e.g. `from gpt_builders import gpt_builder`).
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except (GateConfigError, MonitorConfigError) as error:
        return _fail(str(error))
    if _asks_for_gate(script_args) and not RUN.model_built:
        return _fail(
            f"gated attention was asked for but no model was built through megatron.training's "
            f"setup_model_and_optimizer, so nothing was gated ({script}): build the model with "
            "megatron.training's pretrain"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m megatron_gate.run`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else ERROR_EXIT_CODE
    return run_script(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
