#!/usr/bin/env bash
# The server's cost, two builds side by side (docs/BENCHMARKS.md, "Issue 14"). Every figure comes from `presenced-loadtest --server-bin A
# --compare-bin B`, which reads each server's CPU time (user and kernel, all threads) and RSS
# from /proc over the measured phase; each step runs ROUNDS rounds, alternating the order, and
# prints medians and B / A.
#
#   loadtest/cost-bench.sh OLD_BINARY NEW_BINARY
#   ROUNDS=3 STEPS="200 800" loadtest/cost-bench.sh old/presenced target/release/presenced
#
# Steps: 4,000 connections each watching 10 users (ring), a quarter of them flapping, at STEPS
# flaps/s (x 10 deliveries each: 200 = 2,000 deliveries/s); 4,000 idle connections watching 20
# users each, with the default 25 s heartbeat (CPU share of a core) and with a 3 s heartbeat
# after a sweep (RSS per connection in steady state); 8,000 connections as fast as they go
# (handshakes), plain and over TLS (OTHER picks among these: "idle idle-memory handshakes
# handshakes-tls"; the TLS step needs `openssl`). Loopback only; every run is bounded
# (IDLE_S/RUN_S run phases, 8,000 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }
A=$1 B=$2
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS-"200 800 1600 4000 8000"}
OTHER=${OTHER-"idle idle-memory handshakes handshakes-tls"}
RUN_S=${RUN_S:-10}
IDLE_S=${IDLE_S:-10}
PORT=${PORT:-18700}
OUT=${OUT:-target/cost-bench}
mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh # SECRET, the one loadtest/compare.toml holds
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"
SERVE="serve --config loadtest/compare.toml --data-dir {dir} --listen 127.0.0.1:$PORT --shards 2 --placement unbound --no-admin"
cmp() {
  local name=$1 extra=$2
  shift 2
  echo "== $name"
  target/release/presenced-loadtest --quiet --server-bin "$A" --compare-bin "$B" --rounds "$ROUNDS" \
    --server-args "$SERVE $extra" --url "${URL:-ws://127.0.0.1:$PORT/ws}" \
    --secret "$SECRET" --compare-dir "$OUT/$name" --json "$OUT/$name.json" "$@"
}
for f in $STEPS; do
  cmp "churn-$f" "" --scenario churn --connections 4000 --watch 10 --flap-fraction 0.25 \
    --flaps-per-sec "$f" --duration "${RUN_S}s" --rate 4000 --verify
done
for step in $OTHER; do
  case $step in
    idle)
      cmp idle "" --scenario idle --connections 4000 --watch 20 --duration "${IDLE_S}s" --rate 4000 ;;
    idle-memory)
      cmp idle-memory "--heartbeat-ms 3000" --scenario idle --connections 4000 --watch 20 \
        --duration "${IDLE_S}s" --rate 4000 ;;
    handshakes)
      cmp handshakes "" --scenario storm --connections 8000 --watch 1 --flaps-per-sec 0 \
        --duration 1s --threads 2 ;;
    handshakes-tls)
      # The same over TLS (TLS 1.3, ECDSA P-256, a certificate made here): the server's
      # listener is TLS only, and the fleet trusts that certificate alone.
      mkdir -p "$OUT/tls"
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
        -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
        -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
        -keyout "$OUT/tls/key.pem" -out "$OUT/tls/cert.pem" 2> /dev/null
      { cat loadtest/compare.toml
        printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$PWD/$OUT/tls/cert.pem" "$PWD/$OUT/tls/key.pem"
      } > "$OUT/tls/server.toml"
      SERVE=${SERVE/loadtest\/compare.toml/$OUT\/tls\/server.toml} URL="wss://localhost:$PORT/ws" \
        cmp handshakes-tls "" --scenario storm --connections 8000 --watch 1 --flaps-per-sec 0 \
        --duration 1s --threads 2 --ca-file "$OUT/tls/cert.pem" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
