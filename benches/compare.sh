#!/usr/bin/env bash
# Produce throughput of two builds, alternating in one run (this machine is noisy: compare
# medians and ranges, never one run).
#
#   benches/compare.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [RECORDS]
#
# Each *_BIN_DIR holds release `conveyor-broker` and `conveyor` binaries. Every round runs,
# for old then new: one broker with a 3-partition topic, then three brokers
# (config/cluster-3.toml) with a 3-partition topic at replication factor 3; each run starts
# from empty data directories and produces RECORDS records of 100 bytes with acks=all.
# MODE=single or MODE=cluster runs only one of the two. OLD_ARGS and NEW_ARGS are extra
# `bench produce` arguments for each side, so one build can be compared with itself:
#   OLD_ARGS="--idempotence off" NEW_ARGS="--idempotence on" benches/compare.sh BIN BIN
# Uses ports 19292-19293 and 9292-9493 on 127.0.0.1.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-5}; N=${4:-2000000}; MODE=${MODE:-all}
CONF="$(cd "$(dirname "$0")/.." && pwd)/config/cluster-3.toml"

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

run_single() {
  local bin=$1 tag=$2 extra=$3 d pid out
  d=$(mktemp -d /tmp/conveyor-bench.XXXX)
  "$bin/conveyor-broker" --data-dir "$d" --listen 127.0.0.1:19292 --metrics-listen 127.0.0.1:19293 >"$d/log" 2>&1 &
  pid=$!
  wait_port 19292
  out=$(timeout 300 "$bin/conveyor" --broker 127.0.0.1:19292 bench produce --topic b --partitions 3 \
    --records "$N" --record-size 100 $extra 2>&1)
  echo "single $tag: $(grep "records/s" <<<"$out" || echo "no result: $out")"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null; rm -rf "$d"
}

run_cluster() {
  local bin=$1 tag=$2 extra=$3 d out pids=() b=127.0.0.1:9292,127.0.0.1:9392,127.0.0.1:9492
  d=$(mktemp -d /tmp/conveyor-bench.XXXX)
  for i in 1 2 3; do
    "$bin/conveyor-broker" --config "$CONF" --node-id "$i" --data-dir "$d/$i" \
      --listen "127.0.0.1:$((9192 + i * 100))" --metrics-listen "127.0.0.1:$((9193 + i * 100))" >"$d/log$i" 2>&1 &
    pids+=($!)
  done
  for i in 1 2 3; do wait_port $((9192 + i * 100)); done
  for _ in $(seq 1 100); do
    "$bin/conveyor" --broker "$b" topic create b --partitions 3 --replication-factor 3 >/dev/null 2>&1 && break
    sleep 0.2
  done
  out=$(timeout 300 "$bin/conveyor" --broker "$b" bench produce --topic b --partitions 3 --replication-factor 3 \
    --records "$N" --record-size 100 $extra 2>&1)
  echo "cluster $tag: $(grep "records/s" <<<"$out" || echo "no result: $out")"
  kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null; rm -rf "$d"
}

for _ in $(seq 1 "$ROUNDS"); do
  if [ "$MODE" != cluster ]; then run_single "$OLD" old "${OLD_ARGS:-}"; run_single "$NEW" new "${NEW_ARGS:-}"; fi
  if [ "$MODE" != single ]; then run_cluster "$OLD" old "${OLD_ARGS:-}"; run_cluster "$NEW" new "${NEW_ARGS:-}"; fi
done
