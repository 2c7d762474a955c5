#!/usr/bin/env python3
"""Summaries of the profiles behind docs/BENCHMARKS.md "Issue 14".

  profile.py shares FOLDED           the server's CPU by what each stack ends in (the folded
                                     stacks of loadtest/flame.sh: inferno-collapse-perf)
  profile.py heap FOLDED CONNECTIONS the live heap by the deepest presenced function that
                                     allocated it, per connection (loadtest/heap.sh:
                                     heaptrack_print --flamegraph-cost-type leaked)
"""
import collections
import re
import sys

# (category, markers): the first category one of whose markers is in the stack. Order matters:
# a send inside an io_uring submission is a send.
SHARES = [
    ("the history writer thread", None),
    ("sendto (TCP, incl. the receiver side on loopback)", ["sys_sendto"]),
    ("recv", ["sys_recvfrom"]),
    ("io_uring enter/wait (park, submit, cancel)", ["io_uring_enter", "io_cqring_wait"]),
    ("futex", ["futex"]),
    ("membarrier", ["sys_membarrier"]),
    ("eventfd/write", ["eventfd_write", "ksys_write"]),
    ("close", ["sys_close", "__fput"]),
    ("accept", ["accept"]),
]


def folded(path):
    for line in open(path):
        stack, n = line.rstrip("\n").rsplit(" ", 1)
        yield stack, int(n)


def shares(path):
    total = 0
    by = collections.Counter()
    for stack, n in folded(path):
        total += n
        if stack.startswith("history"):
            by[SHARES[0][0]] += n
            continue
        for name, markers in SHARES[1:]:
            if any(m in stack for m in markers):
                by[name] += n
                break
        else:
            kernel = "entry_SYSCALL" in stack
            by["other kernel" if kernel else "user space"] += n
    for name, n in by.most_common():
        print(f"  {100 * n / total:5.1f} %  {name}")


def heap(path, connections):
    total = 0
    by = collections.Counter()
    for stack, n in folded(path):
        total += n
        frames = stack.split(";")
        ours = [f for f in frames if "presenced::" in f and "uarded" not in f]
        if ours:
            key = ours[-1]
        else:
            glommio = [f for f in frames if "glommio" in f]
            key = "glommio: " + glommio[-1] if glommio else frames[-1]
        by[re.sub(r"::h[0-9a-f]{16}", "", key)[:100]] += n
    print(f"  live heap {total / 1e6:.2f} MB, {total / connections:.0f} B per connection")
    for name, n in by.most_common(16):
        print(f"  {n / connections:7.0f} B per connection  {n / 1e6:6.2f} MB  {name}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "shares":
        shares(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "heap":
        heap(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
