#!/usr/bin/env bash
# Zero-downtime upgrades, measured (docs/BENCHMARKS.md, "Upgrades"): a server with CONNS harness
# connections (each watching WATCH users, FLAPS status changes per second across the fleet) is
# upgraded in the middle of the run phase with `presenced upgrade`, once for each drain window
# in DRAINS. For each it reports:
#   - the time from `presenced upgrade` to the new process ready (its own report, "ready in");
#   - what the watchers saw: users going from visible to offline (target 0: every harness
#     client reconnects when closed), `--verify` (order: no seq went back; convergence);
#   - the reconnect burst: how many, over how long, and the busiest 100 ms.
#
#   loadtest/upgrade-bench.sh [PRESENCED_BINARY]      # default target/release/presenced
#   CONNS=4000 DRAINS="0 10000" loadtest/upgrade-bench.sh
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
mkdir -p "$OUT"
# shellcheck source=loadtest/lib.sh
. loadtest/lib.sh
[ -x "$BIN" ] || { echo "no server binary at $BIN" >&2; exit 2; }
cargo build --release -q -p presenced-loadtest
ulimit -n "$(ulimit -Hn)"

# The server whose process changes: stop it by its control socket's owner, not by pid.
stop_any() {
  pkill -f -- "--listen 127.0.0.1:$PORT " 2>/dev/null || true
  for _ in $(seq 100); do pgrep -f -- "--listen 127.0.0.1:$PORT " >/dev/null || return 0; sleep 0.05; done
}
trap stop_any EXIT

printf '%-9s %-9s %-12s %-11s %-8s %-10s %-11s %-10s %-10s\n' \
  drain_ms users ready_ms reconnects offline verify spread_ms p99_ms peak/100ms
for drain in $DRAINS; do
  stop_any
  write_server_toml
  # Top-level keys before the tables lib.sh wrote.
  { echo "drain_ms = $drain"; cat "$OUT/server.toml"; printf '[upgrade]\nsocket = "%s"\n' "$OUT/ctl.sock"; } \
    > "$OUT/server.tmp" && mv "$OUT/server.tmp" "$OUT/server.toml"
  rm -rf "$OUT/data"
  "$BIN" serve --config "$OUT/server.toml" --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$ADMIN" > "$OUT/server-$drain.log" 2>&1 &
  wait_port "$PORT" 100 || { echo "server did not start" >&2; exit 1; }
  rm -f "$OUT/phase"
  harness --connections "$CONNS" --watch "$WATCH" --flaps-per-sec "$FLAPS" \
    --duration "$DURATION" --verify --phase-file "$OUT/phase" \
    --json "$OUT/run-$drain.json" > "$OUT/run-$drain.txt" 2>&1 &
  lpid=$!
  # Upgrade UPGRADE_AT seconds into the run phase.
  for _ in $(seq 600); do [ "$(cat "$OUT/phase" 2>/dev/null)" = run ] && break; sleep 0.1; done
  sleep "$UPGRADE_AT"
  said=$("$BIN" upgrade --socket "$OUT/ctl.sock" 2>&1) || { echo "upgrade failed: $said" >&2; exit 1; }
  echo "$said" > "$OUT/upgrade-$drain.txt"
  wait "$lpid" || true
  ready=$(sed -n 's/.* ready in \([0-9]*\) ms with \([0-9]*\) users.*/\1/p' <<<"$said")
  users=$(sed -n 's/.* ready in \([0-9]*\) ms with \([0-9]*\) users.*/\2/p' <<<"$said")
  r="$OUT/run-$drain.json"
  printf '%-9s %-9s %-12s %-11s %-8s %-10s %-11s %-10s %-10s\n' "$drain" "$users" "$ready" \
    "$(get "$r" reconnects)" "$(get "$r" went_offline)" "$(get "$r" verify.passed)" \
    "$(get "$r" reconnect_shape.spread_ms 2>/dev/null || echo -)" \
    "$(get "$r" reconnect_shape.p99_ms 2>/dev/null || echo -)" \
    "$(get "$r" reconnect_shape.peak_per_100ms 2>/dev/null || echo -)"
done
