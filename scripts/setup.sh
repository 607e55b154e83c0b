#!/usr/bin/env bash
# Set up (or reuse) the environment for one leg and print the path of its python.
#   scripts/setup.sh           primary target: Python >= 3.12, megatron-core 0.19.2
#   scripts/setup.sh 3.11      compatibility floor: Python 3.11, megatron-core 0.16.1
# The pinned dependencies live in a cache keyed by the requirements file's hash
# ($MEGATRON_GATE_CACHE, default ~/.cache/megatron-gate) and are shared between clones; each clone
# gets a small venv (.venv or .venv-py311) that sees them and holds megatron-gate itself.
# Exit codes: 0 ready, 3 no suitable Python on this machine, other: the install failed.
set -euo pipefail

leg=${1:-3.12}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MEGATRON_GATE_CACHE:-$HOME/.cache/megatron-gate}
say() { echo "[setup] $*" >&2; }

python_ok() {  # python_ok PY MAJOR.MINOR -> true when PY runs and is exactly that version
  "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] == tuple(map(int, '$2'.split('.'))) else 1)" 2>/dev/null
}

find_python() {  # find_python MAJOR.MINOR
  local want=$1 c
  local candidates=("python$want")
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/"$want".*/bin/python"$want"; do candidates+=("$c"); done
  fi
  candidates+=("/usr/bin/python$want" "/usr/local/bin/python$want" python3)
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && python_ok "$c" "$want"; then command -v "$c"; return 0; fi
  done
  return 1
}

if [ "$leg" = "3.12" ]; then
  if ! py=$(find_python 3.12) && ! py=$(find_python 3.13); then
    say "NOTICE: no Python >= 3.12 found (needed for megatron-core 0.17+)."
    say "Falling back to Python 3.11 + megatron-core 0.16.1 (the compatibility floor)."
    leg=3.11
  fi
fi
if [ "$leg" = "3.11" ]; then
  py=$(find_python 3.11) || {
    say "ERROR: megatron-gate needs Python 3.12 (preferred) or 3.11 on this machine."
    say "Install one (e.g. 'pyenv install 3.12' or 'apt-get install python3.12-venv') and rerun."
    exit 3  # "no interpreter": scripts/test.sh skips the floor leg only for this
  }
fi

tag=py${leg/./}
reqs=$root/requirements/$tag.txt
[ "$leg" = "3.13" ] && reqs=$root/requirements/py312.txt
hash=$(cat "$reqs" | sha256sum | cut -c1-12)
deps=$cache/deps-$tag-$hash
if [ ! -f "$deps/.complete" ]; then
  say "installing pinned dependencies ($reqs) into $deps (first time only, a few minutes)"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.deps-$tag-XXXXXX")
  "$py" -m venv "$tmp"
  "$tmp/bin/pip" install -q -r "$reqs" >&2
  touch "$tmp/.complete"
  rm -rf "$deps" && mv "$tmp" "$deps"
fi
site_dir=$(ls -d "$deps"/lib/python*/site-packages)

venv=$root/.venv
[ "$leg" = "3.11" ] && venv=$root/.venv-py311
if [ ! -x "$venv/bin/python" ] || ! python_ok "$venv/bin/python" "$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"; then
  rm -rf "$venv"
  "$py" -m venv "$venv"
fi
venv_site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "import site; site.addsitedir('$site_dir')" > "$venv_site/_megatron_gate_deps.pth"
# Installed (not merely importable from the current directory) and pointing at this clone?
if [ ! -x "$venv/bin/megatron-gate" ] || ! (cd / && "$venv/bin/python" -c "import megatron_gate, sys; sys.exit(0 if megatron_gate.__file__.startswith('$root/') else 1)" 2>/dev/null); then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv/bin/python"
