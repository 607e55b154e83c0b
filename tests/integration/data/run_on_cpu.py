"""`python run_on_cpu.py SCRIPT ARGS`: run SCRIPT as `python SCRIPT ARGS` would (also under
torchrun), after megatron-gate's one CPU switch and nothing else of megatron-gate: a script
patched with `patches/` brings megatron-gate in itself, but not the CPU runtime."""

import os
import runpy
import sys

from megatron_gate.cpu import enable_cpu_runtime

enable_cpu_runtime()
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
