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
SECRET=bench-secret-0123456789abcdef
LOAD=target/release/presenced-loadtest
TCK=$(getconf CLK_TCK)
mkdir -p "$OUT"
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"
cat > "$OUT/server.toml" <<TOML
jwt_secret = "$SECRET"
heartbeat_ms = 3000
[limits]
handshake_rate_per_ip = 0
ops_per_second = 0
max_sessions_per_user = 0
[history]
data_dir = "$OUT/data"
TOML
SPID=""
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null; true; }
trap cleanup EXIT
start() { # $1 = binary
  rm -rf "$OUT/data"
  "$1" serve --config "$OUT/server.toml" --listen "127.0.0.1:$PORT" --shards 2 \
    --placement unbound --no-admin > "$OUT/server.log" 2>&1 &
  SPID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0; sleep 0.05; done
  echo "server did not start" >&2; exit 1
}
stop() { kill "$SPID"; wait "$SPID" 2>/dev/null || true; SPID=""; sleep 1; }
ticks() { awk -v f="$1" '{print (f == "user" ? $14 : $14 + $15)}' "/proc/$SPID/stat"; }
get() { "$LOAD" get "$1" "$2"; }

for round in $(seq "$ROUNDS"); do
  for which in old new; do
    bin=$OLD; [ "$which" = new ] && bin=$NEW
    for rate in $RATES; do
      start "$bin"
      r="$OUT/churn-$which-$rate-$round.json" pf="$OUT/phase"
      rm -f "$pf"
      "$LOAD" --url "ws://127.0.0.1:$PORT/ws" --secret "$SECRET" --quiet --json "$r" \
        --scenario churn --connections 4000 --watch 20 --flap-fraction 0.25 \
        --flaps-per-sec "$rate" --duration 8s --rate 4000 --verify --phase-file "$pf" \
        > /dev/null 2>&1 &
      lpid=$! t0="" u0="" t1="" u1=""
      while kill -0 "$lpid" 2>/dev/null; do
        ph=$(cat "$pf" 2>/dev/null || true)
        if [ -z "$t0" ] && [ -n "$ph" ] && [ "$ph" != ramp ]; then t0=$(ticks all); u0=$(ticks user); fi
        if [ -z "$t1" ] && [ "$ph" = done ]; then t1=$(ticks all); u1=$(ticks user); fi
        sleep 0.01
      done
      wait "$lpid" || true
      awk -v w="$which" -v n="$round" -v r="$rate" -v t=$((t1 - t0)) -v u=$((u1 - u0)) \
        -v d="$(get "$r" deliveries)" -v k="$TCK" -v p="$(get "$r" fanout_latency_us.p99)" \
        -v s="$(get "$r" deliveries_per_sec)" -v v="$(get "$r" verify.passed)" \
        'BEGIN { printf "%s round %d, %d flaps/s: %.0f deliveries/s, p99 %d us, %.2f us server CPU per delivery (%.2f user), verify %s\n", w, n, r, s, p, t/k*1e6/d, u/k*1e6/d, v }'
      stop
    done
    start "$bin"
    t0=$(ticks all)
    r="$OUT/handshakes-$which-$round.json"
    "$LOAD" --url "ws://127.0.0.1:$PORT/ws" --secret "$SECRET" --quiet --json "$r" \
      --scenario storm --connections 8000 --watch 1 --flaps-per-sec 0 --duration 1s --threads 2 \
      > /dev/null 2>&1 || true
    t1=$(ticks all)
    awk -v w="$which" -v n="$round" -v c="$(get "$r" connections_established)" \
      -v h="$(get "$r" handshakes_per_sec)" -v t=$((t1 - t0)) -v k="$TCK" \
      'BEGIN { printf "%s round %d, handshakes: %d connections, %.0f/s, %.1f us server CPU each\n", w, n, c, h, t/k*1e6/c }'
    stop
  done
done
