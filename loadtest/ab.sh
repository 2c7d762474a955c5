#!/usr/bin/env bash
# Two server builds side by side, with this tree's harness, alternating, a fresh server each time
# (the machine is shared and noisy: compare within one run). For each round and build:
#   - server CPU per delivery over the run phase of the bench's churn step (4,000 connections
#     watching 20 users each, a quarter flapping at RATES flaps/s each in turn), and its p99;
#   - handshakes/s and server CPU per connection for 8,000 connections as fast as they go.
#
#   loadtest/ab.sh OLD_BINARY NEW_BINARY          # e.g. a release build of the previous commit
#   ROUNDS=3 RATES="4000 8000" loadtest/ab.sh old/presenced target/release/presenced
#
# Loopback only; every run is bounded (8 s run phases, 8,000 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
OLD=$1 NEW=$2
ROUNDS=${ROUNDS:-3}
RATES=${RATES:-"4000 8000"}
PORT=${PORT:-18600}
OUT=${OUT:-target/ab}
mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"
write_server_toml
start() { start_server "$1" "$OUT/server.log" --shards 2 --placement unbound --no-admin; }
stop() { stop_server; sleep 1; }

for round in $(seq "$ROUNDS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    for rate in $RATES; do
      start "$bin"
      r="$OUT/churn-$which-$rate-$round.json" pf="$OUT/phase"
      rm -f "$pf"
      harness --json "$r" --scenario churn --connections 4000 --watch 20 --flap-fraction 0.25 \
        --flaps-per-sec "$rate" --duration 8s --rate 4000 --verify --phase-file "$pf" \
        > /dev/null 2>&1 &
      run_phase_ticks $! "$pf"
      d=$(get "$r" deliveries || true)
      awk -v w="$which" -v n="$round" -v r="$rate" -v p="$(get "$r" fanout_latency_us.p99)" \
        -v s="$(get "$r" deliveries_per_sec)" -v v="$(get "$r" verify.passed)" \
        -v c="$(us_per "$RUN_TICKS" "$d")" -v u="$(us_per "$RUN_USER_TICKS" "$d")" \
        'BEGIN { printf "%s round %d, %d flaps/s: %.0f deliveries/s, p99 %d us, %s us server CPU per delivery (%s user), verify %s\n", w, n, r, s, p, c, u, v }'
      stop
    done
    start "$bin"
    t0=$(ticks all)
    r="$OUT/handshakes-$which-$round.json"
    harness --json "$r" --scenario storm --connections 8000 --watch 1 --flaps-per-sec 0 \
      --duration 1s --threads 2 > /dev/null 2>&1 || true
    t1=$(ticks all)
    c=$(get "$r" connections_established || true)
    awk -v w="$which" -v n="$round" -v c="$c" -v h="$(get "$r" handshakes_per_sec)" \
      -v e="$(us_per $((t1 - t0)) "$c")" \
      'BEGIN { printf "%s round %d, handshakes: %d connections, %.0f/s, %.1f us server CPU each\n", w, n, c, h, e }'
    stop
  done
done
