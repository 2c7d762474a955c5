#!/usr/bin/env bash
# Standard performance runs for docs/BENCHMARKS.md: builds release binaries, starts presenced,
# drives it with presenced-loadtest, reads the server's CPU time and memory from /proc, and
# prints a Markdown table. Loopback only; every run is bounded.
#
#   loadtest/bench.sh                 # everything (about 5 minutes on 2 cores)
#   IDLE_CONNS=15000 SHARDS=2 loadtest/bench.sh
#   SERVER=/path/to/old/presenced OUT=target/bench-old loadtest/bench.sh   # another build, same harness
#
# Knobs (environment): SHARDS (2), PLACEMENT (unbound), IDLE_CONNS (15000), WATCH (20),
# LOAD_CONNS (4000), RUN_S (8), HANDSHAKE_CONNS (8000), PORT (18400), OUT (target/bench),
# SERVER (target/release/presenced: the server binary measured; the harness is always this tree's).
# Server settings and where history goes: loadtest/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARDS=${SHARDS:-2}
PLACEMENT=${PLACEMENT:-unbound}
IDLE_CONNS=${IDLE_CONNS:-15000}
WATCH=${WATCH:-20}
LOAD_CONNS=${LOAD_CONNS:-4000}
RUN_S=${RUN_S:-8}
HANDSHAKE_CONNS=${HANDSHAKE_CONNS:-8000}
PORT=${PORT:-18400}
OUT=${OUT:-target/bench}
SERVER=${SERVER:-target/release/presenced}
PAGE=$(getconf PAGESIZE)

mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
cargo build --release -q -p presenced -p presenced-loadtest

ulimit -n "$(ulimit -Hn)"
write_server_toml

start_server_shards() { # $1 = shards
  start_server "$SERVER" "$OUT/server-$1.log" --shards "$1" --placement "$PLACEMENT"
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$SPID/status"; }
anon_kb() { awk '/^RssAnon/ {print $2}' "/proc/$SPID/status"; }
sock_pages() { awk '/^TCP:/ {for (i = 1; i < NF; i++) if ($i == "mem") print $(i + 1)}' /proc/net/sockstat; }
# TCP socket objects themselves live in slab caches, which sockstat's "mem" (buffer pages) omits.
tcp_slab_bytes() { awk '$1 == "TCP" || $1 == "TCPv6" {b += $3 * $4} END {print b + 0}' /proc/slabinfo 2>/dev/null || echo 0; }
fds() { ls "/proc/$SPID/fd" | wc -l; }
load() { # $1 = report name, rest = flags
  local name=$1; shift
  harness --json "$OUT/$name.json" "$@" > "$OUT/$name.txt"
}
# The harness in the background, with the server's CPU ticks over its run phase only (see
# run_phase_ticks). $1 = report name, rest = flags. Sets RUN_TICKS and RUN_USER_TICKS.
load_timed() {
  local name=$1; shift
  local pf="$OUT/$name.phase"
  rm -f "$pf"
  load "$name" --phase-file "$pf" "$@" &
  run_phase_ticks $! "$pf"
}

echo "## presenced benchmarks — $(date -u +%Y-%m-%d), $(nproc) CPUs: $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo
echo "server: $SHARDS shard(s), placement $PLACEMENT; client and server share this machine."
echo

# 1. Memory per idle connection with $WATCH subscriptions.
start_server_shards "$SHARDS"
sleep 0.5
base_rss=$(rss_kb); base_anon=$(anon_kb); base_sock=$(sock_pages); base_fds=$(fds)
base_slab=$(tcp_slab_bytes)
load idle --scenario idle --connections "$IDLE_CONNS" --watch "$WATCH" --rate 4000 --duration 40s \
  --threads 2 &
LPID=$!
for _ in $(seq 600); do
  [ "$(fds)" -ge $((base_fds + IDLE_CONNS)) ] && break
  sleep 0.1
done
sleep 7 # two heartbeats
held=$(( $(fds) - base_fds ))
rss=$(rss_kb); anon=$(anon_kb); sock=$(sock_pages); slab=$(tcp_slab_bytes)
kill "$LPID" 2>/dev/null; wait "$LPID" 2>/dev/null || true
mem_rss=$(awk -v a="$rss" -v b="$base_rss" -v n="$held" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
mem_anon=$(awk -v a="$anon" -v b="$base_anon" -v n="$held" 'BEGIN { printf "%.0f", (a - b) * 1024 / n }')
mem_sock=$(awk -v a="$sock" -v b="$base_sock" -v n="$held" -v p="$PAGE" 'BEGIN { printf "%.0f", (a - b) * p / n }')
mem_slab=$(awk -v a="$slab" -v b="$base_slab" -v n="$held" 'BEGIN { printf "%.0f", (a - b) / n }')
echo "| 1 | server user-space memory per idle connection ($WATCH subscriptions, $held connections held, after two heartbeats) | $mem_rss B RSS ($mem_anon B anonymous) |"
echo "| 1 | kernel memory per loopback connection pair (client + server socket), reported separately | $mem_slab B TCP slab + $mem_sock B socket buffers (/proc/slabinfo, /proc/net/sockstat) |"

# 2 + 5. Deliveries/s and server CPU per delivery while stepping the flap rate up, for 1 and N shards.
step_rates() { # $1 = shards; prints "rate deliveries/s p99_us cpu_us/delivery client_cpu_s verify user_us/delivery"
  start_server_shards "$1"
  for rate in 250 500 1000 2000 4000 8000; do
    load_timed "churn-$1-$rate" --scenario churn --connections "$LOAD_CONNS" --watch "$WATCH" \
      --flap-fraction 0.25 --flaps-per-sec "$rate" --duration "${RUN_S}s" --rate 4000 --verify
    r="$OUT/churn-$1-$rate.json"
    d=$(get "$r" deliveries)
    echo "$rate $(get "$r" deliveries_per_sec) $(get "$r" fanout_latency_us.p99) $(us_per "$RUN_TICKS" "$d") $(get "$r" client_cpu_s) $(get "$r" verify.passed) $(us_per "$RUN_USER_TICKS" "$d")"
  done
}
step_rates "$SHARDS" > "$OUT/steps-$SHARDS.txt"
# The best step with p99 ≤ 10 ms; if none qualifies, the lowest step (and say so).
best=$(awk '$3 <= 10000 && $2 > m { m = $2; line = $0 } END { print line }' "$OUT/steps-$SHARDS.txt")
note=""
if [ -z "$best" ]; then best=$(head -1 "$OUT/steps-$SHARDS.txt"); note=" (no step met p99 ≤ 10 ms)"; fi
read -r best_rate best_dps best_p99 best_cpu best_client best_ok best_user <<< "$best"
echo "| 2 | server CPU per delivered event, run phase only (at $best_rate flaps/s) | $best_cpu µs in all ($best_user µs user space, the rest kernel: loopback TCP for both ends) |"
echo "| 2 | max deliveries/s with p99 fan-out ≤ 10 ms$note | $(printf %.0f "$best_dps")/s (p99 $best_p99 µs; verify $best_ok; client CPU $best_client s over ${RUN_S} s) |"

# 3. Latency at half of that rate.
half=$((best_rate / 2))
load "latency-half" --scenario churn --connections "$LOAD_CONNS" --watch "$WATCH" \
  --flap-fraction 0.25 --flaps-per-sec "$half" --duration "${RUN_S}s" --rate 4000 || true
r="$OUT/latency-half.json"
echo "| 3 | fan-out latency at $half flaps/s ($(printf %.0f "$(get "$r" deliveries_per_sec)") deliveries/s) | p50 $(get "$r" fanout_latency_us.p50) µs, p99 $(get "$r" fanout_latency_us.p99) µs, p99.9 $(get "$r" fanout_latency_us.p999) µs, max $(get "$r" fanout_latency_us.max) µs |"

# 4. Handshakes: connect as fast as possible (HS256 validation, upgrade, welcome, subscribe to 1).
start_server_shards "$SHARDS"
t0=$(ticks all)
load handshakes --scenario storm --connections "$HANDSHAKE_CONNS" --watch 1 --flaps-per-sec 0 \
  --duration 1s --threads 2 || true
t1=$(ticks all)
r="$OUT/handshakes.json"
n=$(get "$r" connections_established)
echo "| 4 | handshakes/s (HS256, $n connections, as fast as the client can) | $(printf %.0f "$(get "$r" handshakes_per_sec)")/s; server CPU $(us_per $((t1 - t0)) "$n") µs per connection (handshake + session + 1 subscription + close) |"

# 5. Scaling: the same steps on 1 shard.
if [ "$SHARDS" -ne 1 ]; then
  step_rates 1 > "$OUT/steps-1.txt"
  one=$(awk '$3 <= 10000 && $2 > m { m = $2 } END { printf "%.0f", m + 0 }' "$OUT/steps-1.txt")
  echo "| 5 | max deliveries/s (p99 ≤ 10 ms): 1 shard vs $SHARDS shards | $one/s vs $(printf %.0f "$best_dps")/s |"
fi
echo
echo "Per-step figures (flaps/s, deliveries/s, p99 µs, server CPU µs/delivery, client CPU s, verify, server user-space µs/delivery):"
for f in "$OUT"/steps-*.txt; do echo; echo "$f"; cat "$f"; done
