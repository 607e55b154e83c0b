#!/usr/bin/env bash
# Make headless Chromium and its WebDriver available for the dashboard's browser test.
#   scripts/ensure_chromium.sh      -> prints the chromium path, or exits 1 saying why it cannot
# Installs Debian's `chromium` and `chromium-driver` with apt-get when they are missing and this
# runs as root with apt-get present; otherwise only reports. Quiet unless it fails.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt_install.sh"

find_chromium() {
  local c
  for c in chromium chromium-browser google-chrome; do
    if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
  done
  return 1
}

have_all() { find_chromium >/dev/null && command -v chromedriver >/dev/null 2>&1; }

if ! have_all; then
  apt_install ensure_chromium chromium chromium-driver fonts-liberation || exit 1
  have_all || { echo "ensure_chromium: installed, but chromium/chromedriver still not found" >&2; exit 1; }
fi
find_chromium
