#!/usr/bin/env bash
# The server's system calls and io_uring submissions per second under the churn scenario
# (docs/BENCHMARKS.md "Issue 14"): `perf trace -s` for 2 s, then `perf record -e
# io_uring:io_uring_submit_req` for 2 s, from 1 s into the run phase.
#
#   loadtest/syscalls.sh SERVER_BINARY FLAPS_PER_SEC      # 200 = 2,000 deliveries/s
#
# Needs Debian's `linux-perf`. Loopback only; bounded (an 8 s run phase, 4,000 connections).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: $0 SERVER_BINARY FLAPS_PER_SEC" >&2; exit 2; }
BIN=$1 FLAPS=$2
PORT=${PORT:-18700}
OUT=${OUT:-target/syscalls}
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
fresh_run
start_compare_server "$BIN"
load_until_run "${CHURN[@]}" --flaps-per-sec "$FLAPS" --duration 8s
sleep 1
perf trace -s -p "$SPID" -o "$OUT/trace.txt" -- sleep 2 2>/dev/null
perf record -e io_uring:io_uring_submit_req -p "$SPID" -o "$OUT/uring.data" -- sleep 2 2>/dev/null > /dev/null
wait "$HPID"
stop_server
echo "system calls per second, all threads"
awk '/^   [a-z_0-9]+ +[0-9]+/ { c[$1] += $2 } END { for (k in c) printf "  %-16s %8.0f\n", k, c[k] / 2 }' \
  "$OUT/trace.txt" | sort -k2 -rn
echo "io_uring submissions per second"
perf script -i "$OUT/uring.data" 2>/dev/null | grep -o "opcode [A-Z_]*" | sort | uniq -c |
  sort -rn | awk '{ printf "  %-16s %8.0f\n", $3, $1 / 2 }'
