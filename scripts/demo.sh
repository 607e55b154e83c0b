#!/usr/bin/env bash
# The main job on a fresh machine: set up, then `megatron-gate demo` (arguments pass through).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$("$root/scripts/setup.sh" 3.12)
exec "$(dirname "$py")/megatron-gate" demo "$@"
