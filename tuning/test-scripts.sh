#!/usr/bin/env bash
# test-scripts.sh: tests irq-affinity.sh and check.sh against fake /proc and /sys trees (--root),
# so they need neither root nor particular hardware. Run: tuning/test-scripts.sh
# Exit status 0 when every check passes. Also runs shellcheck on the scripts when it is installed.

set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
IRQ=$HERE/irq-affinity.sh
CHECK=$HERE/check.sh
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PASS=0
FAIL=0
ok() { PASS=$((PASS + 1)); }
bad() { FAIL=$((FAIL + 1)); printf 'FAIL: %s\n' "$*" >&2; }

# file_is PATH WANT: checks a file's content.
file_is() {
    local got
    got=$(<"$1")
    if [[ $got == "$2" ]]; then ok; else bad "$1 holds '$got', wanted '$2'"; fi
}

# expect NAME WANT_RC PATTERN... -- CMD...: runs CMD, checks its exit status and that its combined
# output matches every (extended regex) PATTERN; a PATTERN starting with '!' must not match.
expect() {
    local name=$1 want=$2 rc=0 out p
    shift 2
    local -a pats=()
    while [[ $1 != -- ]]; do pats+=("$1"); shift; done
    shift
    out=$("$@" 2>&1) || rc=$?
    if [[ $rc -ne $want ]]; then
        bad "$name: exit $rc, wanted $want"
        printf '%s\n' "$out" | sed 's/^/    | /' >&2
        return 0
    fi
    for p in "${pats[@]}"; do
        if [[ $p == !* ]]; then
            if grep -Eq -- "${p#!}" <<<"$out"; then bad "$name: output matches '${p#!}'"; else ok; fi
        else
            if grep -Eq -- "$p" <<<"$out"; then ok; else bad "$name: no '$p' in output"; printf '%s\n' "$out" | sed 's/^/    | /' >&2; fi
        fi
    done
    ok
}

# ---------------------------------------------------------------------------------------------
# A fake machine: 40 CPUs, 0-19 on NUMA node 0 and 20-39 on node 1.

R=$WORK/root
mkdir -p "$R/proc/irq" "$R/sys/devices/system/cpu" "$R/sys/class/net" "$R/sys/devices/pci0000:00" "$R/sys/bus/pci/drivers" "$R/sys/bus/virtio/drivers"
echo 0-39 >"$R/sys/devices/system/cpu/online"
echo 0-39 >"$R/sys/devices/system/cpu/possible"
for c in $(seq 0 39); do
    mkdir -p "$R/sys/devices/system/cpu/cpu$c"
    node=$((c < 20 ? 0 : 1))
    mkdir -p "$R/sys/devices/system/node/node$node"
    ln -s "../../node/node$node" "$R/sys/devices/system/cpu/cpu$c/node$node"
done

IRQ_LINES=()
# add_irq NUM NAME: an IRQ with a writable smp_affinity_list.
add_irq() {
    mkdir -p "$R/proc/irq/$1"
    echo 0-39 >"$R/proc/irq/$1/smp_affinity_list"
    echo 0-39 >"$R/proc/irq/$1/effective_affinity_list"
    IRQ_LINES+=("$(printf '%4s:  %8s %8s  IR-PCI-MSIX-0000:00:00.0  %s-edge  %s' "$1" 0 0 "$1" "$2")")
}
# add_queues DIR NRX NTX: queues/rx-*/rps_cpus, queues/tx-*/xps_cpus.
add_queues() {
    local i
    for ((i = 0; i < $2; i++)); do mkdir -p "$1/queues/rx-$i"; echo 0 >"$1/queues/rx-$i/rps_cpus"; done
    for ((i = 0; i < $3; i++)); do mkdir -p "$1/queues/tx-$i"; echo 0 >"$1/queues/tx-$i/xps_cpus"; done
}

# 1. ens1f0: a PCI NIC (mlx5-like names without the interface name) on node 0, 12 queues.
PCI=$R/sys/devices/pci0000:00/0000:3b:00.0
mkdir -p "$PCI/msi_irqs" "$PCI/net/ens1f0" "$R/sys/bus/pci/drivers/mlx5_core"
echo 0 >"$PCI/numa_node"
ln -s ../../../bus/pci/drivers/mlx5_core "$PCI/driver"
ln -s ../../devices/pci0000:00/0000:3b:00.0/net/ens1f0 "$R/sys/class/net/ens1f0"
ln -s ../../../0000:3b:00.0 "$PCI/net/ens1f0/device"
add_queues "$PCI/net/ens1f0" 12 12
add_irq 100 "mlx5_async@pci:0000:3b:00.0"; : >"$PCI/msi_irqs/100"
for q in $(seq 0 11); do add_irq $((101 + q)) "mlx5_comp$q@pci:0000:3b:00.0"; : >"$PCI/msi_irqs/$((101 + q))"; done

# 2. eth1: a platform NIC whose IRQ names carry the interface name; eth10's must not be taken.
PLAT=$R/sys/devices/platform/soc-eth1
mkdir -p "$PLAT/net/eth1" "$PLAT/net/eth10"
ln -s ../../devices/platform/soc-eth1/net/eth1 "$R/sys/class/net/eth1"
ln -s ../../devices/platform/soc-eth1/net/eth10 "$R/sys/class/net/eth10"
ln -s ../../../soc-eth1 "$PLAT/net/eth1/device"
ln -s ../../../soc-eth1 "$PLAT/net/eth10/device"
add_queues "$PLAT/net/eth1" 4 4
add_queues "$PLAT/net/eth10" 1 1
for q in 0 1 2 3; do add_irq $((200 + q)) "eth1-TxRx-$q"; done
add_irq 210 "eth10-TxRx-0"

# 3. eth0: virtio_net (virtio3) with 4 queue pairs, and a config vector that is not a queue.
VPCI=$R/sys/devices/pci0000:00/0000:00:03.0
mkdir -p "$VPCI/virtio3/net/eth0" "$R/sys/bus/virtio/drivers/virtio_net"
echo -1 >"$VPCI/numa_node"
ln -s ../../../../bus/virtio/drivers/virtio_net "$VPCI/virtio3/driver"
ln -s ../../devices/pci0000:00/0000:00:03.0/virtio3/net/eth0 "$R/sys/class/net/eth0"
ln -s ../../../virtio3 "$VPCI/virtio3/net/eth0/device"
add_queues "$VPCI/virtio3/net/eth0" 4 4
add_irq 300 "virtio3-config"
for q in 0 1 2 3; do add_irq $((301 + 2 * q)) "virtio3-input.$q"; add_irq $((302 + 2 * q)) "virtio3-output.$q"; done

# 4. veth0: virtual, one queue pair. 5. bond0 over eth1.
mkdir -p "$R/sys/devices/virtual/net/veth0" "$R/sys/devices/virtual/net/bond0/bonding"
ln -s ../../devices/virtual/net/veth0 "$R/sys/class/net/veth0"
ln -s ../../devices/virtual/net/bond0 "$R/sys/class/net/bond0"
add_queues "$R/sys/devices/virtual/net/veth0" 1 1
add_queues "$R/sys/devices/virtual/net/bond0" 16 16
ln -s ../../../platform/soc-eth1/net/eth1 "$R/sys/devices/virtual/net/bond0/lower_eth1"

{
    printf '            %s\n' "CPU0       CPU1"
    printf '%s\n' "${IRQ_LINES[@]}"
    printf '%s\n' "NMI:          0          0   Non-maskable interrupts"
    printf '%s\n' "LOC:     421861     436532   Local timer interrupts"
} >"$R/proc/interrupts"

# ---------------------------------------------------------------------------------------------
# irq-affinity.sh

expect "pci: detects the MSI-X vectors, pins queues round-robin, 2-word masks" 0 \
    "MSI/MSI-X vectors of PCI function 0000:3b:00.0" \
    "pinning 13 to CPUs 0,1,2,3" \
    "IRQ 101 \(mlx5_comp0@pci:0000:3b:00.0\) -> CPU 0" \
    "IRQ 102 \(mlx5_comp1@pci:0000:3b:00.0\) -> CPU 1" \
    "IRQ 105 \(mlx5_comp4@pci:0000:3b:00.0\) -> CPU 0" \
    "IRQ 100 \(mlx5_async@pci:0000:3b:00.0\) -> CPU 0" \
    "RPS \(auto\): 12 rx queue\(s\), 4 IRQ CPU\(s\): off" \
    "would write '00000000,00000000' > .*/queues/rx-11/rps_cpus" \
    "XPS: 12 tx queues, 40 CPUs" \
    "tx-0 <- CPUs 4,16,28" \
    "would write '00000000,10010011' > .*/queues/tx-0/xps_cpus" \
    "dry run: 37 write\(s\) listed" \
    "NUMA node 0" \
    "!warning: IRQ CPU" \
    -- "$IRQ" --root "$R" --iface ens1f0 --irq-cpus 0-3 --shard-cpus 4-39

expect "pci: an IRQ CPU on the other NUMA node is flagged" 0 \
    "IRQ CPU 20 is not on the NIC's NUMA node 0" \
    -- "$IRQ" --root "$R" --iface ens1f0 --irq-cpus 0,20 --shard-cpus 1-19

expect "names: eth1's IRQs by name, not eth10's; rps auto on with fewer queues than IRQ CPUs" 0 \
    "IRQ names containing 'eth1' as a word" \
    "pinning 4 to CPUs" \
    "!eth10-TxRx" \
    "IRQ 203 \(eth1-TxRx-3\) -> CPU 9" \
    "RPS \(auto\): 4 rx queue\(s\), 8 IRQ CPU\(s\): spread" \
    "would write '00000000,00303303' > .*/eth1/queues/rx-0/rps_cpus" \
    -- "$IRQ" --root "$R" --iface eth1 --irq-cpus 0-1,12-13,8-9,20-21 --shard-cpus 2-7

expect "virtio: input.K and output.K share a CPU, config vector left alone" 0 \
    "virtio_net queue vectors of virtio3" \
    "pinning 8 to CPUs 0,1" \
    "IRQ 301 \(virtio3-input.0\) -> CPU 0" \
    "IRQ 302 \(virtio3-output.0\) -> CPU 0" \
    "IRQ 303 \(virtio3-input.1\) -> CPU 1" \
    "IRQ 308 \(virtio3-output.3\) -> CPU 1" \
    "!virtio3-config" \
    "NUMA node unknown" \
    -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 0,1 --shard-cpus 2-39

expect "--irq-match overrides detection" 0 \
    "names matching" "pinning 1 to CPUs 5" "IRQ 300 \(virtio3-config\) -> CPU 5" \
    -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 5 --irq-match '^virtio3-config$'

expect "veth: no IRQs is not an error; single queue: no XPS" 0 \
    "virtual device" "only RPS/XPS apply" \
    "XPS: veth0 has 1 tx queue\(s\)" \
    -- "$IRQ" --root "$R" --iface veth0 --irq-cpus 0

expect "bond: points at the lower devices" 0 \
    "bond0 sits on eth1: run this script for each of those" \
    -- "$IRQ" --root "$R" --iface bond0 --irq-cpus 0,1

expect "--rps on / --xps off" 0 \
    "RPS \(on\)" "would write '00000000,00000003' > .*/ens1f0/queues/rx-0/rps_cpus" \
    "XPS: off" "!xps_cpus" \
    -- "$IRQ" --root "$R" --iface ens1f0 --irq-cpus 0,1 --rps on --xps off

# Input validation: all exit 2 and write nothing.
expect "overlap" 2 "in both --irq-cpus and --shard-cpus" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 0-3 --shard-cpus 3-8
expect "offline CPU" 2 "--irq-cpus: CPU 40 is not online" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 40
expect "bad list" 2 "not a CPU list" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 3-1
expect "bad list 2" 2 "not a CPU list" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus "0,,1"
expect "unknown iface" 2 "no interface 'eth9'" -- "$IRQ" --root "$R" --iface eth9 --irq-cpus 0
expect "bad iface" 2 "not a valid interface name" -- "$IRQ" --root "$R" --iface ../x --irq-cpus 0
expect "missing iface" 2 "--iface is required" -- "$IRQ" --root "$R" --irq-cpus 0
expect "bad mode" 2 "--xps must be on or off" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 0 --xps auto
expect "bad regex" 2 "not a valid extended regex" -- "$IRQ" --root "$R" --iface eth0 --irq-cpus 0 --irq-match '(['
expect "help" 0 "Usage: irq-affinity.sh" "--dry-run" "--apply" -- "$IRQ" --help

# Dry run changed nothing.
if [[ $(<"$R/proc/irq/101/smp_affinity_list") == 0-39 && $(<"$PCI/net/ens1f0/queues/tx-0/xps_cpus") == 0 ]]; then ok; else bad "dry run wrote something"; fi

# --apply against the fake tree (allowed without root because --root is set).
mkdir -p "$R/proc/4242" && echo irqbalance >"$R/proc/4242/comm"
expect "apply writes, warns about irqbalance" 0 \
    "wrote '1' > .*/proc/irq/102/smp_affinity_list" \
    "irqbalance is running" "IRQBALANCE_BANNED_CPULIST=2-39|IRQBALANCE_BANNED_CPULIST=2,3" \
    "applied: 37 write" \
    -- "$IRQ" --root "$R" --iface ens1f0 --irq-cpus 0,1 --shard-cpus 2-39 --apply
file_is "$R/proc/irq/100/smp_affinity_list" 0   # mlx5_async: no queue number, first IRQ CPU
file_is "$R/proc/irq/102/smp_affinity_list" 1   # mlx5_comp1
file_is "$R/proc/irq/112/smp_affinity_list" 1   # mlx5_comp11
file_is "$PCI/net/ens1f0/queues/rx-3/rps_cpus" 00000000,00000000
# tx-0 gets shard CPUs 2,14,26,38 -> bits 2,14,26 in word 0 and bit 6 in word 1.
file_is "$PCI/net/ens1f0/queues/tx-0/xps_cpus" 00000040,04004004
# The effective affinity in the fake tree did not follow: the script must say so.
expect "apply verifies effective affinity" 0 "effective affinity is '0-39', not 0" \
    -- "$IRQ" --root "$R" --iface eth1 --irq-cpus 0 --apply

# A write that fails (a managed IRQ answers EIO; here: a directory) -> exit 1, others still done.
rm "$R/proc/irq/201/smp_affinity_list" && mkdir "$R/proc/irq/201/smp_affinity_list"
expect "dry run does not stumble on it" 0 "would write '1' > .*/proc/irq/201/smp_affinity_list" \
    -- "$IRQ" --root "$R" --iface eth1 --irq-cpus 0,1
expect "apply reports failed writes" 1 "writing '1' to .*/proc/irq/201/smp_affinity_list failed" "1 failed write" \
    -- "$IRQ" --root "$R" --iface eth1 --irq-cpus 0,1 --apply
file_is "$R/proc/irq/203/smp_affinity_list" 1   # still written after the failure

# ---------------------------------------------------------------------------------------------
# check.sh (read-only)

if [[ -x $CHECK ]]; then
    mkdir -p "$R/proc/sys/net/core" "$R/proc/sys/net/ipv4" "$R/proc/sys/fs" "$R/proc/sys/vm" "$R/proc/sys/kernel" "$R/proc/net" "$R/proc/self"
    while read -r key value; do
        mkdir -p "$R/proc/sys/$(dirname "${key//.//}")"
        printf '%s\n' "$value" >"$R/proc/sys/${key//.//}"
    done <<'EOF'
net.core.somaxconn 4096
net.ipv4.tcp_max_syn_backlog 2048
net.ipv4.tcp_syncookies 1
fs.file-max 9223372036854775807
fs.nr_open 1048576
net.ipv4.ip_local_port_range 32768	60999
net.ipv4.tcp_rmem 4096	131072	6291456
net.ipv4.tcp_wmem 4096	16384	4194304
net.ipv4.tcp_mem 287901	383868	575802
net.core.netdev_max_backlog 1000
net.ipv4.tcp_tw_reuse 2
net.ipv4.tcp_fin_timeout 60
net.ipv4.tcp_orphan_retries 0
net.ipv4.tcp_slow_start_after_idle 1
net.ipv4.tcp_notsent_lowat 4294967295
kernel.io_uring_disabled 0
EOF
    printf 'sockets: used 16\nTCP: inuse 2 orphan 0 tw 0 alloc 2 mem 0\n' >"$R/proc/net/sockstat"
    printf 'Max open files            1024                 524288               files     \nMax locked memory         8388608              8388608              bytes     \n' >"$R/proc/self/limits"
    expect "check: differences shown, exit 0 without --strict" 0 \
        "net.core.somaxconn +4096 +4096 +ok" \
        "fs.file-max +9223372036854775807 +8388608 +ok \(higher\)" \
        "net.ipv4.tcp_rmem +4096 131072 6291456 +4096 16384 262144 +DIFFERS" \
        "net.ipv4.tcp_fin_timeout +60 +15 +DIFFERS" \
        "kernel.io_uring_disabled = 0 .*ok" \
        "!memory pressure" \
        "open files.*1024" \
        -- "$CHECK" --root "$R" --pid self
    expect "check: --strict exits 1 on differences" 1 "DIFFERS" -- "$CHECK" --root "$R" --pid self --strict
    expect "check: bad pid" 2 "no process" -- "$CHECK" --root "$R" --pid 999999
    echo 2 >"$R/proc/sys/kernel/io_uring_disabled"
    printf 'sockets: used 16\nTCP: inuse 2 orphan 0 tw 0 alloc 2 mem 400000\n' >"$R/proc/net/sockstat"
    expect "check: io_uring off and TCP memory pressure are flagged" 0 \
        "io_uring is off" "TCP is in memory pressure" \
        -- "$CHECK" --root "$R" --pid self
else
    bad "check.sh missing or not executable"
fi

# ---------------------------------------------------------------------------------------------

if command -v shellcheck >/dev/null; then
    if shellcheck "$IRQ" "$CHECK" "$0"; then ok; else bad "shellcheck"; fi
else
    echo "shellcheck not installed; skipped"
fi

printf '%d checks passed, %d failed\n' "$PASS" "$FAIL"
[[ $FAIL -eq 0 ]]
