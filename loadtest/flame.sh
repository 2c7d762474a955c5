#!/usr/bin/env bash
# A flame graph of a server under the churn scenario (docs/perf/, docs/BENCHMARKS.md "Issue 14").
#
#   loadtest/flame.sh SERVER_BINARY FLAPS_PER_SEC OUT.svg
#   loadtest/flame.sh target/release/presenced 200 docs/perf/churn-2k-after.svg
#
# Starts the server (loadtest/compare.toml, 2 unpinned shards), runs 4,000 connections watching
# 10 users each with a quarter of them flapping at FLAPS_PER_SEC (x 10 = deliveries/s), and
# records every server thread with `perf record --call-graph dwarf` at FREQ (2999) samples a
# second for SAMPLE_S (3) seconds of the run phase, from 1 s into it. FLAPS_PER_SEC=storm
# instead records the ramp of 8,000 connections opened as fast as they go (handshakes). Needs
# Debian's `linux-perf` and `inferno` (`cargo install inferno`). Loopback only; bounded (a 10 s
# run phase, 8,000 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 SERVER_BINARY FLAPS_PER_SEC|storm OUT.svg" >&2; exit 2; }
BIN=$1 FLAPS=$2 SVG=$3
SAMPLE_S=${SAMPLE_S:-3}
PORT=${PORT:-18700}
OUT=${OUT:-target/flame}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || { echo "inferno not found: cargo install inferno" >&2; exit 1; }
rm -rf "$OUT" && mkdir -p "$OUT"
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"
"$BIN" serve --config loadtest/compare.toml --data-dir "$OUT/data" --listen "127.0.0.1:$PORT" \
  --shards 2 --placement unbound --no-admin > "$OUT/server.log" 2>&1 &
SPID=$!
trap 'kill $SPID 2>/dev/null || true' EXIT
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
H=(target/release/presenced-loadtest --quiet --url "ws://127.0.0.1:$PORT/ws"
   --secret bench-secret-0123456789abcdef --phase-file "$OUT/phase" --json "$OUT/report.json")
if [ "$FLAPS" = storm ]; then
  perf record -F "${FREQ:-2999}" --call-graph dwarf,16384 -p "$SPID" -o "$OUT/perf.data" 2>/dev/null &
  PERF=$!
  sleep 0.5
  "${H[@]}" --scenario storm --connections 8000 --watch 1 --flaps-per-sec 0 --duration 1s \
    --threads 2 > "$OUT/harness.log" 2>&1 || true
  kill -INT $PERF; wait $PERF || true
else
  "${H[@]}" --scenario churn --connections 4000 --watch 10 --flap-fraction 0.25 \
    --flaps-per-sec "$FLAPS" --duration 10s --rate 4000 > "$OUT/harness.log" 2>&1 &
  HP=$!
  while [ "$(cat "$OUT/phase" 2>/dev/null)" != run ]; do sleep 0.05; done
  sleep 1
  perf record -F "${FREQ:-2999}" --call-graph dwarf,16384 -p "$SPID" -o "$OUT/perf.data" -- sleep "$SAMPLE_S" 2>/dev/null
  wait $HP
fi
perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf > "$OUT/folded"
# Frames narrower than MINWIDTH pixels (of 1200) are left out, which keeps the SVG small.
inferno-flamegraph --minwidth "${MINWIDTH:-1}" --title "$(basename "$BIN") $FLAPS" \
  < "$OUT/folded" > "$SVG"
echo "$SVG: $(wc -l < "$OUT/folded") stacks"
