#!/usr/bin/env bash
# The .deb end to end, as an SRE gets it: build it with cargo-deb, check its contents, install
# it with dpkg, check what postinst made (the presenced account, the secret file, the state
# directory), verify the installed unit with systemd-analyze, check the shipped config, then
# run the installed binary the way the unit does (as presenced, with the shipped config and
# the env file) and check /readyz and a WebSocket handshake, stop it with SIGTERM (exit 0),
# and remove and purge the package. Every wait is bounded; any failed step fails the script.
#
#   bash packaging/test-deb.sh                      # cargo deb builds a release binary
#   PRESENCED_DEB_BIN=PATH bash packaging/test-deb.sh   # package a binary already built
#
# PRESENCED_DEB_BIN packages that binary as it is (cargo deb --no-build): .ci/run passes the
# debug binary `cargo test` has just built, since a release build costs minutes on a small CI
# machine and this script tests the packaging, not the compiler's optimiser.
#
# Needs root, dpkg and apt-get (Debian). Installs what is missing: cargo-deb (cargo install),
# systemd-analyze (the systemd package, which is not started), curl. Refuses to run where a
# presenced package is already installed, and leaves the machine as it found it: the package
# purged, and the presenced account, /var/lib/presenced and /run/presenced removed when this
# script made them.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
# Bounds on every wait, in seconds.
READY_TIMEOUT_S=60
STOP_TIMEOUT_S=30

say() { printf 'test-deb: %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

[ "$(id -u)" -eq 0 ] || fail "needs root (dpkg -i, useradd, running as the presenced user)"
if ! command -v dpkg >/dev/null || ! command -v apt-get >/dev/null; then
  fail "needs dpkg and apt-get (a Debian system)"
fi
if dpkg-query -W -f '${db:Status-Status}' presenced 2>/dev/null | grep -qv '^not-installed$'; then
  fail "a presenced package is installed here already; this script would replace and purge it"
fi

work=$(mktemp -d /tmp/presenced-test-deb.XXXXXX)
# What existed before, so that cleanup removes only what this run made.
had_user=no; getent passwd presenced >/dev/null && had_user=yes
had_group=no; getent group presenced >/dev/null && had_group=yes
had_state=no; [ -e /var/lib/presenced ] && had_state=yes
had_run=no; [ -e /run/presenced ] && had_run=yes
installed=no
server_pid=
made_policy=no

cleanup() {
  local rc=$?
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "$installed" = yes ]; then
    dpkg -P presenced >/dev/null 2>&1 || say "cleanup: dpkg -P presenced failed"
  fi
  [ "$had_state" = no ] && rm -rf /var/lib/presenced
  [ "$had_run" = no ] && rm -rf /run/presenced
  if [ "$had_user" = no ] && getent passwd presenced >/dev/null; then
    userdel presenced || say "cleanup: userdel presenced failed"
  fi
  if [ "$had_group" = no ] && getent group presenced >/dev/null; then
    groupdel presenced || say "cleanup: groupdel presenced failed"
  fi
  [ "$made_policy" = yes ] && rm -f /usr/sbin/policy-rc.d
  rm -rf "$work"
  if [ "$rc" -eq 0 ]; then say "OK"; else say "failed (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

# --- tools -------------------------------------------------------------------------------
# The packaging's shell scripts (CI has shellcheck; skipped where it is not installed).
if command -v shellcheck >/dev/null; then
  shellcheck packaging/test-deb.sh packaging/build-image.sh packaging/debian/postinst \
    packaging/debian/prerm packaging/debian/postrm || fail "shellcheck"
else
  say "shellcheck not installed; skipped"
fi
apt_install() {
  say "installing $* with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends "$@" >&2
}
command -v systemd-analyze >/dev/null || apt_install systemd
command -v curl >/dev/null || apt_install curl ca-certificates
# cargo-deb: dpkg-shlibdeps for the Depends: line ($auto), strip and objcopy for debug info.
command -v dpkg-shlibdeps >/dev/null || apt_install dpkg-dev
command -v objcopy >/dev/null || apt_install binutils
# Any 3.x has the flags used below (--no-build, --strip, --no-dbgsym, --fast, -o).
have_cargo_deb=$(cargo deb --version 2>/dev/null | awk '{print $2}' || true)
if [ "${have_cargo_deb%%.*}" != 3 ]; then
  say "installing cargo-deb $CARGO_DEB_VERSION (found: ${have_cargo_deb:-none})"
  # Its own target dir: nothing of it lands in the project's.
  CARGO_TARGET_DIR="$work/cargo-deb-build" \
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi

# --- build -------------------------------------------------------------------------------
if [ -n "${PRESENCED_DEB_BIN:-}" ]; then
  [ -x "$PRESENCED_DEB_BIN" ] || fail "PRESENCED_DEB_BIN=$PRESENCED_DEB_BIN is not an executable"
  say "packaging $PRESENCED_DEB_BIN (cargo deb --no-build)"
  # cargo-deb takes the binary from <target dir>/release/; a scratch one keeps the copy out of
  # the real target dir, where cargo would take it for its own release build.
  mkdir -p "$work/target/release"
  cp "$PRESENCED_DEB_BIN" "$work/target/release/presenced"
  # Stripped, no dbgsym package, light compression: seconds instead of a minute of xz.
  CARGO_TARGET_DIR="$work/target" cargo deb --no-build --strip --no-dbgsym --fast -o "$work/" >&2
else
  say "building the package (cargo deb: a release build)"
  cargo deb --locked -o "$work/" >&2
fi
debs=("$work"/presenced_*.deb)
if [ "${#debs[@]}" -ne 1 ] || [ ! -f "${debs[0]}" ]; then
  fail "expected one .deb in $work: ${debs[*]}"
fi
deb=${debs[0]}
say "built $(basename "$deb") ($(du -h "$deb" | cut -f1))"

# --- contents ----------------------------------------------------------------------------
dpkg-deb --contents "$deb" | awk '{print $NF}' >"$work/contents"
for path in ./usr/bin/presenced ./lib/systemd/system/presenced.service \
  ./etc/presenced/presenced.toml ./usr/share/doc/presenced/README.md \
  ./usr/share/doc/presenced/OPERATIONS.md ./usr/share/doc/presenced/CONFIG.md; do
  grep -qxF "$path" "$work/contents" || fail "the package lacks $path"
done
dpkg-deb --ctrl-tarfile "$deb" | tar -x -C "$work" ./conffiles ./postinst ./prerm ./postrm \
  || fail "the package lacks its conffiles or maintainer scripts"
grep -qxF /etc/presenced/presenced.toml "$work/conffiles" \
  || fail "/etc/presenced/presenced.toml is not a conffile"
depends=$(dpkg-deb --field "$deb" Depends)
case "$depends" in
  *libc6*passwd* | *passwd*libc6*) ;;
  *) fail "Depends: $depends (want libc6, from \$auto, and passwd)" ;;
esac
# No secret ships in the package: the env file is made by postinst.
if grep -q '^\./etc/presenced/env$' "$work/contents"; then
  fail "the package ships /etc/presenced/env"
fi

# --- install -----------------------------------------------------------------------------
# Where systemd runs, postinst would start the service on ports this test does not control:
# policy-rc.d (exit 101: "not allowed"), which deb-systemd-invoke obeys, keeps it stopped.
if [ -d /run/systemd/system ] && [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 755 /usr/sbin/policy-rc.d
  made_policy=yes
fi
say "dpkg -i"
installed=yes
dpkg -i "$deb" >&2 || fail "dpkg -i failed"
[ -x /usr/bin/presenced ] || fail "/usr/bin/presenced is not installed"
getent passwd presenced >/dev/null || fail "postinst made no presenced user"
getent group presenced >/dev/null || fail "postinst made no presenced group"
[ "$(id -gn presenced)" = presenced ] || fail "presenced's primary group is $(id -gn presenced)"
case "$(getent passwd presenced | cut -d: -f7)" in
  */nologin | */false) ;;
  *) fail "the presenced account has a login shell" ;;
esac
[ "$(stat -c '%U:%G %a' /var/lib/presenced)" = "presenced:presenced 750" ] \
  || fail "/var/lib/presenced: $(stat -c '%U:%G %a' /var/lib/presenced), want presenced:presenced 750"
[ "$(stat -c '%U %a' /etc/presenced/env)" = "root 600" ] \
  || fail "/etc/presenced/env: $(stat -c '%U %a' /etc/presenced/env), want root 600"
secret=$(sed -n 's/^PRESENCED_JWT_SECRET=//p' /etc/presenced/env)
[[ "$secret" =~ ^[0-9a-f]{64}$ ]] || fail "/etc/presenced/env holds no generated secret"

# --- the unit ----------------------------------------------------------------------------
# verify resolves ExecStart= against the installed binary, so it runs after dpkg -i. Any line
# naming our unit is a finding (unknown keys are only warnings to systemd); lines about other
# units are printed, not judged.
say "systemd-analyze verify"
verify_rc=0
systemd-analyze verify /lib/systemd/system/presenced.service >"$work/verify" 2>&1 || verify_rc=$?
cat "$work/verify" >&2
[ "$verify_rc" -eq 0 ] || fail "systemd-analyze verify exited $verify_rc"
if grep -q 'presenced\.service' "$work/verify"; then
  fail "systemd-analyze verify reports problems in presenced.service"
fi

# --- the config --------------------------------------------------------------------------
say "check-config"
/usr/bin/presenced check-config --config /etc/presenced/presenced.toml >"$work/effective" \
  2>"$work/check-config.err" || { cat "$work/check-config.err" >&2; fail "check-config failed"; }
# With the env file, as the unit runs it: no warning about a missing key.
PRESENCED_JWT_SECRET=$secret /usr/bin/presenced check-config \
  --config /etc/presenced/presenced.toml >/dev/null 2>"$work/check-config.err" \
  || { cat "$work/check-config.err" >&2; fail "check-config with the env file failed"; }
[ ! -s "$work/check-config.err" ] \
  || { cat "$work/check-config.err" >&2; fail "check-config warns with the env file"; }
grep -qx 'listen = "0.0.0.0:8080"' "$work/effective" || fail "the shipped listen address changed"

# --- run it as the unit would --------------------------------------------------------------
# Without systemd: RuntimeDirectory= is made by hand, EnvironmentFile= is read by this shell,
# User=/Group=, UMask=, LimitNOFILE= and NoNewPrivileges= are applied with setpriv and ulimit.
# Port 0: the kernel picks free ports, read back from the log.
install -d -o presenced -g presenced -m 0750 /run/presenced
say "starting /usr/bin/presenced serve as presenced"
# Made here, not by the background job's redirection, so the loop below can read it at once.
: >"$work/serve.log"
(
  cd /
  umask 0027
  ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin NO_COLOR=1 PRESENCED_JWT_SECRET="$secret" \
    setpriv --reuid=presenced --regid=presenced --init-groups --no-new-privs -- \
    /usr/bin/presenced serve --config /etc/presenced/presenced.toml \
    --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
) >"$work/serve.log" 2>&1 &
server_pid=$!

addr=
admin=
ready=no
deadline=$((SECONDS + READY_TIMEOUT_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    cat "$work/serve.log" >&2
    fail "the server exited during start-up"
  fi
  addr=$(sed -n 's/.*accepting WebSocket connections.* addr=\([0-9.]*:[0-9]*\).*/\1/p' \
    "$work/serve.log" | head -n 1)
  admin=$(sed -n 's/.*admin port.* admin=\([0-9.]*:[0-9]*\).*/\1/p' "$work/serve.log" | head -n 1)
  if [ -n "$addr" ] && [ -n "$admin" ] \
    && [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$admin/readyz")" = 200 ]; then
    ready=yes
    break
  fi
  sleep 0.2
done
[ "$ready" = yes ] || { cat "$work/serve.log" >&2; fail "/readyz did not answer 200 within ${READY_TIMEOUT_S}s"; }
say "ready: WebSocket on $addr, admin on $admin"

[ "$(ps -o user= -p "$server_pid" | tr -d ' ')" = presenced ] \
  || fail "the server does not run as presenced"
# The history store went where the shipped config says, owned by the service's account.
[ -z "$(find /var/lib/presenced -mindepth 1 ! -user presenced -print -quit)" ] \
  || fail "/var/lib/presenced holds files not owned by presenced"
[ -n "$(find /var/lib/presenced -mindepth 1 -print -quit)" ] \
  || fail "nothing was written to /var/lib/presenced (history.data_dir)"

# A WebSocket handshake with a token minted from the env file's secret: 101, the accept key of
# RFC 6455's example, and the welcome message naming alice. curl holds the upgraded
# connection open until --max-time (exit 28), which is expected.
token=$(PRESENCED_JWT_SECRET=$secret /usr/bin/presenced token --sub alice)
ws_rc=0
curl -sS -i -N --http1.1 --max-time 3 \
  -H 'Connection: Upgrade' -H 'Upgrade: websocket' -H 'Sec-WebSocket-Version: 13' \
  -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' \
  "http://$addr/ws?token=$token" >"$work/ws" 2>"$work/ws.err" || ws_rc=$?
[ "$ws_rc" -eq 0 ] || [ "$ws_rc" -eq 28 ] || { cat "$work/ws.err" >&2; fail "curl exited $ws_rc"; }
head -n 1 "$work/ws" | grep -q '^HTTP/1.1 101' \
  || { head -n 20 "$work/ws" >&2; fail "the WebSocket handshake did not answer 101"; }
grep -qai '^sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=' "$work/ws" \
  || fail "wrong or missing Sec-WebSocket-Accept"
if ! grep -qa '"type":"welcome"' "$work/ws" || ! grep -qa '"user":"alice"' "$work/ws"; then
  fail "no welcome message for alice after the handshake"
fi
say "WebSocket handshake: 101 and welcome for alice"

# --- stop --------------------------------------------------------------------------------
say "SIGTERM"
kill -TERM "$server_pid"
deadline=$((SECONDS + STOP_TIMEOUT_S))
while kill -0 "$server_pid" 2>/dev/null && [ "$SECONDS" -lt "$deadline" ]; do
  sleep 0.2
done
if kill -0 "$server_pid" 2>/dev/null; then
  cat "$work/serve.log" >&2
  fail "the server did not exit within ${STOP_TIMEOUT_S}s of SIGTERM"
fi
serve_rc=0
wait "$server_pid" || serve_rc=$?
server_pid=
[ "$serve_rc" -eq 0 ] || { cat "$work/serve.log" >&2; fail "the server exited $serve_rc after SIGTERM"; }

# --- remove, purge -----------------------------------------------------------------------
say "dpkg -r, dpkg -P"
dpkg -r presenced >&2 || fail "dpkg -r failed"
[ ! -e /usr/bin/presenced ] || fail "dpkg -r left /usr/bin/presenced"
[ -f /etc/presenced/presenced.toml ] || fail "dpkg -r removed the conffile (only purge may)"
dpkg -P presenced >&2 || fail "dpkg -P failed"
installed=no
[ ! -e /etc/presenced ] || fail "dpkg -P left /etc/presenced: $(ls -A /etc/presenced)"
