#!/usr/bin/env bash
# Compaction figures, with the disk's sequential write bandwidth measured in the same run.
#
#   benches/compaction.sh BIN_DIR [ROUNDS] [RECORDS]
#
# 1. `dd` writes 2 GiB with fdatasync (before and after the rest): the disk's sequential
#    write bandwidth.
# 2. The storage benchmark (`cargo bench -p conveyor-storage --bench compaction`): one
#    cleaning pass over a 2 GiB log of 100-byte values over 1M distinct keys; prints its
#    throughput, the key map's memory and the process's peak memory.
# 3. One broker (BIN_DIR/conveyor-broker, release build, `[cleaner] threads = 0` so that
#    only `topic compact` cleans) with ROUNDS compacted topics of 2 GiB each (17.6M
#    records, 1M keys, 128 MiB segments). Each round runs `bench produce` of RECORDS
#    (default 3,000,000) 100-byte records on a plain topic alone, then again while
#    `topic compact --wait` cleans one of the compacted topics: produce throughput with the
#    cleaner running against without it.
# Uses ports 19392-19393 on 127.0.0.1 and a directory under /work (DIR to change it).
set -u
BIN=$1; ROUNDS=${2:-3}; RECORDS=${3:-3000000}
DIR=${DIR:-/work}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

dd_baseline() {
  dd if=/dev/zero of="$DIR/conveyor-dd.tmp" bs=1M count=2048 conv=fdatasync 2>&1 | tail -1 | sed 's/^/dd: /'
  rm -f "$DIR/conveyor-dd.tmp"
}

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

dd_baseline
(cd "$ROOT" && COMPACTION_BENCH_DIR="$DIR" cargo bench -q -p conveyor-storage --bench compaction 2>&1 | grep -E "^(built|pass|memory)")

d=$(mktemp -d "$DIR/conveyor-compaction.XXXX")
cat >"$d/broker.toml" <<TOML
[broker]
data_dir = "$d/data"
listen = "127.0.0.1:19392"
metrics_listen = "127.0.0.1:19393"
[cleaner]
threads = 0
TOML
"$BIN/conveyor-broker" --config "$d/broker.toml" >"$d/log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$d"' EXIT
wait_port 19392
C=("$BIN/conveyor" --broker 127.0.0.1:19392)
for r in $(seq 1 "$ROUNDS"); do
  "${C[@]}" bench produce --topic "compacted-$r" --records 17640000 --keys 1000000 --record-size 100 \
    --config cleanup.policy=compact --config segment.bytes=134217728 2>&1 | grep -E "records/s" | sed "s/^/fill compacted-$r: /"
done
for r in $(seq 1 "$ROUNDS"); do
  "${C[@]}" bench produce --topic plain --records "$RECORDS" --record-size 100 2>&1 | grep -E "records/s" | sed "s/^/round $r without cleaner: /"
  "${C[@]}" topic compact "compacted-$r" --wait --output json >"$d/compact-$r.json" &
  cpid=$!
  "${C[@]}" bench produce --topic plain --records "$RECORDS" --record-size 100 2>&1 | grep -E "records/s" | sed "s/^/round $r with cleaner:    /"
  if kill -0 $cpid 2>/dev/null; then still="(still compacting when produce ended)"; else still="(compaction ended before produce did)"; fi
  wait $cpid
  echo "round $r compaction $still: $(tr -d '\n ' <"$d/compact-$r.json" | head -c 400)"
done
dd_baseline
