#!/usr/bin/env bash
# Runs the storage benchmarks and, on the same disk and in the same run, the dd baseline
# that the flush-always figure is compared with:
#   dd if=/dev/zero of=FILE bs=1M count=1000 conv=fdatasync
# Usage: storage/benches/with-dd-baseline.sh [criterion filter]
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${CONVEYOR_BENCH_DIR:-${TMPDIR:-/tmp}}"
for i in 1 2 3; do
  printf 'dd baseline run %s: ' "$i"
  dd if=/dev/zero of="$dir/conveyor-dd-baseline" bs=1M count=1000 conv=fdatasync 2>&1 | tail -1
  rm -f "$dir/conveyor-dd-baseline"
done
CONVEYOR_BENCH_DIR="$dir" cargo bench -p conveyor-storage --bench log -- "$@"
