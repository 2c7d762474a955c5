#!/usr/bin/env bash
# The cluster, measured side by side with one node in one run (docs/BENCHMARKS.md, "Cluster"):
#   - three nodes (one shard each) and a nats-server on loopback, the harness spreading its
#     connections over the three (so most watchers watch users on other nodes): end-to-end
#     fan-out p50/p99 (flapper's set_status to the watcher's receipt), server CPU per delivery
#     (the three nodes, and with nats-server), bus delta messages and bytes per status change;
#   - the same load on one node (one shard, no cluster) as the baseline.
# Each configuration runs at WATCH watched users per connection for each value of WATCHES, so
# the bus cost per change can be seen not to grow with the number of watchers.
#
#   loadtest/cluster-bench.sh [PRESENCED_BINARY]      # default target/release/presenced
#   ROUNDS=2 FLAPS=2000 CONNS=3000 WATCHES="5 40" loadtest/cluster-bench.sh
#   CONFIGS=3 ROUNDS=1 WATCHES=40 FLAPS=8000 loadtest/cluster-bench.sh   # the cluster only
#
# Loopback only; every run is bounded (DURATION run phases, CONNS connections).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/presenced}
ROUNDS=${ROUNDS:-2}
FLAPS=${FLAPS:-2000}
CONNS=${CONNS:-3000}
WATCHES=${WATCHES:-"5 40"}
DURATION=${DURATION:-8s}
OUT=${OUT:-target/cluster-bench}
BASE=${PORT:-18700}
NATS_BIN=${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
[ -x "$BIN" ] || { echo "no server binary at $BIN" >&2; exit 2; }
[ -x "$NATS_BIN" ] || { echo "no nats-server (install Debian's nats-server, or set NATS_SERVER)" >&2; exit 2; }
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"
write_server_toml

PIDS=() NPID=""
stop_all() {
  for p in "${PIDS[@]}" $NPID; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}" $NPID; do wait "$p" 2>/dev/null || true; done
  PIDS=() NPID=""
}
trap stop_all EXIT

# Like lib.sh's wait_port, but the run ends when nothing listens.
listening() { wait_port "$1" || { echo "nothing listens on $1" >&2; exit 1; }; }


# Starts `nodes` nodes (1: a single node, no cluster); sets PIDS, URLS, ADMINS.
start_nodes() {
  local nodes=$1 i
  stop_all
  URLS="" ADMINS=()
  if [ "$nodes" -gt 1 ]; then
    "$NATS_BIN" -a 127.0.0.1 -p "$((BASE + 99))" > "$OUT/nats.log" 2>&1 &
    NPID=$!
    listening "$((BASE + 99))"
  fi
  for i in $(seq "$nodes"); do
    local port=$((BASE + i)) admin=$((BASE + 50 + i)) cluster=()
    [ "$nodes" -gt 1 ] && cluster=(--nats-url "nats://127.0.0.1:$((BASE + 99))" --node-id "n$i")
    rm -rf "$OUT/data$i"
    "$BIN" serve --config "$OUT/server.toml" --listen "127.0.0.1:$port" \
      --admin-listen "127.0.0.1:$admin" --data-dir "$OUT/data$i" --shards 1 \
      --placement unbound "${cluster[@]}" > "$OUT/node$i.log" 2>&1 &
    PIDS+=($!)
    ADMINS+=("$admin")
    URLS="${URLS:+$URLS,}ws://127.0.0.1:$port/ws"
  done
  for i in $(seq "$nodes"); do listening $((BASE + i)); done
  if [ "$nodes" -gt 1 ]; then
    for a in "${ADMINS[@]}"; do
      for _ in $(seq 200); do
        curl -s "127.0.0.1:$a/readyz" | grep -q "\"nodes\":$nodes" && break
        sleep 0.05
      done
    done
  fi
}

# CPU ticks (user + system) of the nodes, and of nats-server.
node_ticks() { local t=0 p; for p in "${PIDS[@]}"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
nats_ticks() { [ -n "$NPID" ] && awk '{print $14 + $15}' "/proc/$NPID/stat" || echo 0; }

# Sum of one metric over the nodes' /metrics (0 when absent).
metric() {
  local name=$1 a sum=0 v
  for a in "${ADMINS[@]}"; do
    v=$(curl -s "127.0.0.1:$a/metrics" | awk -v n="$name" '$1 == n {print $2}')
    sum=$(awk -v s="$sum" -v v="${v:-0}" 'BEGIN { printf "%.0f", s + v }')
  done
  echo "$sum"
}

echo "config,round,watch,deliveries_per_s,p50_us,p99_us,cpu_us_per_delivery_nodes,cpu_us_per_delivery_with_nats,flaps,changes_published,delta_msgs,delta_bytes,msgs_per_change,bytes_per_change,verify"
for round in $(seq "$ROUNDS"); do
  for watch in $WATCHES; do
    for nodes in ${CONFIGS:-3 1}; do
      start_nodes "$nodes"
      name=$([ "$nodes" -gt 1 ] && echo cluster3 || echo single)
      r="$OUT/$name-w$watch-$round.json" pf="$OUT/phase"
      rm -f "$pf"
      m0=$(metric presenced_cluster_delta_messages_out_total)
      b0=$(metric presenced_cluster_delta_bytes_out_total)
      c0=$(metric presenced_cluster_deltas_out_total)
      "$LOAD" --url "$URLS" --secret "$SECRET" --quiet --json "$r" --scenario churn \
        --connections "$CONNS" --watch "$watch" --flap-fraction 0.25 --flaps-per-sec "$FLAPS" \
        --duration "$DURATION" --rate 3000 --verify --phase-file "$pf" > /dev/null 2>&1 &
      lpid=$! t0="" t1="" n0="" n1=""
      while kill -0 "$lpid" 2>/dev/null; do
        ph=$(cat "$pf" 2>/dev/null || true)
        if [ -z "$t0" ] && [ -n "$ph" ] && [ "$ph" != "ramp" ]; then t0=$(node_ticks); n0=$(nats_ticks); fi
        if [ -z "$t1" ] && [ "$ph" = "done" ]; then t1=$(node_ticks); n1=$(nats_ticks); fi
        sleep 0.01
      done
      wait "$lpid" || true
      t1=${t1:-$(node_ticks)} n1=${n1:-$(nats_ticks)}
      m=$(( $(metric presenced_cluster_delta_messages_out_total) - m0 ))
      b=$(( $(metric presenced_cluster_delta_bytes_out_total) - b0 ))
      c=$(( $(metric presenced_cluster_deltas_out_total) - c0 ))
      d=$(get "$r" deliveries || echo 0)
      awk -v cfg="$name" -v rd="$round" -v w="$watch" -v ds="$(get "$r" deliveries_per_sec)" \
        -v p50="$(get "$r" fanout_latency_us.p50)" -v p99="$(get "$r" fanout_latency_us.p99)" \
        -v cn="$(us_per $((t1 - t0)) "$d")" -v cw="$(us_per $((t1 - t0 + n1 - ${n0:-0})) "$d")" \
        -v f="$(get "$r" flaps_sent)" -v c="$c" -v m="$m" -v b="$b" -v v="$(get "$r" verify.passed)" \
        'BEGIN { printf "%s,%d,%d,%.0f,%d,%d,%s,%s,%d,%d,%d,%d,%.3f,%.1f,%s\n", cfg, rd, w, ds, p50, p99, cn, cw, f, c, m, b, (c > 0 ? m / c : 0), (c > 0 ? b / c : 0), v }'
      stop_all
    done
  done
done
