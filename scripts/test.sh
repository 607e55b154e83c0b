#!/usr/bin/env bash
# Run the test suite on a fresh machine: sets up what it needs, then
#   1. primary target (Python 3.12, megatron-core 0.19.2): ruff, then the whole suite;
#   2. compatibility floor (Python 3.11, megatron-core 0.16.1): the gate, layout, spec and
#      tensor/pipeline-parallel tests.
# Extra arguments go to the primary leg's pytest (e.g. scripts/test.sh -k parallel).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export TORCHDYNAMO_DISABLE=1 PYTHONDONTWRITEBYTECODE=1

FLOOR_TESTS=(tests/test_gate_op.py tests/test_layout.py tests/test_attention.py tests/test_parallel.py)

py=$(scripts/setup.sh 3.12)
if [ -x scripts/ensure_chromium.sh ]; then scripts/ensure_chromium.sh || true; fi
if [ -x scripts/ensure_prometheus.sh ]; then scripts/ensure_prometheus.sh >/dev/null || true; fi
echo "== ruff =="
"$py" -m ruff check .
echo "== primary leg: $("$py" -c 'import sys, importlib.metadata as m; print("Python %d.%d" % sys.version_info[:2], "megatron-core", m.version("megatron-core"))') =="
"$py" -m pytest -q -p no:cacheprovider "$@"

status=0
floor_py=$(scripts/setup.sh 3.11) || status=$?
if [ "$status" -eq 3 ]; then echo "[test] no Python 3.11 here: floor leg skipped"; exit 0; fi
if [ "$status" -ne 0 ]; then echo "[test] setting up the floor leg failed (exit $status)"; exit "$status"; fi
echo "== floor leg: $("$floor_py" -c 'import sys, importlib.metadata as m; print("Python %d.%d" % sys.version_info[:2], "megatron-core", m.version("megatron-core"))') =="
"$floor_py" -m pytest -q -p no:cacheprovider "${FLOOR_TESTS[@]}"
