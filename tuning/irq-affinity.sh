#!/usr/bin/env bash
# irq-affinity.sh: keep a NIC's interrupt and softirq work on dedicated IRQ CPUs, off the
# presenced shard CPUs. See tuning/README.md ("IRQs, RPS and XPS").
#
#   tuning/irq-affinity.sh --iface eth0 --irq-cpus 0,1 --shard-cpus 2-15            # dry run
#   sudo tuning/irq-affinity.sh --iface eth0 --irq-cpus 0,1 --shard-cpus 2-15 --apply
#
# Dry run is the default: it prints every write it would make and changes nothing.
# Run with --help for the options. Exit status: 0 done (or nothing to do), 1 some write
# failed, 2 bad usage or input.

set -euo pipefail

PROG=${0##*/}

usage() {
    cat <<EOF
Usage: $PROG --iface IFACE --irq-cpus LIST [options]

Pins IFACE's interrupts to the IRQ CPUs (queue k -> k-th IRQ CPU, round-robin), sets RPS
(queues/rx-*/rps_cpus) and XPS (queues/tx-*/xps_cpus). CPU lists use the kernel's syntax:
"0,1", "2-15", "0-1,8-9".

Required:
  --iface IFACE        network interface (a physical or virtio NIC; for a bond/VLAN run it once
                       per lower device)
  --irq-cpus LIST      CPUs that take the NIC's interrupts and softirq work

Options:
  --shard-cpus LIST    CPUs running presenced shards (default: every online CPU that is not an
                       IRQ CPU). Must not overlap --irq-cpus.
  --rps auto|on|off    rps_cpus of every rx queue. on: the IRQ CPUs, so softirq work stays there
                       but spreads over all of them; off: 0 (no RPS); auto (default): on when the
                       NIC has fewer rx queues than IRQ CPUs (e.g. a single-queue virtio NIC),
                       otherwise off (hardware RSS already spreads, RPS would only add IPIs).
  --xps on|off         xps_cpus of every tx queue (default on): each online CPU sends on one
                       queue, shard CPUs first so shards get queues of their own. Skipped on
                       single-queue devices, where the kernel has no XPS.
  --irq-match REGEX    take the IRQs whose name in /proc/interrupts matches this extended regex,
                       instead of detecting them (for drivers this script does not know)
  --dry-run            print what would be written, change nothing (the default)
  --apply              write the settings (needs root, unless --root points elsewhere)
  --root DIR           prefix for /proc and /sys, for testing against a fake tree
  -h, --help           this text

Detection of the NIC's IRQs, first that applies: --irq-match; virtio_net: "virtioN-input.K" and
"virtioN-output.K"; a PCI NIC: the vectors in /sys/class/net/IFACE/device/msi_irqs; otherwise
IRQ names containing IFACE as a word. No IRQs found (veth, lo, bridge, Hyper-V netvsc, ...):
only RPS/XPS are set, and that is not an error.

Not persistent: a reboot, driver reload, link reset or "ethtool -L" can reallocate IRQs. Run it
again from a unit ordered after the network is up, and stop irqbalance or ban the shard CPUs in
it (IRQBALANCE_BANNED_CPULIST), or it will move the IRQs back.
EOF
}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
info() { printf '%s\n' "$*"; }

# ---------------------------------------------------------------------------------------------
# Arguments

IFACE=""
IRQ_LIST=""
SHARD_LIST=""
RPS_MODE="auto"
XPS_MODE="on"
IRQ_MATCH=""
APPLY=0
ROOT=""

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --iface) need_value "$@"; IFACE=$2; shift 2 ;;
        --irq-cpus) need_value "$@"; IRQ_LIST=$2; shift 2 ;;
        --shard-cpus) need_value "$@"; SHARD_LIST=$2; shift 2 ;;
        --rps) need_value "$@"; RPS_MODE=$2; shift 2 ;;
        --xps) need_value "$@"; XPS_MODE=$2; shift 2 ;;
        --irq-match) need_value "$@"; IRQ_MATCH=$2; shift 2 ;;
        --root) need_value "$@"; ROOT=${2%/}; shift 2 ;;
        --apply) APPLY=1; shift ;;
        --dry-run) APPLY=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -n $IFACE ]] || die "--iface is required (see --help)"
[[ -n $IRQ_LIST ]] || die "--irq-cpus is required (see --help)"
case $RPS_MODE in auto|on|off) ;; *) die "--rps must be auto, on or off" ;; esac
case $XPS_MODE in on|off) ;; *) die "--xps must be on or off" ;; esac
# Interface names: at most 15 bytes, no '/', no whitespace (IFNAMSIZ and dev_valid_name()).
[[ ${#IFACE} -le 15 && $IFACE =~ ^[A-Za-z0-9_.:@-]+$ && $IFACE != . && $IFACE != .. ]] \
    || die "'$IFACE' is not a valid interface name"
if [[ -n $ROOT ]]; then
    [[ -d $ROOT ]] || die "--root $ROOT is not a directory"
fi
if [[ -n $IRQ_MATCH ]]; then
    # Reject a regex that cannot compile now, not halfway through. grep -E and bash's =~ both use
    # the C library's POSIX extended regex; grep exits 2 (not 1, "no match") when it cannot compile.
    status=0
    grep -qE -- "$IRQ_MATCH" </dev/null 2>/dev/null || status=$?
    [[ $status -le 1 ]] || die "--irq-match '$IRQ_MATCH' is not a valid extended regex"
fi

PROC=$ROOT/proc
SYS=$ROOT/sys
NETDIR=$SYS/class/net/$IFACE

if [[ $APPLY -eq 1 && -z $ROOT && $EUID -ne 0 ]]; then
    die "--apply writes to /proc/irq and /sys: run it as root (or without --apply for a dry run)"
fi
[[ -d $NETDIR ]] || die "no interface '$IFACE' (no $NETDIR); see 'ip -o link'"

# ---------------------------------------------------------------------------------------------
# CPU lists

# parse_cpulist LIST: prints the CPUs one per line, sorted, without duplicates.
parse_cpulist() {
    local list=$1 part a b c
    local -a parts=()
    [[ $list =~ ^[0-9]{1,5}(-[0-9]{1,5})?(,[0-9]{1,5}(-[0-9]{1,5})?)*$ ]] || return 1
    {
        IFS=, read -ra parts <<<"$list"
        for part in "${parts[@]}"; do
            if [[ $part == *-* ]]; then
                a=$((10#${part%-*})); b=$((10#${part#*-}))
                [[ $a -le $b ]] || return 1
                for ((c = a; c <= b; c++)); do echo "$c"; done
            else
                echo "$((10#$part))"
            fi
        done
    } | sort -n -u
}

# join_by SEP ITEMS...: prints the items joined by SEP.
join_by() {
    local sep=$1 out="" item
    shift
    for item in "$@"; do out+=${out:+$sep}$item; done
    printf '%s' "$out"
}

ONLINE_FILE=$SYS/devices/system/cpu/online
[[ -r $ONLINE_FILE ]] || die "cannot read $ONLINE_FILE"
mapfile -t ONLINE < <(parse_cpulist "$(tr -d '[:space:]' <"$ONLINE_FILE")") \
    || die "cannot parse $ONLINE_FILE"
[[ ${#ONLINE[@]} -gt 0 ]] || die "no online CPUs in $ONLINE_FILE"
declare -A IS_ONLINE=()
for c in "${ONLINE[@]}"; do IS_ONLINE[$c]=1; done

# cpus_from LIST NAME FLAG: parses a user-given list into the array NAME, checking every CPU is
# online.
cpus_from() {
    local list=$1 name=$2 flag=$3 c parsed
    parsed=$(parse_cpulist "$list") || die "$flag: '$list' is not a CPU list like 0,1 or 2-15"
    local -n _cpus_out=$name
    mapfile -t _cpus_out <<<"$parsed"
    for c in "${_cpus_out[@]}"; do
        [[ -n ${IS_ONLINE[$c]:-} ]] || die "$flag: CPU $c is not online (online: $(tr -d '[:space:]' <"$ONLINE_FILE"))"
    done
}

IRQ_CPUS=()
SHARD_CPUS=()
cpus_from "$IRQ_LIST" IRQ_CPUS --irq-cpus
declare -A IS_IRQ=()
for c in "${IRQ_CPUS[@]}"; do IS_IRQ[$c]=1; done
if [[ -n $SHARD_LIST ]]; then
    cpus_from "$SHARD_LIST" SHARD_CPUS --shard-cpus
    for c in "${SHARD_CPUS[@]}"; do
        [[ -z ${IS_IRQ[$c]:-} ]] || die "CPU $c is in both --irq-cpus and --shard-cpus; keep them apart"
    done
else
    for c in "${ONLINE[@]}"; do
        [[ -n ${IS_IRQ[$c]:-} ]] || SHARD_CPUS+=("$c")
    done
fi
[[ ${#SHARD_CPUS[@]} -gt 0 ]] || warn "no shard CPUs left: every online CPU is an IRQ CPU"

# Width of a CPU bitmap: the kernel's nr_cpu_ids (highest possible CPU + 1).
MAX_CPU=${ONLINE[-1]}
if [[ -r $SYS/devices/system/cpu/possible ]]; then
    if possible=$(parse_cpulist "$(tr -d '[:space:]' <"$SYS/devices/system/cpu/possible")"); then
        MAX_CPU=$(tail -n1 <<<"$possible")
    fi
fi

# cpumask CPUS...: the kernel's bitmap format for rps_cpus/xps_cpus: 32-bit hex words, most
# significant first, separated by commas ("00000000,0000000c" for CPUs 2 and 3). Works for any
# number of CPUs (no 64-bit arithmetic overflow).
cpumask() {
    local words=$((MAX_CPU / 32 + 1)) i c mask=""
    local -a w=()
    for ((i = 0; i < words; i++)); do w[i]=0; done
    for c in "$@"; do w[c/32]=$((w[c/32] | (1 << (c % 32)))); done
    for ((i = words - 1; i >= 0; i--)); do mask+=${mask:+,}$(printf '%08x' "${w[i]}"); done
    printf '%s' "$mask"
}

# ---------------------------------------------------------------------------------------------
# Writes

FAILED=0
WRITES=0

# put VALUE PATH: writes VALUE to PATH, or says it would.
put() {
    local value=$1 path=$2 now="?"
    [[ -r $path ]] && now=$(tr -d '\n' <"$path" 2>/dev/null || echo "?")
    WRITES=$((WRITES + 1))
    if [[ $APPLY -eq 0 ]]; then
        info "  would write '$value' > $path   (now: ${now:-empty})"
        return 0
    fi
    if [[ ! -e $path ]]; then
        warn "$path does not exist; skipped"
        FAILED=$((FAILED + 1))
        return 0
    fi
    if (printf '%s\n' "$value" >"$path") 2>/dev/null; then
        info "  wrote '$value' > $path   (was: ${now:-empty})"
    else
        # EIO on /proc/irq/N/smp_affinity_list means a kernel-managed IRQ, whose affinity the
        # driver fixes; ENOSPC means the target CPUs ran out of interrupt vectors.
        warn "writing '$value' to $path failed"
        FAILED=$((FAILED + 1))
    fi
}

# ---------------------------------------------------------------------------------------------
# The NIC

DRIVER=""
[[ -L $NETDIR/device/driver ]] && DRIVER=$(basename "$(readlink "$NETDIR/device/driver")")
DEVNAME=""
[[ -L $NETDIR/device ]] && DEVNAME=$(basename "$(readlink "$NETDIR/device")")

RXQ=()
TXQ=()
for q in "$NETDIR"/queues/rx-*; do [[ -d $q ]] && RXQ+=("$q"); done
for q in "$NETDIR"/queues/tx-*; do [[ -d $q ]] && TXQ+=("$q"); done
# Numeric order (rx-10 after rx-9).
sort_queues() { printf '%s\n' "$@" | sort -V; }
if [[ ${#RXQ[@]} -gt 1 ]]; then mapfile -t RXQ < <(sort_queues "${RXQ[@]}"); fi
if [[ ${#TXQ[@]} -gt 1 ]]; then mapfile -t TXQ < <(sort_queues "${TXQ[@]}"); fi

NUMA_NODE=""
[[ -r $NETDIR/device/numa_node ]] && NUMA_NODE=$(<"$NETDIR/device/numa_node")
# virtio devices hang below their PCI function; the node is there.
[[ -z $NUMA_NODE && -r $NETDIR/device/../numa_node ]] && NUMA_NODE=$(<"$NETDIR/device/../numa_node")

# IRQ number -> name, from /proc/interrupts (lines "  38:  0  2465  PCI-MSIX-0000:00:03.0  1-edge  virtio2-input.0").
INTERRUPTS=$PROC/interrupts
[[ -r $INTERRUPTS ]] || die "cannot read $INTERRUPTS"
declare -A IRQ_NAME=()
while read -r num name; do
    IRQ_NAME[$num]=$name
done < <(awk '$1 ~ /^[0-9]+:$/ && NF >= 3 { sub(/:$/, "", $1); print $1, $NF }' "$INTERRUPTS")

IRQS=()
HOW=""
if [[ -n $IRQ_MATCH ]]; then
    HOW="names matching /$IRQ_MATCH/"
    for n in "${!IRQ_NAME[@]}"; do
        [[ ${IRQ_NAME[$n]} =~ $IRQ_MATCH ]] && IRQS+=("$n")
    done
elif [[ ! -e $NETDIR/device ]]; then
    HOW="$IFACE is a virtual device (no device in sysfs)"
elif [[ $DRIVER == virtio_net && $DEVNAME == virtio* ]]; then
    HOW="virtio_net queue vectors of $DEVNAME"
    for n in "${!IRQ_NAME[@]}"; do
        [[ ${IRQ_NAME[$n]} =~ ^${DEVNAME}-(input|output)\.[0-9]+$ ]] && IRQS+=("$n")
    done
elif [[ -d $NETDIR/device/msi_irqs ]]; then
    HOW="MSI/MSI-X vectors of PCI function $DEVNAME"
    for f in "$NETDIR"/device/msi_irqs/*; do
        n=${f##*/}
        [[ $n =~ ^[0-9]+$ && -n ${IRQ_NAME[$n]:-} ]] && IRQS+=("$n")
    done
else
    HOW="IRQ names containing '$IFACE' as a word"
    esc=${IFACE//./\\.}  # the name's only regex-special character is '.' (validated above)
    for n in "${!IRQ_NAME[@]}"; do
        [[ ${IRQ_NAME[$n]} =~ (^|[^A-Za-z0-9])${esc}([^A-Za-z0-9]|$) ]] && IRQS+=("$n")
    done
fi
if [[ ${#IRQS[@]} -gt 1 ]]; then mapfile -t IRQS < <(printf '%s\n' "${IRQS[@]}" | sort -n); fi

[[ $NUMA_NODE == -1 ]] && NUMA_NODE=""
info "interface:   $IFACE (driver ${DRIVER:-none}, device ${DEVNAME:-none}, NUMA node ${NUMA_NODE:-unknown})"
info "queues:      ${#RXQ[@]} rx, ${#TXQ[@]} tx"
info "online CPUs: $(join_by , "${ONLINE[@]}")"
info "IRQ CPUs:    $(join_by , "${IRQ_CPUS[@]}")"
info "shard CPUs:  $(join_by , "${SHARD_CPUS[@]}")"
info "mode:        $([[ $APPLY -eq 1 ]] && echo apply || echo 'dry run (nothing is written; --apply to write)')"
if [[ -n $NUMA_NODE ]]; then
    for c in "${IRQ_CPUS[@]}"; do
        if [[ -d $SYS/devices/system/cpu/cpu$c && ! -e $SYS/devices/system/cpu/cpu$c/node$NUMA_NODE ]]; then
            warn "IRQ CPU $c is not on the NIC's NUMA node $NUMA_NODE: every packet crosses nodes"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------
# 1. IRQ affinity: queue k -> IRQ_CPUS[k mod n]. The queue number is the number that ends the IRQ
# name, after dropping an "@pci:..." suffix ("eth0-TxRx-3", "virtio2-input.3", "mlx5_comp3@pci:...");
# so a queue's rx and tx vectors share a CPU. Vectors without one (mlx5_async, i40e-...:misc) take
# the IRQ CPUs in turn.

info ""
if [[ ${#IRQS[@]} -eq 0 ]]; then
    info "IRQs: none found ($HOW)."
    if compgen -G "$NETDIR/lower_*" >/dev/null; then
        lowers=()
        for l in "$NETDIR"/lower_*; do lowers+=("${l##*/lower_}"); done
        info "  $IFACE sits on $(join_by ', ' "${lowers[@]}"): run this script for each of those."
    elif compgen -G "$NETDIR/slave_*" >/dev/null || [[ -d $NETDIR/bonding ]]; then
        info "  $IFACE is a bond without lower_* links here: run this script for each slave NIC."
    else
        info "  Normal for veth, lo, bridges, Hyper-V netvsc and other devices without per-queue"
        info "  interrupts: only RPS/XPS apply. Use --irq-match REGEX if this NIC does have some."
    fi
else
    info "IRQs ($HOW): pinning ${#IRQS[@]} to CPUs $(join_by , "${IRQ_CPUS[@]}")"
    unnumbered=0
    for n in "${IRQS[@]}"; do
        name=${IRQ_NAME[$n]}
        base=${name%%@*}
        if [[ $base =~ ([0-9]+)$ ]]; then
            k=$((10#${BASH_REMATCH[1]}))
        else
            k=$unnumbered
            unnumbered=$((unnumbered + 1))
        fi
        cpu=${IRQ_CPUS[k % ${#IRQ_CPUS[@]}]}
        info "  IRQ $n ($name) -> CPU $cpu"
        put "$cpu" "$PROC/irq/$n/smp_affinity_list"
        if [[ $APPLY -eq 1 && -r $PROC/irq/$n/effective_affinity_list ]]; then
            eff=$(tr -d '\n' <"$PROC/irq/$n/effective_affinity_list")
            [[ $eff == "$cpu" ]] || warn "IRQ $n: effective affinity is '$eff', not $cpu (managed IRQ or out of vectors?)"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------
# 2. RPS: which CPUs do the protocol work for packets from each rx queue.

info ""
rps_on=0
case $RPS_MODE in
    on) rps_on=1 ;;
    off) rps_on=0 ;;
    auto) [[ ${#RXQ[@]} -lt ${#IRQ_CPUS[@]} ]] && rps_on=1 ;;
esac
if [[ ${#RXQ[@]} -eq 0 ]]; then
    info "RPS: $IFACE has no rx queues in sysfs; skipped."
else
    if [[ $rps_on -eq 1 ]]; then
        mask=$(cpumask "${IRQ_CPUS[@]}")
        info "RPS ($RPS_MODE): ${#RXQ[@]} rx queue(s), ${#IRQ_CPUS[@]} IRQ CPU(s): spread softirq work over the IRQ CPUs"
    else
        mask=$(cpumask)
        info "RPS ($RPS_MODE): ${#RXQ[@]} rx queue(s), ${#IRQ_CPUS[@]} IRQ CPU(s): off; each queue's softirq runs on its IRQ's CPU"
    fi
    for q in "${RXQ[@]}"; do
        if [[ -e $q/rps_cpus ]]; then
            put "$mask" "$q/rps_cpus"
        else
            info "  ${q##*/}: no rps_cpus (kernel without CONFIG_RPS?); skipped"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------
# 3. XPS: which tx queue each sending CPU uses. CPU i of (shard CPUs, IRQ CPUs, the rest) sends on
# queue i mod #queues, so shards get queues of their own when there are enough.

info ""
if [[ $XPS_MODE == off ]]; then
    info "XPS: off (--xps off); tx queues left as they are."
elif [[ ${#TXQ[@]} -lt 2 ]]; then
    info "XPS: $IFACE has ${#TXQ[@]} tx queue(s); the kernel only does XPS on multiqueue devices. Skipped."
else
    declare -A seen=()
    order=()
    for c in "${SHARD_CPUS[@]}" "${IRQ_CPUS[@]}" "${ONLINE[@]}"; do
        [[ -n ${seen[$c]:-} ]] && continue
        seen[$c]=1
        order+=("$c")
    done
    info "XPS: ${#TXQ[@]} tx queues, ${#order[@]} CPUs"
    for ((qi = 0; qi < ${#TXQ[@]}; qi++)); do
        members=()
        for ((i = qi; i < ${#order[@]}; i += ${#TXQ[@]})); do members+=("${order[i]}"); done
        q=${TXQ[qi]}
        info "  ${q##*/} <- CPUs $(join_by , "${members[@]}")"
        if [[ -e $q/xps_cpus ]]; then
            put "$(cpumask "${members[@]}")" "$q/xps_cpus"
        else
            info "  ${q##*/}: no xps_cpus; skipped"
        fi
    done
fi

# ---------------------------------------------------------------------------------------------

info ""
irqbalance_running() {
    local comm
    for comm in "$PROC"/[0-9]*/comm; do
        [[ $(cat "$comm" 2>/dev/null) == irqbalance ]] && return 0
    done
    return 1
}
if irqbalance_running; then
    warn "irqbalance is running and will move these IRQs again: stop it, or set"
    warn "IRQBALANCE_BANNED_CPULIST=$(join_by , "${SHARD_CPUS[@]}") in its environment file (irqbalance >= 1.8)"
fi

if [[ $APPLY -eq 0 ]]; then
    info "dry run: $WRITES write(s) listed, nothing changed. Add --apply (as root) to write them."
elif [[ $FAILED -gt 0 ]]; then
    info "applied with $FAILED failed write(s) out of $WRITES (see warnings)."
    exit 1
else
    info "applied: $WRITES write(s)."
fi
