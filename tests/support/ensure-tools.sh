#!/usr/bin/env bash
# Installs a system tool that an integration test drives, when it is missing:
#   bash tests/support/ensure-tools.sh chromium|nats-server
# Needs root and apt-get (Debian/Ubuntu). Parallel callers serialise on a lock file, so the
# package is installed once; the others wait and then find it. Exits non-zero, saying why, when
# the tool cannot be installed here.
set -euo pipefail

usage="usage: $0 chromium|nats-server|ip"
tool=${1:-}
# bins: where the package may put the binary, any one will do. Debian's nats-server has it in
# /usr/sbin (bookworm); /usr/bin is checked too, should a later package move it.
case "$tool" in
  chromium) bins=(/usr/bin/chromium); pkg=chromium; env_var=CHROMIUM; what="a Chromium binary" ;;
  nats-server)
    bins=(/usr/sbin/nats-server /usr/bin/nats-server); pkg=nats-server; env_var=NATS_SERVER
    what="a nats-server binary" ;;
  # The partition test's network namespaces and veth pairs (tests/cluster_partition.rs).
  ip) bins=(/usr/sbin/ip /usr/bin/ip /sbin/ip /bin/ip); pkg=iproute2; env_var=PATH; what="a folder with iproute2's ip" ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

installed() {
  local b
  for b in "${bins[@]}"; do
    [ -x "$b" ] && return 0
  done
  return 1
}

installed && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-tools: $tool is missing and this user is not root; install the '$pkg' package" \
       "(e.g. sudo apt-get install -y $pkg) or point \$$env_var at $what." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-tools: $tool is missing and there is no apt-get here; install $tool and set" \
       "\$$env_var to its binary." >&2
  exit 1
fi
if ! command -v flock >/dev/null 2>&1; then
  echo "ensure-tools: flock (util-linux) is needed to install $tool safely from parallel tests." >&2
  exit 1
fi

lock="${TMPDIR:-/tmp}/presenced-ensure-tools.lock"
exec 9>"$lock"
# An install takes minutes; wait up to 15 for another test's install to finish.
if ! flock -w 900 9; then
  echo "ensure-tools: timed out waiting for $lock (another install still running?)" >&2
  exit 1
fi
installed && exit 0 # installed by whoever held the lock before us

export DEBIAN_FRONTEND=noninteractive
echo "ensure-tools: installing $pkg with apt-get" >&2
apt-get update -q >&2
apt-get install -y -q "$pkg" >&2
if ! installed; then
  echo "ensure-tools: apt-get installed $pkg but none of ${bins[*]} is there" >&2
  exit 1
fi
