#!/usr/bin/env python3
"""Prints the last `cargo bench` run as a Markdown table of ours-vs-baseline ratios.

Reads criterion's `target/criterion/**/new/{benchmark,estimates}.json` (median of the samples).
In each group, a function named `ours…` is paired with every other function of the same
variant (the part after the first `/`, e.g. `2_threads`) and the same parameter (e.g. K).
`baseline/ours` > 1 means ours is faster. Usage: `python3 bench/summary.py [target/criterion]`.
"""

import json
import pathlib
import sys


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


def main():
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
    groups = {}
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        name, _, variant = meta["function_id"].partition("/")
        key = (variant, meta["value_str"] or "")
        per_elem = (meta.get("throughput") or {}).get("Elements")
        groups.setdefault(meta["group_id"], []).append(
            (name, key, est["median"]["point_estimate"], per_elem)
        )
    print("| group | case | ours | baseline | baseline / ours |")
    print("|---|---|---|---|---|")
    for group, rows in sorted(groups.items()):
        for name, key, ours, elems in rows:
            if not name.startswith("ours"):
                continue
            for other, okey, base, _ in rows:
                if other.startswith("ours") or okey != key:
                    continue
                case = "/".join(k for k in key if k) or "-"
                each = f" ({fmt(ours / elems)}/elem)" if elems else ""
                print(
                    f"| {group} | {case} | {name} {fmt(ours)}{each} "
                    f"| {other} {fmt(base)} | **{base / ours:.2f}×** |"
                )


if __name__ == "__main__":
    main()
