#!/usr/bin/env bash
# The server's live heap per idle connection, by the code that allocated it (docs/BENCHMARKS.md
# "Issue 14"): the server runs under `heaptrack`, 4,000 connections each watching 20 users stay
# idle with a 3 s heartbeat (so the sweep gives back set-up buffers), and the server is killed
# 9 s into the idle phase, so what is still allocated is what the connections hold.
#
#   loadtest/heap.sh SERVER_BINARY
#
# Needs Debian's `heaptrack`. Loopback only; bounded (4,000 connections, a 12 s idle phase).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 1 ] || { echo "usage: $0 SERVER_BINARY" >&2; exit 2; }
BIN=$(realpath "$1")
CONNS=4000
PORT=${PORT:-18700}
OUT=${OUT:-target/heap}
command -v heaptrack >/dev/null || { echo "heaptrack not found: apt-get install heaptrack" >&2; exit 1; }
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
fresh_run
LAUNCH="heaptrack -o $OUT/ht" start_compare_server "$BIN" --heartbeat-ms 3000
load_until_run --scenario idle --connections "$CONNS" --watch 20 --duration 12s --rate 4000
sleep 9
kill -9 "$SPID"
SPID=""
wait "$HPID" || true
sleep 2 # heaptrack writes out what it has
heaptrack_print -f "$OUT/ht.zst" --print-leaks 0 --print-peaks 0 --print-allocators 0 \
  --print-temporary 0 --print-histogram 0 -F "$OUT/leaked.folded" \
  --flamegraph-cost-type leaked > /dev/null
python3 loadtest/profile.py heap "$OUT/leaked.folded" "$CONNS"
