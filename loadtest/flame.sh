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
# instead records the ramp of 8,000 connections opened as fast as they go (handshakes). Prints
# the server's CPU by what the stacks end in (loadtest/profile.py shares). Needs Debian's
# `linux-perf` and `inferno` (`cargo install inferno`). Loopback only; bounded (a 10 s run
# phase, 8,000 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 3 ] || { echo "usage: $0 SERVER_BINARY FLAPS_PER_SEC|storm OUT.svg" >&2; exit 2; }
BIN=$1 FLAPS=$2 SVG=$3
SAMPLE_S=${SAMPLE_S:-3}
PORT=${PORT:-18700}
OUT=${OUT:-target/flame}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || { echo "inferno not found: cargo install inferno" >&2; exit 1; }
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
fresh_run
start_compare_server "$BIN"
record() { perf record -F "${FREQ:-2999}" --call-graph dwarf,16384 -p "$SPID" -o "$OUT/perf.data" "$@" 2>/dev/null; }
if [ "$FLAPS" = storm ]; then
  record &
  PERF=$!
  sleep 0.5
  harness --json "$OUT/report.json" --scenario storm --connections 8000 --watch 1 \
    --flaps-per-sec 0 --duration 1s --threads 2 > "$OUT/harness.log" 2>&1 || true
  kill -INT $PERF; wait $PERF || true
else
  load_until_run "${CHURN[@]}" --flaps-per-sec "$FLAPS" --duration 10s
  sleep 1
  record -- sleep "$SAMPLE_S"
  wait "$HPID"
fi
stop_server
perf script -i "$OUT/perf.data" 2>/dev/null | inferno-collapse-perf > "$OUT/folded"
# Frames narrower than MINWIDTH pixels (of 1200) are left out, which keeps the SVG small.
inferno-flamegraph --minwidth "${MINWIDTH:-1}" --title "$(basename "$BIN") $FLAPS" \
  < "$OUT/folded" > "$SVG"
echo "$SVG: $(wc -l < "$OUT/folded") stacks"
python3 loadtest/profile.py shares "$OUT/folded"
