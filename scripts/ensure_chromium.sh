#!/usr/bin/env bash
# Make headless Chromium and its WebDriver available for the dashboard's browser test.
#   scripts/ensure_chromium.sh      -> prints the chromium path, or exits 1 saying why it cannot
# Installs Debian's `chromium` and `chromium-driver` with apt-get when they are missing and this
# runs as root with apt-get present; otherwise only reports. Quiet unless it fails.
set -uo pipefail

find_chromium() {
  local c
  for c in chromium chromium-browser google-chrome; do
    if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
  done
  return 1
}

have_all() { find_chromium >/dev/null && command -v chromedriver >/dev/null 2>&1; }

if ! have_all; then
  if [ "$(id -u)" != "0" ]; then
    echo "ensure_chromium: chromium/chromedriver missing and not root; install with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: chromium/chromedriver missing and no apt-get on this machine" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Another apt-get may hold the lock (parallel set-ups): wait for it rather than fail.
  opts=(-q -o DPkg::Lock::Timeout=300)
  if ! { apt-get "${opts[@]}" update && apt-get "${opts[@]}" install -y --no-install-recommends \
      chromium chromium-driver fonts-liberation; } >/tmp/ensure_chromium.log 2>&1; then
    echo "ensure_chromium: apt-get install failed (see /tmp/ensure_chromium.log)" >&2
    exit 1
  fi
  have_all || { echo "ensure_chromium: installed, but chromium/chromedriver still not found" >&2; exit 1; }
fi
find_chromium
