# Sourced by scripts/ensure_*.sh:  apt_install WHO PACKAGE...
# Installs Debian packages with apt-get when this runs as root and apt-get exists; otherwise
# says how to install them. Returns 1 (after saying why on stderr) when nothing was installed.
apt_install() {
  local who=$1; shift
  if [ "$(id -u)" != "0" ]; then
    echo "$who: missing and not root; install with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends $*" >&2
    return 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$who: missing and no apt-get on this machine" >&2
    return 1
  fi
  # Another apt-get may hold the lock (parallel set-ups): wait for it rather than fail.
  local opts=(-q -o DPkg::Lock::Timeout=300) log=/tmp/$who.log
  if ! { DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" update &&
      DEBIAN_FRONTEND=noninteractive apt-get "${opts[@]}" install -y --no-install-recommends "$@"; } \
      >"$log" 2>&1; then
    echo "$who: apt-get install failed (see $log)" >&2
    return 1
  fi
}
