#!/usr/bin/env bash
# Installs a system tool that an integration test drives, when it is missing:
#   bash tests/support/ensure-tools.sh chromium
# Needs root and apt-get (Debian/Ubuntu). Parallel callers serialise on a lock file, so the
# package is installed once; the others wait and then find it. Exits non-zero, saying why, when
# the tool cannot be installed here.
set -euo pipefail

tool=${1:-}
case "$tool" in
  chromium) bin=/usr/bin/chromium; pkg=chromium ;;
  *) echo "usage: $0 chromium" >&2; exit 2 ;;
esac

[ -x "$bin" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-tools: $tool is missing and this user is not root; install the '$pkg' package" \
       "(e.g. sudo apt-get install -y $pkg) or point \$CHROMIUM at a Chromium binary." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-tools: $tool is missing and there is no apt-get here; install Chromium and set" \
       "\$CHROMIUM to its binary." >&2
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
[ -x "$bin" ] && exit 0 # installed by whoever held the lock before us

export DEBIAN_FRONTEND=noninteractive
echo "ensure-tools: installing $pkg with apt-get" >&2
apt-get update -q >&2
apt-get install -y -q "$pkg" >&2
if [ ! -x "$bin" ]; then
  echo "ensure-tools: apt-get installed $pkg but $bin is still missing" >&2
  exit 1
fi
