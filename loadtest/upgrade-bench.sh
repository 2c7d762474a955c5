#!/usr/bin/env bash
# Zero-downtime upgrades, measured (docs/BENCHMARKS.md, "Upgrades"): a server with CONNS harness
# connections (each watching WATCH users, FLAPS status changes per second across the fleet) is
# upgraded in the middle of the run phase with `presenced upgrade`, once for each drain window
# in DRAINS. For each it reports:
#   - the time from `presenced upgrade` to the new process ready (its own report, "ready in");
#   - what the watchers saw: users going from visible to offline (target 0: every harness
#     client reconnects when closed), `--verify` (order: no seq went back; convergence);
#   - the reconnect burst: how many, over how long, and the busiest 100 ms.
# With NODES=2, a cluster: a nats-server and a second node, the harness's connections spread over
# both (so most watchers watch users on the other node), and node 1 upgraded. Then also what
# node 2 saw of node 1 during the upgrade: gaps in its delta numbers and snapshots it asked for
# (a restart of node 1 would show as one of each per followed bucket; target 0 and 0).
#
#   loadtest/upgrade-bench.sh [PRESENCED_BINARY]      # default target/release/presenced
#   CONNS=4000 DRAINS="0 10000" loadtest/upgrade-bench.sh
#   NODES=2 DRAINS=10000 loadtest/upgrade-bench.sh
#
# Loopback only; every run is bounded (DURATION, CONNS).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/presenced}
CONNS=${CONNS:-4000}
WATCH=${WATCH:-10}
FLAPS=${FLAPS:-1000}
DRAINS=${DRAINS:-"0 10000"}
DURATION=${DURATION:-30s}
UPGRADE_AT=${UPGRADE_AT:-8}
OUT=${OUT:-target/upgrade-bench}
PORT=${PORT:-18900}
ADMIN=$((PORT + 1))
NODES=${NODES:-1}
PORT2=$((PORT + 2)) ADMIN2=$((PORT + 3)) NATS_PORT=$((PORT + 9))
NATS_BIN=${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
[ -x "$BIN" ] || { echo "no server binary at $BIN" >&2; exit 2; }
[ "$NODES" = 1 ] || [ -x "$NATS_BIN" ] || { echo "NODES=2 needs nats-server (Debian's, or NATS_SERVER)" >&2; exit 2; }
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"

# The server whose process changes: stop it by its listen address, not by pid (and node 2 and
# nats-server with it).
stop_any() {
  local p
  for p in "--listen 127.0.0.1:$PORT " "--listen 127.0.0.1:$PORT2 " "-p $NATS_PORT"; do
    pkill -f -- "$p" 2>/dev/null || true
    for _ in $(seq 100); do pgrep -f -- "$p" >/dev/null || break; sleep 0.05; done
  done
}
trap stop_any EXIT

# A counter from node 2's /metrics (0 without a second node).
metric2() {
  [ "$NODES" = 2 ] || { echo 0; return; }
  curl -s "127.0.0.1:$ADMIN2/metrics" | awk -v n="$1" '$1 == n {print $2; f=1} END {if (!f) print 0}'
}

printf '%-6s %-9s %-9s %-12s %-11s %-8s %-10s %-11s %-10s %-10s %-6s %-6s\n' \
  nodes drain_ms users ready_ms reconnects offline verify spread_ms p99_ms peak/100ms gaps2 snaps2
for drain in $DRAINS; do
  stop_any
  write_server_toml
  # Top-level keys before the tables lib.sh wrote.
  { echo "drain_ms = $drain"; cat "$OUT/server.toml"; printf '[upgrade]\nsocket = "%s"\n' "$OUT/ctl.sock"; } \
    > "$OUT/server.tmp" && mv "$OUT/server.tmp" "$OUT/server.toml"
  rm -rf "$OUT/data" "$OUT/data2"
  cluster1=() urls="ws://127.0.0.1:$PORT/ws"
  if [ "$NODES" = 2 ]; then
    "$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" > "$OUT/nats.log" 2>&1 &
    wait_port "$NATS_PORT" 100 || { echo "nats-server did not start" >&2; exit 1; }
    cluster1=(--nats-url "nats://127.0.0.1:$NATS_PORT" --node-id n1)
    sed "s|$OUT/ctl.sock|$OUT/ctl2.sock|" "$OUT/server.toml" > "$OUT/server2.toml"
    "$BIN" serve --config "$OUT/server2.toml" --listen "127.0.0.1:$PORT2" \
      --admin-listen "127.0.0.1:$ADMIN2" --data-dir "$OUT/data2" \
      --nats-url "nats://127.0.0.1:$NATS_PORT" --node-id n2 > "$OUT/node2-$drain.log" 2>&1 &
    wait_port "$PORT2" 100 || { echo "node 2 did not start" >&2; exit 1; }
    urls="$urls,ws://127.0.0.1:$PORT2/ws"
  fi
  "$BIN" serve --config "$OUT/server.toml" --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$ADMIN" "${cluster1[@]}" > "$OUT/server-$drain.log" 2>&1 &
  wait_port "$PORT" 100 || { echo "server did not start" >&2; exit 1; }
  if [ "$NODES" = 2 ]; then
    for _ in $(seq 200); do curl -s "127.0.0.1:$ADMIN2/readyz" | grep -q '"nodes":2' && break; sleep 0.05; done
  fi
  rm -f "$OUT/phase"
  "$LOAD" --url "$urls" --secret "$SECRET" --quiet \
    --connections "$CONNS" --watch "$WATCH" --flaps-per-sec "$FLAPS" \
    --duration "$DURATION" --verify --phase-file "$OUT/phase" \
    --json "$OUT/run-$drain.json" > "$OUT/run-$drain.txt" 2>&1 &
  lpid=$!
  # Upgrade UPGRADE_AT seconds into the run phase.
  for _ in $(seq 600); do [ "$(cat "$OUT/phase" 2>/dev/null)" = run ] && break; sleep 0.1; done
  sleep "$UPGRADE_AT"
  g0=$(metric2 presenced_cluster_gaps_total) s0=$(metric2 presenced_cluster_snapshots_requested_total)
  said=$("$BIN" upgrade --socket "$OUT/ctl.sock" 2>&1) || { echo "upgrade failed: $said" >&2; exit 1; }
  echo "$said" > "$OUT/upgrade-$drain.txt"
  wait "$lpid" || true
  gaps=$(( $(metric2 presenced_cluster_gaps_total) - g0 ))
  snaps=$(( $(metric2 presenced_cluster_snapshots_requested_total) - s0 ))
  ready=$(sed -n 's/.* ready in \([0-9]*\) ms with \([0-9]*\) users.*/\1/p' <<<"$said")
  users=$(sed -n 's/.* ready in \([0-9]*\) ms with \([0-9]*\) users.*/\2/p' <<<"$said")
  r="$OUT/run-$drain.json"
  printf '%-6s %-9s %-9s %-12s %-11s %-8s %-10s %-11s %-10s %-10s %-6s %-6s\n' "$NODES" "$drain" "$users" "$ready" \
    "$(get "$r" reconnects)" "$(get "$r" went_offline)" "$(get "$r" verify.passed)" \
    "$(get "$r" reconnect_shape.spread_ms 2>/dev/null || echo -)" \
    "$(get "$r" reconnect_shape.p99_ms 2>/dev/null || echo -)" \
    "$(get "$r" reconnect_shape.peak_per_100ms 2>/dev/null || echo -)" "$gaps" "$snaps"
done
