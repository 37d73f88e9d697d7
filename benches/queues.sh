#!/usr/bin/env bash
# Share groups against Redis Streams, alternating in one run (this machine is noisy: compare
# medians and ranges, never one run).
#
#   benches/queues.sh BIN_DIR [ROUNDS] [RECORDS]
#
# BIN_DIR holds release `conveyor-broker` and `conveyor` binaries. Every round runs, each on
# a fresh single broker (fsync before ack, the default) or a fresh redis-server:
#   - conveyor: `bench queue`, 8 workers, 3 partitions, 100-byte records, no ordering, the
#     group's default max_inflight_records (2,000 per partition);
#   - conveyor-5k: the same with max_inflight_records 5,000;
#   - conveyor-tuned: max_inflight_records 10,000 (the most a group may have), and workers
#     fetching up to 2,000 records at a time with 4,000 buffered (--max-records,
#     --prefetch);
#   - conveyor-key: the defaults with ordering key over 10,000 keys;
#   - redis: `bench redis-queue` (XREADGROUP COUNT 500 + XACK, pipelined, 8 connections)
#     on redis-server without persistence;
#   - redis-aof: the same with appendonly yes, appendfsync always (fsync per write, as the
#     broker's share state).
# Needs redis-server (Debian: apt-get install redis-server). Uses ports 19292-19293 and
# 16379 on 127.0.0.1.
set -u
BIN=$1; ROUNDS=${2:-3}; N=${3:-1000000}

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

run_conveyor() {
  local tag=$1; shift
  local d pid out
  d=$(mktemp -d /tmp/conveyor-bench.XXXX)
  "$BIN/conveyor-broker" --data-dir "$d" --listen 127.0.0.1:19292 --metrics-listen 127.0.0.1:19293 >"$d/log" 2>&1 &
  pid=$!
  wait_port 19292
  out=$(timeout 600 "$BIN/conveyor" --broker 127.0.0.1:19292 bench queue --workers 8 --partitions 3 \
    --records "$N" --record-size 100 "$@" 2>&1)
  echo "$tag: $(grep "^queue:" <<<"$out" || echo "no result: $out")"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null; rm -rf "$d"
}

run_redis() {
  local tag=$1; shift
  local d out
  d=$(mktemp -d /tmp/redis-bench.XXXX)
  redis-server --port 16379 --dir "$d" --save '' "$@" --daemonize yes --logfile "$d/log" >/dev/null
  wait_port 16379
  out=$(timeout 600 "$BIN/conveyor" bench redis-queue --redis 127.0.0.1:16379 --workers 8 \
    --records "$N" --record-size 100 2>&1)
  echo "$tag: $(grep "^redis-queue:" <<<"$out" || echo "no result: $out")"
  redis-cli -p 16379 shutdown nosave >/dev/null 2>&1; rm -rf "$d"
}

for _ in $(seq 1 "$ROUNDS"); do
  run_conveyor conveyor
  run_conveyor conveyor-5k --max-inflight 5000
  run_conveyor conveyor-tuned --max-inflight 10000 --max-records 2000 --prefetch 4000
  run_conveyor conveyor-key --ordering key --keys 10000
  run_redis redis --appendonly no
  run_redis redis-aof --appendonly yes --appendfsync always
done
