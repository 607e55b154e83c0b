#!/usr/bin/env bash
# The GPU check, for one CUDA GPU with NO network (about 8 minutes in one go):
#   wheels         the wheels the machine lacks, brought along in .whl/ (git-ignored; fetch them
#                  beforehand with scripts/gpu_check_wheels.sh), installed offline into a folder
#   gpu_tests      the `gpu`-marked tests (Transformer Engine, FP8, 2 GPUs): each one skips with
#                  one line naming the reason where TE or a second GPU is missing
#   correctness    the gate (local backend, both granularities) in BF16 against fp32
#   guard          tiny GPT, monitor and guard on the GPU; unlogged steps under
#                  torch.cuda.set_sync_debug_mode("error"): the guard adds no host sync
#   gate_bench     bench/gate_overhead.py's variants at hidden 4096, seq 4096, BF16, CUDA events
#   monitor_bench  bench/monitor_overhead.py at hidden 4096, seq 4096 (CUDA events)
# Results land in one folder (--out, default bench/results/gpu/: commit it), with summary.json.
#
#   scripts/gpu_check.sh [--out DIR] [--python PY] [--wheels DIR] [--budget SECONDS]
#   scripts/gpu_check.sh --dry-run   # no GPU: checks the wheels' list and the plan (CI runs this)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export TORCHDYNAMO_DISABLE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

out=bench/results/gpu
py=${PYTHON:-}
wheels=.whl
budget=480
dry_run=0
list=scripts/gpu_check_wheels.txt
fail() { echo "megatron-gate gpu-check: error: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) out=${2:?--out needs a directory}; shift ;;
        --python) py=${2:?--python needs an interpreter}; shift ;;
        --wheels) wheels=${2:?--wheels needs a directory}; shift ;;
        --budget) budget=${2:?--budget needs seconds}; shift ;;
        *) fail "unknown argument ($1): use --dry-run, --out DIR, --python PY, --wheels DIR or --budget SECONDS" ;;
    esac
    shift
done
case "$budget" in ''|*[!0-9]*) fail "--budget must be whole seconds (--budget $budget): e.g. --budget 480" ;; esac
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=$(command -v python3 || true); fi
fi
"$py" -c "import torch" 2>/dev/null || fail "no Python with torch (--python ${py:-none}): pass --python"

cuda=$("$py" -c "import torch; print(int(torch.cuda.is_available()))")
[ "$dry_run" -eq 1 ] || [ "$cuda" = 1 ] \
    || fail "no CUDA device (torch.cuda.is_available() is False): run on a GPU machine, or pass --dry-run"
# The wheels' list: pinned as the tests are (requirements/py312.txt), present in --wheels, and
# installable from there alone (pip resolves them offline; --no-deps: the machine has the rest).
"$py" scripts/gpu_check_wheels.py check --list "$list" --wheels "$wheels" \
    $([ "$dry_run" -eq 1 ] || echo --require) || exit 2

# Only the files with gpu-marked tests: the rest of tests/ imports packages the machine lacks.
mapfile -t gpu_files < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
[ "${#gpu_files[@]}" -gt 0 ] || fail "no test file has the gpu marker (tests/): check pytest.mark.gpu"
site=$(mktemp -d "${TMPDIR:-/tmp}/megatron-gate-gpu-check.XXXXXX")
trap 'rm -rf "$site"' EXIT
cuda_py="$py scripts/gpu_check_cuda.py"
steps=(
    "wheels|45|$py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site $wheels/*.whl"
    "gpu_tests|75|$py -m pytest -q -p no:cacheprovider -m gpu ${gpu_files[*]} --junitxml $out/gpu_tests.xml -rs"
    "correctness|60|$cuda_py correctness --out $out"
    "guard|60|$cuda_py guard --out $out"
    "gate_bench|120|$cuda_py gate-bench --out $out --repeats 10"
    "monitor_bench|120|$py bench/monitor_overhead.py --device cuda --layer-counts 2 --hidden 4096 --heads 32 --groups 8 --seq 4096 --batch 1 --rounds 2 --no-production --output $out/monitor_overhead.json"
)

planned=0
for step in "${steps[@]}"; do planned=$((planned + $(cut -d'|' -f2 <<<"$step"))); done
[ "$planned" -le "$budget" ] || fail "the steps need ${planned}s, more than the budget (--budget $budget): raise it"
mkdir -p "$out" || fail "cannot create the output directory ($out): pass a writable --out"

summary() {  # summary.json from the lines of $out/steps.tsv (name, status, seconds, limit, command)
    "$py" - "$out" "$dry_run" "$budget" <<'PY'
import json, sys, pathlib
out, dry_run, budget = pathlib.Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, seconds, limit, command = line.split("\t")
    steps.append({"name": name, "status": status, "seconds": float(seconds),
                  "limit_seconds": int(limit), "command": command, "log": f"{name}.log"})
gpu_tests = out / "gpu_tests_collected.txt"
wheels = out / "wheels.json"
report = {"dry_run": dry_run, "budget_seconds": budget, "steps": steps,
          "wheels": json.loads(wheels.read_text()) if wheels.exists() else None,
          "gpu_tests_collected": int(gpu_tests.read_text()) if gpu_tests.exists() else None}
(out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
print(f"wrote {out / 'summary.json'}")
PY
}

: >"$out/steps.tsv"
"$py" scripts/gpu_check_wheels.py check --list "$list" --wheels "$wheels" --json >"$out/wheels.json"
# The gpu-marked tests must exist and collect (on a CPU too): a renamed file would otherwise
# make the GPU run pass with nothing tested.
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

"$py" -c "import torch; print('gpu-check on', torch.cuda.get_device_name(0), 'torch', torch.__version__)" | tee "$out/device.txt"
"$py" -c "import transformer_engine.pytorch" 2>/dev/null \
    || echo "transformer_engine: not importable here: Transformer Engine and FP8 tests skip" | tee -a "$out/device.txt"
export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"

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
    # Without its wheels nothing else can import megatron.core.
    [ "$name" = wheels ] && [ "$result" != passed ] && break
done
summary
exit "$status"
