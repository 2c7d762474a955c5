# shellcheck shell=bash
# Shared by loadtest/bench.sh and loadtest/ab.sh, which source it after `cd` to the repository
# root and after setting OUT (their output folder) and PORT (the server's port). Not run on its
# own.
#
# Server settings: the fleet comes from a few loopback addresses and flaps fast, so the per-IP
# handshake and per-connection op limits, which exist for real clients, are lifted (and the
# per-user session limit). A 3 s heartbeat: idle memory is measured in steady state, after the
# heartbeat sweep has given back the buffers a connection's set-up burst used. History goes to
# $OUT/data, emptied at every server start.

# The same as loadtest/compare.toml's jwt_secret.
SECRET=bench-secret-0123456789abcdef
LOAD=target/release/presenced-loadtest
TCK=$(getconf CLK_TCK)
SPID=""

# Writes $OUT/server.toml.
write_server_toml() {
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
}

# Stops the server started last, if any.
stop_server() {
  if [ -n "$SPID" ]; then
    kill "$SPID" 2>/dev/null || true
    wait "$SPID" 2>/dev/null || true
    SPID=""
  fi
}
trap stop_server EXIT

# Starts a server on a fresh history store and waits for its port; sets SPID.
# $1 = server binary, $2 = its log file, rest = more `serve` flags.
start_server() {
  local bin=$1 log=$2
  shift 2
  stop_server
  rm -rf "$OUT/data"
    "$bin" serve --config "$OUT/server.toml" --listen "127.0.0.1:$PORT" "$@" > "$log" 2>&1 &
  SPID=$!
  wait_port "$PORT" 100 || { echo "server did not start" >&2; exit 1; }
}

# Waits until something listens on 127.0.0.1:$1, polling every 50 ms up to $2 times (default
# 200); non-zero when nothing did.
wait_port() {
  for _ in $(seq "${2:-200}"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# The server's CPU time so far, in clock ticks: `all` (user + system) or `user`.
ticks() { awk -v f="$1" '{print (f == "user" ? $14 : $14 + $15)}' "/proc/$SPID/stat"; }

# One value of a harness JSON report: $1 = report, $2 = path (e.g. fanout_latency_us.p99).
get() { "$LOAD" get "$1" "$2"; }

# The harness against the server, quiet; the flags follow.
harness() { "$LOAD" --url "ws://127.0.0.1:$PORT/ws" --secret "$SECRET" --quiet "$@"; }

# Waits for a harness run in the background (pid $1, started with `--phase-file $2`) to end,
# sampling the server's CPU ticks when its run phase starts and when it is done, so set-up
# (handshakes, subscribes) is not charged to deliveries. Sets RUN_TICKS and RUN_USER_TICKS; a
# phase never seen counts from the server's start, or up to now.
run_phase_ticks() {
  local lpid=$1 pf=$2 t0="" t1="" u0="" u1="" ph
  while kill -0 "$lpid" 2>/dev/null; do
    ph=$(cat "$pf" 2>/dev/null || true)
    if [ -z "$t0" ] && [ -n "$ph" ] && [ "$ph" != "ramp" ]; then t0=$(ticks all); u0=$(ticks user); fi
    if [ -z "$t1" ] && [ "$ph" = "done" ]; then t1=$(ticks all); u1=$(ticks user); fi
    sleep 0.01
  done
  wait "$lpid" || true
  # shellcheck disable=SC2034 # read by the caller
  RUN_TICKS=$(( ${t1:-$(ticks all)} - ${t0:-0} ))
  # shellcheck disable=SC2034
  RUN_USER_TICKS=$(( ${u1:-$(ticks user)} - ${u0:-0} ))
}

# Microseconds of CPU per item: $1 ticks over $2 items (0 when there are none).
us_per() { awk -v t="$1" -v n="$2" -v k="$TCK" 'BEGIN { printf "%.2f", (n > 0 ? t / k * 1e6 / n : 0) }'; }

# Starts server $1 with the comparisons' settings (loadtest/compare.toml: limits lifted, the
# default heartbeat), 2 unpinned shards and history in $OUT/data, and waits for its port; sets
# SPID. The rest are more `serve` flags. With $LAUNCH (e.g. `heaptrack -o FILE`) the server runs
# under it, and SPID is still the server's own pid.
start_compare_server() {
  local bin=$1
  shift
  stop_server
  rm -rf "$OUT/data"
  # shellcheck disable=SC2086 # LAUNCH is a command line
  ${LAUNCH:-} "$bin" serve --config loadtest/compare.toml --data-dir "$OUT/data" \
    --listen "127.0.0.1:$PORT" --shards 2 --placement unbound --no-admin "$@" \
    > "$OUT/server.log" 2>&1 &
  SPID=$!
  wait_port "$PORT" 200 || { echo "server did not start: $OUT/server.log" >&2; exit 1; }
  if [ -n "${LAUNCH:-}" ]; then SPID=$(pgrep -n -f "^$bin serve"); fi
}

# The harness in the background (HPID) with the flags given, its report in $OUT/report.json;
# returns once its run phase has begun.
load_until_run() {
  rm -f "$OUT/phase"
  harness --phase-file "$OUT/phase" --json "$OUT/report.json" "$@" > "$OUT/harness.log" 2>&1 &
  HPID=$!
  while [ "$(cat "$OUT/phase" 2>/dev/null)" != run ]; do
    kill -0 "$HPID" 2>/dev/null || { echo "the harness ended before its run: $OUT/harness.log" >&2; exit 1; }
    sleep 0.05
  done
}

# The churn load of the cost scripts: 4,000 connections watching 10 users each, a quarter of
# them flapping (add --flaps-per-sec and --duration).
# shellcheck disable=SC2034 # used by the scripts that source this file
CHURN=(--scenario churn --connections 4000 --watch 10 --flap-fraction 0.25 --rate 4000)

# For the profile scripts: an empty $OUT, the harness built, the open-file limit raised.
fresh_run() {
  rm -rf "$OUT" && mkdir -p "$OUT"
  cargo build --release -q -p presenced-loadtest
  ulimit -n "$(ulimit -Hn)"
}
