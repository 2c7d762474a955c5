#!/usr/bin/env bash
# 1 -> N shard scaling on a many-core machine, in one bounded run, from prebuilt binaries (no Rust
# toolchain needed there: loadtest/scaling-prep.sh builds them into target/scaling-bin/).
#
#   OUT=/tmp/scaling loadtest/scaling.sh                        # 16+ CPUs: about 4 minutes, <= 6.5
#   TUNE=0 SHARD_LIST="1 2" CONNS=2000 HS_CONNS=2000 OUT=/tmp/s loadtest/scaling.sh   # 2 CPUs
#
# For each shard count, presenced runs with shard i pinned to the i-th server CPU and the harness
# pinned (taskset) to separate client CPUs; server settings as bench.sh's (per-IP handshake and
# per-connection op limits lifted) except the heartbeat (see HEARTBEAT_MS). Per shard count: a
# fan-out ladder (CONNS connections, each watching WATCH users in a ring, FLAP_FRACTION of them
# flapping at each FLAP_STEPS rate for RUN_S, --verify), then, on a fresh server, HS_CONNS
# connections as fast as they go. Server CPU time comes from /proc/PID/stat sampled at the
# harness's phase changes (--phase-file), per shard thread from /proc/PID/task/*/stat.
#
# Output: $OUT/summary.md (Markdown tables) and $OUT/scaling.tar.gz (every JSON report with its
# hdrhistograms, server logs, per-thread CPU, /metrics, machine facts, console log). Both are
# rewritten after every shard count, so a run killed part-way leaves what it finished. A failed
# step is logged and the next one runs; every harness run is under `timeout`, and the whole
# measurement under BUDGET_S (each shard count gets an equal share of what is left).
#
# CPU layout: from the CPUs this process may use (Cpus_allowed_list) and /sys topology. With
# enough cores, one core per shard (first hardware thread; its sibling left idle) and then one
# core per client thread; 16 CPUs without SMT give server 0-7, client 8-15. With fewer cores, half
# the cores each (the client takes all threads of its cores); shard counts above the server's
# core count then share cores (flagged). SERVER_CPUS (list in shard order) and CLIENT_CPUS
# override it.
#
# Knobs (environment), defaults in brackets: BIN [target/scaling-bin], OUT [target/scaling],
# SHARD_LIST ["1 2 4 8", those that fit], CONNS [30000], WATCH [20], FLAP_FRACTION [0.25],
# FLAP_STEPS ["5000 20000 80000" flaps/s; x WATCH = offered deliveries/s], RUN_S [10],
# RAMP_RATE [15000 connections/s], DRAIN_S [10], HS_CONNS [20000], HS_RATE [0 = as fast as
# possible], P99_MAX_MS [10], HEARTBEAT_MS [25000, the server's default: bench.sh's 3000 closes
# any client starved for 6 s, which a saturated harness is, and the reconnects spoil the step],
# CLIENT_THREADS [one per client CPU], BUDGET_S [360 s of measurement; start-up, shutdown and
# packing add a few seconds], PORT [9400: below the ephemeral port range; uses up to PORT+199],
# TUNE [1: as root, raise the open-file and memlock limits and set loopback sysctls, put back on
# exit], HISTORY [local: the server's default history store, in a fresh directory under the work
# directory for each start; off: none], KEEP_WORK [0: the work directory under $TMPDIR is
# removed once packed].
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$SECONDS

BIN=${BIN:-target/scaling-bin}
OUT=${OUT:-target/scaling}
CONNS=${CONNS:-30000}
WATCH=${WATCH:-20}
FLAP_FRACTION=${FLAP_FRACTION:-0.25}
FLAP_STEPS=${FLAP_STEPS:-5000 20000 80000}
RUN_S=${RUN_S:-10}
RAMP_RATE=${RAMP_RATE:-15000}
DRAIN_S=${DRAIN_S:-10}
HS_CONNS=${HS_CONNS:-20000}
HS_RATE=${HS_RATE:-0}
P99_MAX_MS=${P99_MAX_MS:-10}
HEARTBEAT_MS=${HEARTBEAT_MS:-25000}
BUDGET_S=${BUDGET_S:-360}
PORT=${PORT:-9400}
SYSCTL_ROOT=${SYSCTL_ROOT:-/proc/sys}
TUNE=${TUNE:-1}
HISTORY=${HISTORY:-local}
SECRET=bench-secret-0123456789abcdef
SERVER=$BIN/presenced
LOAD=$BIN/presenced-loadtest
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WROOT=$(mktemp -d "${TMPDIR:-/tmp}/scaling.XXXXXX") || exit 1
W=$WROOT/scaling # what goes into the tarball
mkdir -p "$W"
RESTORE=$WROOT/sysctl.restore # "file<TAB>old value" of every sysctl changed, put back on exit
: > "$RESTORE"
SUM=$W/summary.md
exec {CONSOLE}>&1
exec > >(tee "$W/console.log") 2>&1
TEE_PID=$!

log() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }
SPID="" LPID="" START_ERR="" SHMBIN=""
echo "# presenced scaling — stopped before the runs (console below)" > "$SUM"
: > "$W/steps.tsv"; : > "$W/handshakes.tsv"
stop_server() {
  [ -n "$SPID" ] || return 0
  kill "$SPID" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SPID" 2>/dev/null
  wait "$SPID" 2>/dev/null
  SPID=""
  # The history store of that run: its size is noted, the files are not kept.
  if [ -d "$WROOT/data" ]; then
    du -sk "$WROOT"/data/* >> "$W/history-store-kib.txt" 2>/dev/null; rm -rf "$WROOT/data"
  fi
}
pack() {
  cp "$SUM" "$OUT/summary.md" 2>/dev/null
  if tar -C "$WROOT" -czf "$OUT/scaling.tar.gz.tmp" scaling 2>/dev/null; then
    mv "$OUT/scaling.tar.gz.tmp" "$OUT/scaling.tar.gz"
  else
    rm -f "$OUT/scaling.tar.gz.tmp"; tar -C "$WROOT" -cf "$OUT/scaling.tar" scaling 2>/dev/null
  fi
}
details() { # the per-step tables, appended once (also after an interrupted run)
  [ -z "${DETAILS_DONE:-}" ] || return 0
  DETAILS_DONE=1
  if [ -z "${RUNS_STARTED:-}" ]; then
    { echo; echo '```'; tail -n 25 "$W/console.log"; echo '```'; } >> "$SUM"; return 0
  fi
  {
    echo
    echo "Every fan-out step (server CPU over the run phase only; per-shard = the shard-* threads; flaps sent = offered load reached):"
    echo
    echo "| shards | flaps/s | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | server CPU s | µs/delivery | shard CPU s min/max | client CPU s | verify | flaps sent | conns | reconnects | ramp s |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    awk '{ if (NF >= 16) printf "| %s | %s | %s | %.2f | %.2f | %.2f | %.2f | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4/1000, $5/1000, $6/1000, $7/1000, $8, $9, $10, $11, $12, $13, $14, $15, $16
           else { printf "| %s | %s |", $1, $2; for (i = 3; i <= NF; i++) printf " %s", $i; print " | | | | | | | | | | | | | |" } }' "$W/steps.tsv"
    echo
    echo "Handshakes (server CPU over the ramp: accept, upgrade, HS256, welcome, 1 subscription):"
    echo
    echo "| shards | handshakes/s | connections | server CPU s | µs server CPU / connection | handshake p99 µs | connect p99 µs | client CPU s | ramp s | listen overflows | SYN cookies |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    awk '{ printf "|"; for (i = 1; i <= NF; i++) printf " %s |", $i; print "" }' "$W/handshakes.tsv"
    echo
    echo "Total $((SECONDS - T0)) s${INTERRUPTED:+ (interrupted)}. Raw: scaling.tar.gz (JSON reports with hdrhistograms, server logs, machine.txt, per-thread CPU, /metrics)."
  } >> "$SUM"
  cp /proc/stat "$W/proc-stat.end" 2>/dev/null
  cp /proc/net/netstat "$W/netstat.end" 2>/dev/null
}
cleanup() {
  trap - EXIT; trap '' INT TERM # a second signal must not cut the clean-up short
  [ -n "$LPID" ] && kill "$LPID" 2>/dev/null && wait "$LPID" 2>/dev/null
  stop_server
  local f v
  while IFS=$'\t' read -r f v; do (echo "$v" > "$f") 2>/dev/null || log "could not restore $f"; done < "$RESTORE"
  [ -s "$RESTORE" ] && log "sysctls restored"
  [ -n "$SHMBIN" ] && rm -rf "$SHMBIN"
  log "done in $((SECONDS - T0)) s"
  details
  echo; cat "$SUM"
  exec >&"$CONSOLE" 2>&1 # let tee finish console.log before it is packed
  for _ in $(seq 30); do kill -0 "$TEE_PID" 2>/dev/null || break; sleep 0.1; done
  pack
  # The work directory is all in the tarball; keep it with KEEP_WORK=1 (or if packing failed).
  [ "${KEEP_WORK:-0}" = 1 ] || [ ! -s "$OUT/scaling.tar.gz" ] || rm -rf "$WROOT"
}
trap cleanup EXIT
trap 'INTERRUPTED=1; log "interrupted"; exit 130' INT TERM

# ---- Machine facts and limits -----------------------------------------------------------------
{
  echo "date: $(date -u +%FT%TZ)"
  echo "nproc: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo
  echo "kernel: $(uname -srm)"
  grep -E '^(PRETTY_NAME)=' /etc/os-release 2>/dev/null
  grep -E '^Cpus_allowed_list' /proc/self/status
  echo "cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
  echo "io_uring_disabled: $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo n/a)"
  echo "ulimit -Hn: $(ulimit -Hn)  -Sn: $(ulimit -Sn)  -l: $(ulimit -l)  uid: $(id -u)"
  grep -E 'MemTotal|MemAvailable' /proc/meminfo
  for t in taskset lscpu python3 tar gzip; do printf '%s: %s\n' "$t" "$(command -v $t || echo MISSING)"; done
  command -v lscpu >/dev/null && lscpu
  command -v lscpu >/dev/null && lscpu -e 2>/dev/null
} > "$W/machine.txt" 2>&1
sed -n '1,14p' "$W/machine.txt"
cp /proc/stat "$W/proc-stat.start" 2>/dev/null
cp /proc/net/netstat "$W/netstat.start" 2>/dev/null

# Loopback load needs more ephemeral ports and accept backlog than defaults give; the old values
# are put back on exit. The ports this script listens on are reserved out of the ephemeral range.
if [ "$TUNE" = 1 ] && [ "$(id -u)" = 0 ]; then
  for kv in fs.nr_open=1048576 fs.file-max=4194304 net.core.somaxconn=4096 \
    net.ipv4.tcp_max_syn_backlog=8192 net.ipv4.ip_local_port_range="10000 65535" \
    net.ipv4.ip_local_reserved_ports="$PORT-$((PORT + 199))" net.ipv4.tcp_tw_reuse=1 \
    net.core.netdev_max_backlog=8192 kernel.io_uring_disabled=0; do
    k=${kv%%=*} v=${kv#*=} f=$SYSCTL_ROOT/$(echo "${kv%%=*}" | tr . /)
    [ -e "$f" ] || continue
    cur=$(tr -s '\t ' '  ' < "$f")
    case $k in fs.nr_open|fs.file-max|net.core.somaxconn|net.ipv4.tcp_max_syn_backlog|net.core.netdev_max_backlog)
      [ "${cur:-0}" -ge "$v" ] 2>/dev/null && continue ;; esac
    [ "$cur" = "$v" ] && continue
    if (echo "$v" > "$f") 2>/dev/null; then echo "sysctl $k: $cur -> $v"; printf '%s\t%s\n' "$f" "$cur" >> "$RESTORE"
    else echo "sysctl $k = $cur (could not set $v)"; fi
  done > "$W/sysctl.txt"
  cat "$W/sysctl.txt"
  [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 1048576 ] && ulimit -Hn 1048576 2>/dev/null
  ulimit -l unlimited 2>/dev/null || ulimit -Sl "$(ulimit -Hl)" 2>/dev/null
fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null
NOFILE=$(ulimit -n)
log "open files: $NOFILE, memlock: $(ulimit -l) KiB"
if [ "$NOFILE" != unlimited ] && [ $((CONNS + 1000)) -gt "$NOFILE" ]; then
  CONNS=$((NOFILE - 1000)); log "CONNS capped to $CONNS by the open-file limit"
fi
if [ "$NOFILE" != unlimited ] && [ $((HS_CONNS + 1000)) -gt "$NOFILE" ]; then
  HS_CONNS=$((NOFILE - 1000)); log "HS_CONNS capped to $HS_CONNS by the open-file limit"
fi

# The binaries: checked against SHA256SUMS when present, and run from a copy if they cannot be
# executed where they are (lost mode bits, a noexec mount).
if [ -f "$BIN/SHA256SUMS" ] && command -v sha256sum > /dev/null; then
  (cd "$BIN" && sha256sum -c --quiet SHA256SUMS) > "$W/sha256.txt" 2>&1 && log "binaries match SHA256SUMS" ||
    log "binaries do not match SHA256SUMS: $(tr '\n' ' ' < "$W/sha256.txt")"
fi
runs() { "$1/presenced-loadtest" --version > /dev/null 2>&1 && "$1/presenced" serve --help > /dev/null 2>&1; }
SERVER=""
for d in "$BIN" "$WROOT/bin" "/dev/shm/scaling-bin.$$" loader; do
  [ -f "$BIN/presenced" ] || break
  [ "${FORCE_LOADER:-0}" = 1 ] && [ "$d" != loader ] && continue # (to test the fallback)
  if [ "$d" = loader ]; then
    # Too old a glibc here: run them through the loader and libraries bundled by scaling-prep.sh.
    [ -f "$BIN/lib/ld-linux-x86-64.so.2" ] || break
    d=$WROOT/wrap; mkdir -p "$d"; lib=$(cd "$BIN/lib" && pwd)
    for b in presenced presenced-loadtest; do
      printf '#!/bin/sh\nexec %s/ld-linux-x86-64.so.2 --library-path %s %s/%s "$@"\n' "$lib" "$lib" "$(cd "$BIN" && pwd)" "$b" > "$d/$b"
      chmod 0755 "$d/$b"
    done
  elif [ "$d" != "$BIN" ]; then
    SHMBIN=/dev/shm/scaling-bin.$$
    mkdir -p "$d" && cp "$BIN/presenced" "$BIN/presenced-loadtest" "$d/" 2>/dev/null && chmod 0755 "$d"/presenced* 2>/dev/null || continue
  fi
  if runs "$d"; then SERVER=$d/presenced LOAD=$d/presenced-loadtest; break; fi
  SERVER=""
done
case $SERVER in "$BIN/presenced") ;; */wrap/*) log "running through the bundled glibc (${BIN}/lib)" ;; *) log "running copies in ${SERVER%/*}" ;; esac
# ---- CPU layout ---------------------------------------------------------------------------------
expand() { # "0-3,8" -> "0 1 2 3 8"
  local IFS=, r
  for r in $1; do case $r in *-*) seq "${r%-*}" "${r#*-}" ;; *) echo "$r" ;; esac; done | tr '\n' ' '
}
# (CPUS_ALLOWED, SYSFS_CPU and LAYOUT_ONLY=1 exist to test the layout against made-up machines.)
ALLOWED=$(expand "${CPUS_ALLOWED:-$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)}")
# "cpu corekey" for allowed CPUs, by core (package, core id), then CPU number.
topo=$(for c in $ALLOWED; do
  d=${SYSFS_CPU:-/sys/devices/system/cpu}/cpu$c/topology
  echo "$c $(cat "$d/physical_package_id" 2>/dev/null || echo 0)-$(cat "$d/core_id" 2>/dev/null || echo "$c")"
done | sort -t' ' -k2,2V -k1,1n)
echo "$topo" > "$W/topology.txt"
CORES=$(echo "$topo" | awk '!s[$2]++ {print $2}' | tr '\n' ' ')
NCORES=$(echo "$CORES" | wc -w)
TPC=$(echo "$topo" | awk '{n[$2]++} END {m = 0; for (k in n) if (n[k] > m) m = n[k]; print m}')
first_thread() { echo "$topo" | awk -v k="$1" '$2 == k {print $1; exit}'; }
threads_of() { echo "$topo" | awk -v k="$1" '$2 == k {print $1}' | tr '\n' ' '; }
MAXSHARDS=$(echo "${SHARD_LIST:-8}" | tr ' ' '\n' | sort -n | tail -1)
CT_WANT=${CLIENT_THREADS:-8}
if [ -z "${SERVER_CPUS:-}" ] || [ -z "${CLIENT_CPUS:-}" ]; then
  # Enough cores: one per shard, then CT_WANT client cores (first thread of each). Otherwise half
  # the cores each, the client taking every thread of its cores.
  if [ "$NCORES" -ge $((MAXSHARDS + CT_WANT)) ]; then scores=$MAXSHARDS ccores=$CT_WANT per=1
  else
    scores=$((NCORES / 2)); [ "$scores" -lt 1 ] && scores=1; [ "$scores" -gt "$MAXSHARDS" ] && scores=$MAXSHARDS
    ccores=$((NCORES - scores)) per=$TPC
  fi
  SMT_NOTE=""; [ "$TPC" -gt 1 ] && SMT_NOTE=" Shard counts above $scores put shards on SMT siblings of other shards."
  i=0 s="" c="" sib=""
  for k in $CORES; do
    if [ $i -lt "$scores" ]; then
      s="$s $(first_thread "$k")"; sib="$sib $(threads_of "$k" | cut -d' ' -f2- -s)"
    elif [ $i -lt $((scores + ccores)) ]; then
      if [ "$per" = 1 ]; then c="$c $(first_thread "$k")"; else c="$c $(threads_of "$k")"; fi
    fi
    i=$((i + 1))
  done
  [ -z "${c// /}" ] && c=$s # one core: share it
  SERVER_CPUS=${SERVER_CPUS:-$(echo $s $sib | tr ' ' ',')}
  CLIENT_CPUS=${CLIENT_CPUS:-$(echo $c | tr ' ' ',')}
fi
SERVER_ORDER=$(expand "$SERVER_CPUS")
NSERVER=$(echo "$SERVER_ORDER" | wc -w)
NCLIENT=$(expand "$CLIENT_CPUS" | wc -w)
CLIENT_THREADS=${CLIENT_THREADS:-$NCLIENT}
SHARD_LIST=${SHARD_LIST:-$(for n in 1 2 4 8; do [ "$n" -le "$NSERVER" ] && echo $n; done | tr '\n' ' ')}
PIN=()
if command -v taskset > /dev/null; then PIN=(taskset -c "$CLIENT_CPUS")
else log "no taskset: the harness runs unpinned (the server still pins its shards)"; fi
server_cpus_for() { printf '%s\n' $SERVER_ORDER | head -n "$1" | paste -sd, -; }
log "cores: $NCORES x $TPC thread(s); server CPUs (shard order) $SERVER_CPUS; client CPUs $CLIENT_CPUS ($CLIENT_THREADS threads); shards: $SHARD_LIST"
for n in $SHARD_LIST; do [ "$n" -gt "$NSERVER" ] && log "warning: $n shards > $NSERVER server CPUs: shards will share CPUs"; done
[ "${LAYOUT_ONLY:-0}" = 1 ] && exit 0

# Optional server features, by what this build's `serve --help` offers: the admin port on
# PORT+1 of each run (scraped for /metrics), and the history store in a fresh directory per start.
HELP=$("$SERVER" serve --help 2>/dev/null)
ADMIN=() DATADIR=()
case $HELP in *--admin-listen*) ADMIN=(--admin-listen) ;; esac
case $HELP in *--data-dir*) DATADIR=(--data-dir) ;; esac
cat > "$W/server.toml" <<TOML
jwt_secret = "$SECRET"
heartbeat_ms = $HEARTBEAT_MS
[limits]
handshake_rate_per_ip = 0
ops_per_second = 0
max_sessions_per_user = 0
TOML
[ "$HISTORY" = off ] && printf '[history]\nbackend = "off"\n' >> "$W/server.toml"

# ---- Helpers ------------------------------------------------------------------------------------
start_server() { # $1 = shards, $2 = port, $3 = log name; sets PORT_NOW (retries once on +100)
  local port a try
  for try in 0 1; do
    stop_server
    port=$(($2 + 100 * try)) a=()
    [ ${#ADMIN[@]} -gt 0 ] && a=(--admin-listen "127.0.0.1:$((port + 1))")
    [ ${#DATADIR[@]} -gt 0 ] && a+=(--data-dir "$WROOT/data/$3-$try")
    "$SERVER" serve --config "$W/server.toml" --listen "127.0.0.1:$port" --shards "$1" \
      --cpus "$(server_cpus_for "$1")" ${a[@]+"${a[@]}"} > "$W/$3.log" 2>&1 &
    SPID=$!
    for _ in $(seq 100); do
      kill -0 "$SPID" 2>/dev/null || break
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then PORT_NOW=$port; sleep 0.3; return 0; fi
      sleep 0.05
    done
    START_ERR=$(grep -v -e '^\s*$' "$W/$3.log" | tail -1 | sed 's/\x1b\[[0-9;]*m//g; s/|/\//g' | cut -c1-160)
    log "server ($1 shards, port $port) did not start: $START_ERR"
  done
  stop_server; return 1
}
ticks() { [ -r "/proc/$SPID/stat" ] && awk '{print $14 + $15}' "/proc/$SPID/stat" || echo 0; }
threads_snap() { # per-thread "comm ticks cpu" of the server
  local t l c
  for t in /proc/"$SPID"/task/*; do
    read -r l < "$t/stat" 2>/dev/null || continue
    read -r c < "$t/comm" 2>/dev/null || c='?'
    echo "${c// /_} ${l##*) }"
  done | awk '{print $1, $13 + $14, $38}'
}
metrics() { # $1 = admin port, $2 = file
  [ ${#ADMIN[@]} -gt 0 ] || return 0
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && printf "GET /metrics HTTP/1.0\r\nConnection: close\r\n\r\n" >&3 && cat <&3' \
    "$1" > "$2" 2>/dev/null
}
get() { "$LOAD" get "$1" "$2" 2>/dev/null || echo -; }
ms() { awk -v u="$1" 'BEGIN { if (u == "-" || u == "") print "-"; else printf "%.2f", u / 1000 }'; }
int() { awk -v x="$1" 'BEGIN { if (x == "-" || x == "") print "-"; else printf "%.0f", x }'; }
f2() { awk -v x="$1" 'BEGIN { if (x == "-" || x == "") print "-"; else printf "%.2f", x }'; }
sec() { awk -v t="$1" -v k="$TCK" 'BEGIN { printf "%.2f", t / k }'; }
# Runs the harness (bounded by $1 seconds) and samples the server at its phase changes. The run
# phase is run + drain, as the harness counts deliveries over both (bench.sh does the same).
# $2 = name, rest = harness flags. Sets RAMP_TICKS, RUN_TICKS (server CPU ticks) and RC.
harness() {
  local lim=$1 name=$2; shift 2
  local pf="$W/$name.phase" ph="" t_start t_run="" t_done="" 
  rm -f "$pf"
  t_start=$(ticks)
  timeout -k 5 "$lim" ${PIN[@]+"${PIN[@]}"} "$LOAD" --url "ws://127.0.0.1:$PORT_NOW/ws" \
    --secret "$SECRET" --quiet --threads "$CLIENT_THREADS" --json "$W/$name.json" \
    --phase-file "$pf" "$@" > "$W/$name.txt" 2> "$W/$name.err" &
  LPID=$!
  while kill -0 "$LPID" 2>/dev/null; do
    ph=""; [ -r "$pf" ] && read -r ph < "$pf" 2>/dev/null
    if [ -z "$t_run" ] && [ -n "$ph" ] && [ "$ph" != ramp ]; then
      t_run=$(ticks); threads_snap > "$W/$name.threads0"
    fi
    if [ -z "$t_done" ] && [ "$ph" = "done" ]; then
      t_done=$(ticks); threads_snap > "$W/$name.threads1"
    fi
    sleep 0.02
  done
  wait "$LPID"; RC=$?; LPID=""
  [ -n "$t_run" ] || t_run=$(ticks)
  [ -n "$t_done" ] || t_done=$(ticks)
  RAMP_TICKS=$((t_run - t_start)) RUN_TICKS=$((t_done - t_run))
  case $RC in 0) ;; 1) log "  $name: verification failed (rc 1)" ;;
    124|137) log "  $name: timed out after ${lim} s" ;; *) log "  $name: harness rc $RC: $(tail -c 300 "$W/$name.err")" ;; esac
  [ -s "$W/$name.json" ]
}
# Per-shard CPU seconds over the run phase: "min/max" of the shard-* threads (grouped by name).
shard_spread() {
  [ -s "$W/$1.threads0" ] && [ -s "$W/$1.threads1" ] || { echo -; return; }
  awk -v k="$TCK" 'NR == FNR { a[$1] += $2; next } { b[$1] += $2 }
    END { n = 0; for (t in b) if (t ~ /^shard-/) { d = (b[t] - a[t]) / k; if (!n++ || d < mn) mn = d; if (d > mx) mx = d }
          if (n) printf "%.1f/%.1f", mn, mx; else print "-" }' "$W/$1.threads0" "$W/$1.threads1"
}
# Accept-queue overflows and SYN cookies (a storm of connects can overflow a listener's backlog;
# the dropped handshakes are retried after 1 s and stretch the ramp).
listen_drops() { awk '/^TcpExt:/ { if (!h) { for (i = 2; i <= NF; i++) n[i] = $i; h = 1 } else
  for (i = 2; i <= NF; i++) { if (n[i] == "ListenOverflows") o = $i; if (n[i] == "SyncookiesSent") c = $i } }
  END { print o + 0, c + 0 }' /proc/net/netstat 2>/dev/null || echo 0 0; }
budget_left() { echo $((BUDGET_S - (SECONDS - T0))); }

# ---- Summary header -----------------------------------------------------------------------------
{
  echo "# presenced scaling — $(date -u +%FT%TZ)"
  echo
  echo "Machine: $(nproc) CPUs ($NCORES cores x $TPC), $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(uname -sr); open files $NOFILE."
  echo "Server CPUs in shard order: $SERVER_CPUS. Client (harness, $CLIENT_THREADS threads): $CLIENT_CPUS${PIN[0]:+ (taskset)}.${SMT_NOTE:-}"
  echo "Fan-out: $CONNS connections, ring watch $WATCH, flap fraction $FLAP_FRACTION, ${RUN_S} s per step at $FLAP_STEPS flaps/s, --verify; heartbeat ${HEARTBEAT_MS} ms; no per-IP/op limits; history ${HISTORY}${DATADIR[0]:+ (writer thread unpinned, CPU counted in server CPU)}."
  echo "Handshakes: $HS_CONNS connections (HS256, subscribe 1), rate ${HS_RATE} (0 = as fast as possible)."
  echo
  echo "Main table: the fan-out step that delivered the most (normally the top of the ladder; under overload the server coalesces, so deliveries/s is what it sustained); then the best step whose p99 stayed ≤ $P99_MAX_MS ms. Server CPU is over the run phase (run + drain)."
  echo
  echo "| shards | server CPUs | deliveries/s | at flaps/s | p50 / p99 / p99.9 ms | best deliveries/s with p99 ≤ $P99_MAX_MS ms @ flaps/s | handshakes/s | server CPU s | µs server CPU / delivery | per-shard CPU s min/max | client CPU s | verify |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
} > "$SUM"
RUNS_STARTED=1
pack

# ---- The runs -----------------------------------------------------------------------------------
nsh=$(echo "$SHARD_LIST" | wc -w); idx=0
for SH in $SHARD_LIST; do
  idx=$((idx + 1))
  left=$(budget_left)
  slice=$((left / (nsh - idx + 1))); deadline=$((SECONDS + slice))
  cpus=$(server_cpus_for "$SH") START_ERR=""
  log "== $SH shard(s) on CPUs $cpus, ${slice} s"
  if [ "$slice" -lt $((RUN_S + 5)) ]; then
    log "  skipped: budget spent"; echo "| $SH | $cpus | skipped (budget) | | | | | | | | | |" >> "$SUM"; continue
  fi
  ramp_s=$(( CONNS / (RAMP_RATE > 0 ? RAMP_RATE : 20000) + 1 ))
  if start_server "$SH" $((PORT + 10 * idx)) "server-$SH"; then
    for R in $FLAP_STEPS; do
      rem=$((deadline - SECONDS - 8)) # 8 s kept for the handshake run
      lim=$((2 * ramp_s + RUN_S + DRAIN_S + 20)); [ "$lim" -gt "$rem" ] && lim=$rem
      if [ "$lim" -lt $((ramp_s + RUN_S + 3)) ]; then log "  skip $R flaps/s: budget"; echo "$SH $R skipped" >> "$W/steps.tsv"; continue; fi
      name=fanout-$SH-$R
      if harness "$lim" "$name" --scenario churn --connections "$CONNS" --watch "$WATCH" \
          --pattern ring --flap-fraction "$FLAP_FRACTION" --flaps-per-sec "$R" --duration "${RUN_S}s" \
          --rate "$RAMP_RATE" --drain "${DRAIN_S}s" --verify; then
        j=$W/$name.json
        d=$(get "$j" deliveries)
        cpu_us=$(awk -v t="$RUN_TICKS" -v n="$d" -v k="$TCK" 'BEGIN { printf "%.2f", (n > 0 ? t / k * 1e6 / n : 0) }')
        # shards flaps/s deliveries/s p50 p99 p999 max(µs) server_run_cpu_s µs/delivery shard_min/max client_cpu_s verify flaps_sent conns reconnects ramp_s
        line="$SH $R $(int "$(get "$j" deliveries_per_sec)") $(get "$j" fanout_latency_us.p50) $(get "$j" fanout_latency_us.p99) $(get "$j" fanout_latency_us.p999) $(get "$j" fanout_latency_us.max) $(sec "$RUN_TICKS") $cpu_us $(shard_spread "$name") $(f2 "$(get "$j" client_cpu_s)") $(get "$j" verify.passed) $(get "$j" flaps_sent) $(get "$j" connections_established) $(get "$j" reconnects) $(f2 "$(get "$j" ramp_s)")"
        echo "$line" >> "$W/steps.tsv"; log "  $line"
      else
        echo "$SH $R failed rc=$RC" >> "$W/steps.tsv"; log "  $name: no report"
      fi
    done
    metrics $((PORT_NOW + 1)) "$W/metrics-$SH.txt"
    threads_snap > "$W/threads-$SH.txt"
  else
    echo "$SH - server-failed" >> "$W/steps.tsv"
  fi
  # Handshakes on a fresh server.
  name=handshakes-$SH; hs="-"
  rem=$((deadline - SECONDS)); [ "$rem" -lt 8 ] && rem=8
  if start_server "$SH" $((PORT + 10 * idx + 2)) "server-hs-$SH"; then
    lim=$((HS_CONNS / 2000 + 15)); [ "$lim" -gt "$rem" ] && lim=$rem
    read -r lo0 sc0 <<< "$(listen_drops)"
    if harness "$lim" "$name" --scenario storm --connections "$HS_CONNS" --watch 1 --flaps-per-sec 0 \
        --duration 1s --rate "$HS_RATE"; then
      j=$W/$name.json; n=$(get "$j" connections_established)
      hs=$(int "$(get "$j" handshakes_per_sec)")
      read -r lo1 sc1 <<< "$(listen_drops)"
      line="$SH $hs $n $(sec "$RAMP_TICKS") $(awk -v t="$RAMP_TICKS" -v n="$n" -v k="$TCK" 'BEGIN { printf "%.1f", (n > 0 ? t / k * 1e6 / n : 0) }') $(get "$j" handshake_latency_us.p99) $(get "$j" connect_latency_us.p99) $(f2 "$(get "$j" client_cpu_s)") $(f2 "$(get "$j" ramp_s)") $((lo1 - lo0)) $((sc1 - sc0))"
      echo "$line" >> "$W/handshakes.tsv"; log "  handshakes: $line"
    else
      echo "$SH failed rc=$RC" >> "$W/handshakes.tsv"
    fi
    stop_server
  fi
  # The shard count's row: the step that delivered most (the top of the ladder unless it broke),
  # and the best step whose p99 stayed within P99_MAX_MS.
  top=$(awk -v s="$SH" '$1 == s && NF >= 16 && $3 > b { b = $3; l = $0 } END { print l }' "$W/steps.tsv")
  best=$(awk -v s="$SH" -v m="$P99_MAX_MS" '$1 == s && NF >= 16 && $5 <= m * 1000 && $3 > b { b = $3; l = $3 " @ " $2 } END { print l }' "$W/steps.tsv")
  if [ -n "$top" ]; then
    read -r _ r dps p50 p99 p999 _ scpu upd spread ccpu ok _ <<< "$top"
    echo "| $SH | $cpus | $dps | $r | $(ms "$p50") / $(ms "$p99") / $(ms "$p999") | ${best:-none} | $hs | $scpu | $upd | $spread | $ccpu | $ok |" >> "$SUM"
  else
    echo "| $SH | $cpus | failed${START_ERR:+: $START_ERR} | - | - | - | $hs | - | - | - | - | - |" >> "$SUM"
  fi
  pack
done
