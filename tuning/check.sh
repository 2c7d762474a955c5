#!/usr/bin/env bash
# check.sh: read-only. Prints the current value of everything tuning/sysctl.conf and
# tuning/limits.conf set, next to the recommended value, plus a few related facts (socket memory
# in use, io_uring availability, connection tracking, irqbalance). Changes nothing.
#
#   tuning/check.sh                 # limits of the running presenced (or of this shell)
#   tuning/check.sh --pid 1234 --strict
#
# Exit status: 0; with --strict, 1 when anything differs from the recommendation; 2 bad usage.

set -euo pipefail

PROG=${0##*/}
HERE=$(cd "$(dirname "$0")" && pwd)

usage() {
    cat <<EOF
Usage: $PROG [--pid PID|self] [--sysctl FILE] [--limits FILE] [--strict] [--root DIR]

  --pid PID     process whose limits to check (default: the running presenced, else this shell)
  --sysctl FILE recommendations to compare with (default: $HERE/sysctl.conf)
  --limits FILE recommendations to compare with (default: $HERE/limits.conf)
  --strict      exit 1 when a value differs from the recommendation
  --root DIR    prefix for /proc, for testing against a fake tree
  -h, --help    this text

"ok (higher)" for fs.file-max, fs.nr_open, net.core.somaxconn, net.ipv4.tcp_max_syn_backlog
and net.core.netdev_max_backlog: for these caps, a higher current value is fine.
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }

PID=""
SYSCTL_FILE=$HERE/sysctl.conf
LIMITS_FILE=$HERE/limits.conf
STRICT=0
ROOT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --pid) [[ $# -ge 2 ]] || die "--pid needs a value"; PID=$2; shift 2 ;;
        --sysctl) [[ $# -ge 2 ]] || die "--sysctl needs a value"; SYSCTL_FILE=$2; shift 2 ;;
        --limits) [[ $# -ge 2 ]] || die "--limits needs a value"; LIMITS_FILE=$2; shift 2 ;;
        --root) [[ $# -ge 2 && -d $2 ]] || die "--root needs a directory"; ROOT=${2%/}; shift 2 ;;
        --strict) STRICT=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ -r $SYSCTL_FILE ]] || die "cannot read $SYSCTL_FILE"
[[ -r $LIMITS_FILE ]] || die "cannot read $LIMITS_FILE"
[[ -z $PID || $PID == self || $PID =~ ^[0-9]+$ ]] || die "--pid must be a number or 'self'"

PROC=$ROOT/proc
DIFFS=0

norm() { tr -s ' \t\n' ' ' <<<"$1" | sed 's/^ //; s/ $//'; }
row() { printf '  %-36s %-28s %-22s %s\n' "$@"; }

# ---------------------------------------------------------------------------------------------
echo "sysctl (recommended: $SYSCTL_FILE)"
row key current recommended status
declare -A AT_LEAST=([fs.file-max]=1 [fs.nr_open]=1 [net.core.somaxconn]=1
    [net.ipv4.tcp_max_syn_backlog]=1 [net.core.netdev_max_backlog]=1)
while IFS= read -r line; do
    line=$(norm "$line")
    [[ -z $line || $line == \#* || $line == \;* || $line != *=* ]] && continue
    key=$(norm "${line%%=*}")
    want=$(norm "${line#*=}")
    key=${key#-}
    file=$PROC/sys/${key//.//}
    if [[ ! -r $file ]]; then
        row "$key" "(absent)" "$want" "MISSING (module not loaded or older kernel?)"
        DIFFS=$((DIFFS + 1))
        continue
    fi
    have=$(norm "$(<"$file")")
    if [[ $have == "$want" ]]; then
        status=ok
    elif [[ -n ${AT_LEAST[$key]:-} && $have =~ ^[0-9]+$ && $want =~ ^[0-9]+$ ]] &&
        { [[ ${#have} -gt ${#want} ]] || [[ ${#have} -eq ${#want} && $have > $want ]]; }; then
        # Compared as digit strings: fs.file-max can exceed bash's 64-bit arithmetic.
        status="ok (higher)"
    else
        status=DIFFERS
        DIFFS=$((DIFFS + 1))
    fi
    row "$key" "$have" "$want" "$status"
done <"$SYSCTL_FILE"

# ---------------------------------------------------------------------------------------------
echo
echo "related (not set by sysctl.conf)"
readv() { if [[ -r $PROC/sys/$1 ]]; then norm "$(<"$PROC/sys/$1")"; else echo "(absent)"; fi; }
tcp_mem=$(readv net/ipv4/tcp_mem)
sock_mem="?"
if [[ -r $PROC/net/sockstat ]]; then
    sock_mem=$(awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' "$PROC/net/sockstat")
    echo "  $(grep '^TCP:' "$PROC/net/sockstat" || true)   (mem: pages of socket buffers)"
fi
echo "  net.ipv4.tcp_mem = $tcp_mem   (low pressure hard, pages; in use now: ${sock_mem:-?})"
pressure=""
[[ $tcp_mem =~ ^[0-9]+\ ([0-9]+)\ [0-9]+$ ]] && pressure=${BASH_REMATCH[1]}
if [[ -n $pressure && $sock_mem =~ ^[0-9]+$ ]] && ((sock_mem >= pressure)); then
    echo "  WARNING: TCP is in memory pressure now (buffer memory above tcp_mem's middle value)"
    DIFFS=$((DIFFS + 1))
fi
[[ -r $PROC/sys/fs/file-nr ]] && echo "  fs.file-nr = $(readv fs/file-nr)   (open files, 0, fs.file-max)"
uring=$(readv kernel/io_uring_disabled)
case $uring in
    0|"(absent)") echo "  kernel.io_uring_disabled = $uring   (ok: io_uring allowed)" ;;
    1) echo "  kernel.io_uring_disabled = 1   (io_uring only for group $(readv kernel/io_uring_group); presenced's user must be in it)" ;;
    *) echo "  kernel.io_uring_disabled = $uring   PROBLEM: io_uring is off and presenced cannot start"; DIFFS=$((DIFFS + 1)) ;;
esac
if [[ -r $PROC/sys/net/netfilter/nf_conntrack_max ]]; then
    echo "  nf_conntrack: $(readv net/netfilter/nf_conntrack_count) of $(readv net/netfilter/nf_conntrack_max) entries in use" \
        "(loaded: every tracked connection takes one; see README, \"Connection tracking\")"
else
    echo "  nf_conntrack: not loaded (no per-connection tracking cost)"
fi
[[ -r $PROC/sys/vm/max_map_count ]] && echo "  vm.max_map_count = $(readv vm/max_map_count)   (informational; presenced maps per shard, not per connection)"
irqb=no
for comm in "$PROC"/[0-9]*/comm; do
    [[ $(cat "$comm" 2>/dev/null) == irqbalance ]] && { irqb=yes; break; }
done
echo "  irqbalance running: $irqb$([[ $irqb == yes ]] && echo '   (it moves IRQs: ban the shard CPUs or stop it; see README)')"

# ---------------------------------------------------------------------------------------------
echo
if [[ -z $PID ]]; then
    for comm in "$PROC"/[0-9]*/comm; do
        if [[ $(cat "$comm" 2>/dev/null) == presenced ]]; then
            PID=${comm%/comm}
            PID=${PID##*/}
            break
        fi
    done
fi
if [[ -n $PID ]]; then
    [[ -r $PROC/$PID/limits ]] || die "no process $PID (no $PROC/$PID/limits)"
    who="process $PID"
    [[ -r $PROC/$PID/comm ]] && who+=" ($(<"$PROC/$PID/comm"))"
else
    PID=self
    who="this shell (no presenced running; its limits come from its unit or PAM session)"
fi
echo "limits of $who (recommended: $LIMITS_FILE)"

# want ITEM: the first soft value for ITEM in limits.conf.
want() { awk -v item="$1" '$1 !~ /^#/ && $2 ~ /^(soft|-)$/ && $3 == item { print $4; exit }' "$LIMITS_FILE"; }
# lim NAME: "soft hard" from /proc/PID/limits for the line starting with NAME.
lim() { awk -v name="$1" 'index($0, name) == 1 { n = split(substr($0, length(name) + 1), f, " "); print f[1], f[2]; exit }' "$PROC/$PID/limits"; }
# enough HAVE WANT: HAVE >= WANT, "unlimited" counting as infinite.
enough() { [[ $1 == unlimited ]] || { [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ ]] && (($1 >= $2)); }; }

check_limit() {
    local label=$1 name=$2 item=$3 scale=$4 have soft hard w status
    w=$(want "$item")
    have=$(lim "$name")
    soft=${have% *}
    hard=${have#* }
    if [[ -z $w ]]; then
        row "$label" "soft $soft / hard $hard" "(not in limits.conf)" ""
        return
    fi
    [[ $w =~ ^[0-9]+$ ]] && w=$((w * scale))
    if enough "$soft" "$w" && enough "$hard" "$w"; then
        status=ok
    else
        status=LOW
        DIFFS=$((DIFFS + 1))
    fi
    row "$label" "soft $soft / hard $hard" "$w" "$status"
}
row item current recommended status
check_limit "open files (nofile)" "Max open files" nofile 1
check_limit "locked memory (memlock, bytes)" "Max locked memory" memlock 1024

echo
if [[ $DIFFS -eq 0 ]]; then
    echo "everything matches the recommendations"
else
    echo "$DIFFS value(s) differ from the recommendations (a difference can be deliberate: see the reasons in the files)"
    [[ $STRICT -eq 1 ]] && exit 1
fi
exit 0
