#!/usr/bin/env bash
# Make `promtool` (Debian's `prometheus` package) available for the alert-rule tests.
#   scripts/ensure_prometheus.sh    -> prints the promtool path, or exits 1 saying why it cannot
# Installs with apt-get when promtool is missing and this runs as root with apt-get present;
# otherwise only reports. Quiet unless it fails. The package's server is not started.
set -uo pipefail

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" != "0" ]; then
    echo "ensure_prometheus: promtool missing and not root; install with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_prometheus: promtool missing and no apt-get on this machine" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d 101: the package's service is not started inside a container or CI job.
  opts=(-q -o DPkg::Lock::Timeout=300)
  if ! { apt-get "${opts[@]}" update && apt-get "${opts[@]}" install -y --no-install-recommends \
      prometheus; } >/tmp/ensure_prometheus.log 2>&1; then
    echo "ensure_prometheus: apt-get install failed (see /tmp/ensure_prometheus.log)" >&2
    exit 1
  fi
  command -v promtool >/dev/null 2>&1 || { echo "ensure_prometheus: installed, but promtool still not found" >&2; exit 1; }
fi
command -v promtool
