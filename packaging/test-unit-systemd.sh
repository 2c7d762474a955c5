#!/usr/bin/env bash
# The packaged unit under a real systemd: boots Debian 12 (made with debootstrap) in a
# systemd-nspawn container with its own systemd as PID 1 and no network but loopback, installs
# the .deb there (postinst starts the service), and checks what packaging/test-deb.sh cannot
# without systemd: Type=notify start-up, the hardening in force on the running process, the
# watchdog fed, `systemctl reload` (the zero-downtime upgrade) moving MAINPID to the new process
# and the service staying up after the old one drains, and a clean stop.
#
#   bash packaging/test-unit-systemd.sh DEB
#
# DEB: a package from `cargo deb` (or packaging/test-deb.sh's). Needs root, and a host where
# systemd-nspawn can boot a container (not every CI sandbox allows it); installs debootstrap
# and systemd-container when missing. ROOTFS_CACHE (default /var/tmp/presenced-nspawn-rootfs)
# keeps the debootstrapped base between runs; each run works on a copy of it.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOTFS_CACHE=${ROOTFS_CACHE:-/var/tmp/presenced-nspawn-rootfs}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# Short enough to watch it work within the test; the shipped unit says 30s.
WATCHDOG_S=3
BOOT_TIMEOUT_S=60
READY_TIMEOUT_S=30

say() { printf 'test-unit-systemd: %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

deb=${1:-}
if [ -z "$deb" ] || [ ! -f "$deb" ]; then fail "usage: $0 DEB"; fi
[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap, systemd-nspawn)"
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${missing[@]}" >&2
fi

if [ ! -x "$ROOTFS_CACHE/lib/systemd/systemd" ]; then
  say "debootstrap bookworm (systemd, curl) into $ROOTFS_CACHE"
  rm -rf "$ROOTFS_CACHE"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,curl bookworm \
    "$ROOTFS_CACHE" "$MIRROR" >&2
fi

work=$(mktemp -d /var/tmp/presenced-nspawn.XXXXXX)
root="$work/root"
nspawn_pid=
cleanup() {
  local rc=$?
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$nspawn_pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then say "OK"; else say "failed (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

cp -a "$ROOTFS_CACHE" "$root"
cp "$deb" "$root/root/presenced.deb"

say "booting systemd in a container"
systemd-nspawn -q -D "$root" -b --register=no --keep-unit --private-network \
  --console=pipe --resolv-conf=off >"$work/boot.log" 2>&1 &
nspawn_pid=$!

# The container's PID 1: systemd, a child of systemd-nspawn.
leader=
deadline=$((SECONDS + BOOT_TIMEOUT_S))
while [ -z "$leader" ] && [ "$SECONDS" -lt "$deadline" ]; do
  kill -0 "$nspawn_pid" 2>/dev/null || { cat "$work/boot.log" >&2; fail "systemd-nspawn exited"; }
  leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
  sleep 0.2
done
[ -n "$leader" ] || fail "no systemd in the container after ${BOOT_TIMEOUT_S}s"
ct() { nsenter -t "$leader" -a -- "$@"; }
state=
while [ "$SECONDS" -lt "$deadline" ]; do
  state=$(ct systemctl is-system-running 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 0.5
done
case "$state" in running | degraded) ;; *) fail "the container did not boot (state: $state)" ;; esac
say "container up (systemd $(ct systemctl --version | head -n 1 | cut -d' ' -f2), $state)"

# A short watchdog and a short drain, so the test sees both work within seconds.
mkdir -p "$root/etc/systemd/system/presenced.service.d"
printf '[Service]\nWatchdogSec=%ss\n' "$WATCHDOG_S" \
  >"$root/etc/systemd/system/presenced.service.d/test.conf"

say "dpkg -i (postinst starts the service)"
ct dpkg -i /root/presenced.deb >&2 || fail "dpkg -i failed"
prop() { ct systemctl show presenced.service -p "$1" --value; }
[ "$(prop ActiveState)" = active ] || { ct journalctl -u presenced --no-pager >&2; fail "postinst did not start it"; }
# A stop of the process systemd started itself: SIGTERM, a clean exit 0.
ct systemctl stop presenced.service
if [ "$(prop Result)" != success ] || [ "$(prop ExecMainStatus)" != 0 ]; then
  ct journalctl -u presenced --no-pager | tail -n 30 >&2
  fail "stop: result $(prop Result), status $(prop ExecMainStatus)"
fi
ct sed -i 's/^drain_ms = .*/drain_ms = 1000/' /etc/presenced/presenced.toml
ct systemctl start presenced.service || { ct journalctl -u presenced --no-pager >&2; fail "start failed"; }

[ "$(prop ActiveState)" = active ] || { ct journalctl -u presenced --no-pager >&2; fail "not active"; }
pid=$(prop MainPID)
say "active, MainPID $pid"

readyz() {
  for _ in $(seq $((READY_TIMEOUT_S * 5))); do
    if [ "$(ct curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:9090/readyz)" = 200 ]; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}
readyz || fail "/readyz is not 200"

# What the unit's settings did to the process.
status=$(ct cat "/proc/$pid/status")
limits=$(ct cat "/proc/$pid/limits")
uid=$(ct id -u presenced)
grep -q "^Uid:[[:space:]]*${uid}[[:space:]]" <<<"$status" || fail "not running as presenced"
grep -q '^NoNewPrivs:[[:space:]]*1$' <<<"$status" || fail "NoNewPrivileges= not in force"
grep -q '^Seccomp:[[:space:]]*2$' <<<"$status" || fail "no seccomp filter (SystemCallFilter=)"
grep -q '^CapBnd:[[:space:]]*0000000000000000$' <<<"$status" || fail "capabilities left in the bounding set"
# systemd cannot raise a limit above its own hard limit (a sandbox may cap it lower): expect
# the unit's value or that cap, whichever is lower.
expect_limit() { # NAME (as /proc/PID/limits says it) VALUE KEY
  local cap
  cap=$(ct cat /proc/1/limits | sed -n "s/^$1  *[^ ]*  *\([^ ]*\) .*/\1/p")
  local want=$2
  if [ "$cap" != unlimited ] && [ "$cap" -lt "$want" ]; then want=$cap; fi
  grep -q "^$1  *$want  *$want " <<<"$limits" \
    || fail "$3= not in force: $(grep "^$1" <<<"$limits")"
}
expect_limit "Max open files" 1048576 LimitNOFILE
expect_limit "Max locked memory" 67108864 LimitMEMLOCK
[ "$(ct stat -c %U /run/presenced)" = presenced ] || fail "no /run/presenced (RuntimeDirectory=)"
ct test -S /run/presenced/presenced.sock || fail "no control socket at /run/presenced/presenced.sock"
say "hardening in force: NoNewPrivs, seccomp, no capabilities, limits, directories"

token=$(ct sh -c 'set -a; . /etc/presenced/env; presenced token --sub alice')
ws_rc=0
ct curl -sS -i -N --http1.1 --max-time 2 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \
  -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
  "http://127.0.0.1:8080/ws?token=$token" >"$work/ws" 2>/dev/null || ws_rc=$?
[ "$ws_rc" -eq 0 ] || [ "$ws_rc" -eq 28 ] || fail "curl exited $ws_rc"
head -n 1 "$work/ws" | grep -q '^HTTP/1.1 101' || fail "no 101 from the WebSocket endpoint"
say "WebSocket handshake: 101"

# The watchdog: three intervals later, the same process, never restarted.
sleep $((WATCHDOG_S * 3))
if [ "$(prop MainPID)" != "$pid" ] || [ "$(prop NRestarts)" != 0 ]; then
  ct journalctl -u presenced --no-pager >&2
  fail "the watchdog was not fed"
fi
say "watchdog fed for $((WATCHDOG_S * 3))s (WatchdogSec=${WATCHDOG_S}s)"

# The zero-downtime upgrade, as an operator runs it.
say "systemctl reload presenced"
reload_rc=0
ct systemctl reload presenced.service || reload_rc=$?
if [ "$reload_rc" -ne 0 ]; then
  ct journalctl -u presenced --no-pager | tail -n 30 >&2
  fail "systemctl reload exited $reload_rc"
fi
new_pid=$(prop MainPID)
[ "$new_pid" != "$pid" ] || fail "MainPID did not move to the new process"
readyz || fail "/readyz is not 200 after the reload"
# The old process drains (drain_ms = 1000) and exits; the service must stay up on the new one,
# with the watchdog fed by it.
sleep $((WATCHDOG_S * 3))
if [ "$(prop ActiveState)" != active ] || [ "$(prop MainPID)" != "$new_pid" ] \
  || [ "$(prop NRestarts)" != 0 ]; then
  ct journalctl -u presenced --no-pager | tail -n 30 >&2
  fail "after the reload: $(prop ActiveState)/$(prop SubState), MainPID $(prop MainPID), restarts $(prop NRestarts)"
fi
if ct test -d "/proc/$pid"; then fail "the old process $pid is still running after its drain"; fi
say "reloaded: MainPID $pid -> $new_pid, old process gone, still active and fed"

# A stop of the process an upgrade started (systemd did not): the same clean exit.
ct systemctl stop presenced.service
if [ "$(prop Result)" != success ] || [ "$(prop ExecMainStatus)" != 0 ]; then
  ct journalctl -u presenced --no-pager | tail -n 30 >&2
  fail "stop after the upgrade: result $(prop Result), status $(prop ExecMainStatus)"
fi
# journald may take a moment to write the last lines of the stream.
logged=no
for _ in $(seq 25); do
  if ct journalctl -u presenced --no-pager -o cat | grep -q "presenced: stopped"; then
    logged=yes
    break
  fi
  sleep 0.2
done
if [ "$logged" != yes ]; then
  ct journalctl -u presenced --no-pager | tail -n 30 >&2
  fail "the new process did not log its clean stop"
fi
say "stopped: result success, exit 0"

ct dpkg -P presenced >&2 || fail "dpkg -P failed"
ct systemctl poweroff >/dev/null 2>&1 || true
