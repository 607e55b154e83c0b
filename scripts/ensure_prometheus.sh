#!/usr/bin/env bash
# Make `promtool` (Debian's `prometheus` package) available for the alert-rule tests.
#   scripts/ensure_prometheus.sh    -> prints the promtool path, or exits 1 saying why it cannot
# Installs with apt-get when promtool is missing and this runs as root with apt-get present;
# otherwise only reports. Quiet unless it fails.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib/apt_install.sh"

if ! command -v promtool >/dev/null 2>&1; then
  apt_install ensure_prometheus prometheus || exit 1
  command -v promtool >/dev/null 2>&1 || { echo "ensure_prometheus: installed, but promtool still not found" >&2; exit 1; }
fi
command -v promtool
