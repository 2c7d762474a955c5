#!/usr/bin/env bash
# Builds release binaries of presenced and presenced-loadtest and copies them, stripped, into
# target/scaling-bin/ (or $BIN) for loadtest/scaling.sh on a machine without a Rust toolchain.
#
#   loadtest/scaling-prep.sh          # then carry target/scaling-bin to the other machine
#
# The binaries link glibc dynamically: they need a glibc at least as new as the newest symbol
# version printed below, or the copy of this machine's glibc bundled in lib/ (scaling.sh uses it
# when the binaries do not run directly).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/scaling-bin}
LIMIT_MIB=${LIMIT_MIB:-60}

cargo build --release -q -p presenced -p presenced-loadtest
mkdir -p "$BIN"
for b in presenced presenced-loadtest; do
  rm -f "$BIN/$b"
  cp "target/release/$b" "$BIN/$b"
  strip "$BIN/$b"
  chmod 0755 "$BIN/$b"
done
# The glibc these were linked against, for a machine whose own is older: scaling.sh falls back to
# running them through this loader (lib/ld-linux-x86-64.so.2 --library-path lib).
rm -rf "${BIN:?}/lib"; mkdir -p "$BIN/lib"
for lib in $(ldd "$BIN/presenced" "$BIN/presenced-loadtest" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u); do
  cp -L "$lib" "$BIN/lib/"
done
"$BIN/lib/"ld-linux-x86-64.so.2 --library-path "$BIN/lib" "$BIN/presenced-loadtest" --version > /dev/null ||
  { echo "the bundled loader does not run the harness" >&2; exit 1; }
"$BIN/presenced" serve --help | grep -q -- '--cpus' || { echo "presenced serve has no --cpus" >&2; exit 1; }
"$BIN/presenced-loadtest" --version
(cd "$BIN" && sha256sum presenced presenced-loadtest lib/* > SHA256SUMS)

bytes=$(du -cb "$BIN" | awk 'END {print $1}')
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
glibc=$(for b in presenced presenced-loadtest; do objdump -T "$BIN/$b" 2>/dev/null; done |
  grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)
echo "$BIN: $(cd "$BIN" && ls -d presenced presenced-loadtest SHA256SUMS lib/* | tr '\n' ' ')— $mib MiB in all (limit $LIMIT_MIB MiB); needs ${glibc:-glibc ?} (or the bundled lib/)"
dirty=$(git status --porcelain -- src loadtest/src Cargo.toml Cargo.lock loadtest/Cargo.toml 2>/dev/null | wc -l)
echo "built from $(git rev-parse --short HEAD 2>/dev/null)$([ "$dirty" -eq 0 ] || echo " + $dirty uncommitted/untracked file(s) in src/, loadtest/src/ or the manifests")"
awk -v b="$bytes" -v l="$LIMIT_MIB" 'BEGIN { exit !(b < l * 1048576) }' ||
  { echo "too big: $mib MiB >= $LIMIT_MIB MiB" >&2; exit 1; }
