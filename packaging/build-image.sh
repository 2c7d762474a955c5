#!/usr/bin/env bash
# Builds the presenced container image with podman on a machine that reaches the Debian mirror
# but no container registry: the base (Debian 12 minbase with curl) is made with debootstrap and
# imported, packaging/Containerfile is built on it, and the image is run once to check that it
# serves: /readyz answers 200, the HEALTHCHECK passes, and SIGTERM stops it with exit 0.
#
#   bash packaging/build-image.sh [BINARY]
#
# BINARY defaults to a release build (cargo build --release, in $CARGO_TARGET_DIR or target/).
# Environment: IMAGE (default localhost/presenced:dev), BASE_IMAGE (default
# localhost/presenced-base:bookworm, made once and then reused), MIRROR (default
# http://deb.debian.org/debian), PODMAN_RUN_OPTS (more `podman run` flags for the smoke run,
# e.g. "--runtime runc" where crun refuses the host's cgroups). Needs root; installs podman and
# debootstrap when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/presenced:dev}
BASE_IMAGE=${BASE_IMAGE:-localhost/presenced-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# Bounds on the smoke run's waits, in seconds.
READY_TIMEOUT_S=60
STOP_TIMEOUT_S=30

say() { printf 'build-image: %s\n' "$*" >&2; }
fail() {
  say "FAIL: $*"
  exit 1
}

[ "$(id -u)" -eq 0 ] || fail "needs root (debootstrap, podman)"
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q "${missing[@]}" >&2
fi

bin=${1:-}
if [ -z "$bin" ]; then
  say "cargo build --release"
  cargo build --release --locked --bin presenced >&2
  bin="${CARGO_TARGET_DIR:-target}/release/presenced"
fi
[ -x "$bin" ] || fail "$bin is not an executable"

work=$(mktemp -d /tmp/presenced-image.XXXXXX)
ctr="presenced-smoke-$$"
cleanup() {
  local rc=$?
  podman rm -f -t 0 "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# The base: what `FROM debian:bookworm-slim` would give, made from the mirror, plus curl for
# the HEALTHCHECK (so the build needs no network).
if ! podman image exists "$BASE_IMAGE"; then
  say "debootstrap bookworm (minbase, curl) from $MIRROR"
  debootstrap --variant=minbase --include=curl bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap failed"; }
  rm -rf "$work"/rootfs/var/lib/apt/lists/* "$work"/rootfs/var/cache/apt/archives/*.deb
  say "importing it as $BASE_IMAGE"
  tar -C "$work/rootfs" --numeric-owner -c . \
    | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$work/rootfs"
fi

mkdir "$work/ctx"
cp packaging/Containerfile packaging/presenced.toml "$work/ctx/"
# Without debug info (release builds keep it: [profile.release] debug = 1): 130 MB less.
if command -v strip >/dev/null; then
  strip --strip-debug -o "$work/ctx/presenced" "$bin"
else
  cp "$bin" "$work/ctx/presenced"
fi
say "podman build $IMAGE"
# --isolation=chroot: RUN steps need no OCI runtime and no cgroups (as root).
podman build --isolation=chroot --pull=never --format docker \
  --build-arg "BASE=$BASE_IMAGE" -t "$IMAGE" -f "$work/ctx/Containerfile" "$work/ctx" >&2

# --- smoke run ---------------------------------------------------------------------------
# The limits the Containerfile recommends, lowered to this shell's hard limits (a container
# cannot get more without CAP_SYS_RESOURCE).
nofile=1048576
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$nofile" ]; then nofile=$hard; fi
memlock=67108864
hard=$(ulimit -Hl)
if [ "$hard" != unlimited ] && [ "$((hard * 1024))" -lt "$memlock" ]; then memlock=$((hard * 1024)); fi
# podman's default seccomp profile (containers-common) answers io_uring_setup, io_uring_enter
# and io_uring_register with ENOSYS, and glommio cannot start a shard without them: the run
# uses that profile with those three allowed, and nothing else changed.
default_profile=/usr/share/containers/seccomp.json
[ -f "$default_profile" ] || fail "no $default_profile (containers-common) to derive a seccomp profile from"
python3 - "$default_profile" "$work/seccomp.json" <<'PY'
import json, sys
profile = json.load(open(sys.argv[1]))
profile["syscalls"].append({
    "names": ["io_uring_setup", "io_uring_enter", "io_uring_register"],
    "action": "SCMP_ACT_ALLOW",
})
json.dump(profile, open(sys.argv[2], "w"), indent=1)
PY
# The image's own command and ports, in a network namespace of its own with no interface but
# loopback (--network=none): nothing to publish, no port of the host taken. Probed from inside,
# as the HEALTHCHECK is.
secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
say "podman run $IMAGE (nofile $nofile, memlock $memlock${PODMAN_RUN_OPTS:+, $PODMAN_RUN_OPTS})"
# shellcheck disable=SC2086 # PODMAN_RUN_OPTS is a list of flags
podman run -d --name "$ctr" --network=none -e "PRESENCED_JWT_SECRET=$secret" -e NO_COLOR=1 \
  --security-opt "seccomp=$work/seccomp.json" \
  --ulimit "nofile=$nofile:$nofile" --ulimit "memlock=$memlock:$memlock" ${PODMAN_RUN_OPTS:-} \
  "$IMAGE" >/dev/null
[ "$(podman inspect -f '{{.Config.User}}' "$ctr")" = presenced:presenced ] \
  || fail "the container does not run as presenced"

ready=no
deadline=$((SECONDS + READY_TIMEOUT_S))
while [ "$SECONDS" -lt "$deadline" ]; do
  if [ "$(podman inspect -f '{{.State.Running}}' "$ctr")" != true ]; then
    podman logs "$ctr" >&2 || true
    fail "the container exited during start-up"
  fi
  if [ "$(podman exec "$ctr" curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
    http://127.0.0.1:9090/readyz)" = 200 ]; then
    ready=yes
    break
  fi
  sleep 0.5
done
if [ "$ready" != yes ]; then
  podman logs "$ctr" >&2 || true
  fail "/readyz did not answer 200 within ${READY_TIMEOUT_S}s"
fi
say "/readyz: 200"
podman healthcheck run "$ctr" || fail "the image's HEALTHCHECK fails on a ready server"
say "HEALTHCHECK: healthy"

podman stop -t "$STOP_TIMEOUT_S" "$ctr" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$ctr")
if [ "$code" != 0 ]; then
  podman logs "$ctr" >&2 || true
  fail "the container exited $code after SIGTERM"
fi
say "stopped with exit 0; image $IMAGE ($(podman image inspect -f '{{.Size}}' "$IMAGE") bytes)"
