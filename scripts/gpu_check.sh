#!/usr/bin/env bash
# One-command GPU readiness check (one CUDA GPU, ~8 minutes):
#   1. CUDA present; Transformer Engine installed if it does not import yet;
#   2. the `gpu`-marked tests (TE equals local for both granularities, BF16, FP8 with headwise
#      padding, sequence parallel, context parallel 2, packed THD; multi-GPU cases skip on one GPU);
#   3. bench/gate_overhead.py (with TE where the bench takes --backend) and
#      bench/monitor_overhead.py (CUDA-event timing where the bench takes --cuda-events).
# Everything lands in bench/results/gpu/ (or --out DIR): one log per step and summary.json.
#
#   scripts/gpu_check.sh [--out DIR] [--python PY] [--budget SECONDS]
#   scripts/gpu_check.sh --dry-run      # no GPU needed: checks the plan and writes it (CI runs this)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export TORCHDYNAMO_DISABLE=1 PYTHONDONTWRITEBYTECODE=1

out=bench/results/gpu
py=${PYTHON:-}
budget=480
dry_run=0
fail() { echo "megatron-gate gpu-check: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out=${2:?--out needs a directory}; shift ;;
        --python) py=${2:?--python needs an interpreter}; shift ;;
        --budget) budget=${2:?--budget needs seconds}; shift ;;
        *) fail "unknown argument ($1): use --dry-run, --out DIR, --python PY or --budget SECONDS" ;;
    esac
    shift
done
case "$budget" in ''|*[!0-9]*) fail "--budget must be whole seconds (--budget $budget): e.g. --budget 480" ;; esac
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
fi
cuda=$([ -n "$py" ] && "$py" -c "import importlib.util as u, torch; assert u.find_spec('megatron.core'); print(int(torch.cuda.is_available()))" 2>/dev/null) \
    || fail "no Python with torch and megatron-core (--python ${py:-none}): run scripts/setup.sh or pass --python"

has_flag() { grep -q -- "\"$2\"" "$1"; }  # the bench's argparse declares the flag
gate_bench=(bench/gate_overhead.py --shapes large --repeats 20 --out "$out/gate_overhead.json")
if has_flag bench/gate_overhead.py --backend; then gate_bench+=(--backend te); fi
monitor_bench=(bench/monitor_overhead.py --layer-counts 4 8 --hidden 1024 --heads 16 --groups 8
               --seq 2048 --batch 2 --output "$out/monitor_overhead.json")
if has_flag bench/monitor_overhead.py --cuda-events; then monitor_bench+=(--cuda-events); fi

# name | seconds | command   (the seconds add up to the 8-minute budget on one H200)
steps=(
    "install_te|150|$py -c 'import transformer_engine.pytorch' 2>/dev/null || $py -m pip install --no-build-isolation 'transformer-engine[pytorch]>=2.0'"
    "gpu_tests|180|$py -m pytest -q -p no:cacheprovider -m gpu tests --junitxml $out/gpu_tests.xml -rs"
    "gate_bench|75|$py ${gate_bench[*]}"
    "monitor_bench|75|$py ${monitor_bench[*]}"
)

planned=0
for step in "${steps[@]}"; do planned=$((planned + $(cut -d'|' -f2 <<<"$step"))); done
[ "$planned" -le "$budget" ] || fail "the steps need ${planned}s, more than the budget (--budget $budget): raise it"
[ "$dry_run" -eq 1 ] || [ "$cuda" = 1 ] \
    || fail "no CUDA device (torch.cuda.is_available() is False): run on a GPU machine, or pass --dry-run"
mkdir -p "$out" || fail "cannot create the output directory ($out): pass a writable --out"

summary() {  # summary.json from the lines of $out/steps.tsv (name, status, seconds, command)
    "$py" - "$out" "$dry_run" "$budget" <<'PY'
import json, sys, pathlib
out, dry_run, budget = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, limit, command = line.split("\t")
    steps.append({"name": name, "status": status, "seconds": float(seconds),
                  "limit_seconds": int(limit), "command": command, "log": f"{name}.log"})
gpu_tests = (out / "gpu_tests_collected.txt")
report = {"dry_run": dry_run, "budget_seconds": budget, "steps": steps,
          "gpu_tests_collected": int(gpu_tests.read_text()) if gpu_tests.exists() else None}
(out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out / 'summary.json'}")
PY
}

: >"$out/steps.tsv"
# The gpu-marked tests must exist and collect here (on a CPU too): a renamed file would
# otherwise make the GPU run pass with nothing tested.
mapfile -t gpu_files < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
[ "${#gpu_files[@]}" -gt 0 ] || fail "no test file has the gpu marker (tests/): check pytest.mark.gpu"
collected=$("$py" -m pytest -q -p no:cacheprovider --collect-only -m gpu "${gpu_files[@]}" \
    2>/dev/null | grep -c '::' || true)
[ "$collected" -gt 0 ] || fail "no gpu-marked tests collect (tests/ -m gpu): check the gpu marker"
echo "$collected" >"$out/gpu_tests_collected.txt"

if [ "$dry_run" -eq 1 ]; then
    for step in "${steps[@]}"; do
        IFS='|' read -r name limit command <<<"$step"
        printf '%s\tplanned\t0\t%s\t%s\n' "$name" "$limit" "$command" >>"$out/steps.tsv"
        echo "[dry-run] $name (<= ${limit}s): $command"
    done
    summary
    exit 0
fi

"$py" -c "import torch; print('gpu-check on', torch.cuda.get_device_name(0))" | tee "$out/device.txt"

status=0
for step in "${steps[@]}"; do
    IFS='|' read -r name limit command <<<"$step"
    echo "== $name (<= ${limit}s)"
    start=$SECONDS
    # `timeout` ends the step's whole process group: no child outlives it.
    if timeout --kill-after=10 "$limit" bash -c "$command" >"$out/$name.log" 2>&1; then
        result=passed
    else
        code=$?
        result=$([ "$code" -eq 124 ] && echo timed_out || echo "failed($code)")
        status=1
    fi
    seconds=$((SECONDS - start))
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$result" "$seconds" "$limit" "$command" >>"$out/steps.tsv"
    echo "   $result in ${seconds}s (log: $out/$name.log)"
done
summary
exit "$status"
