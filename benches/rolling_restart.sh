#!/usr/bin/env bash
# Produce latency during a rolling restart of three brokers, two builds alternating (this
# machine is noisy: compare medians and ranges, never one run).
#
#   benches/rolling_restart.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [RATE] [SECONDS]
#
# Each *_BIN_DIR holds release `conveyor-broker` and `conveyor` binaries. Every round runs,
# for old then new: three brokers (config/cluster-3.toml, on ports 24292-24493 of
# 127.0.0.1) from empty data directories, a topic of 3 partitions at replication factor 3,
# and `conveyor bench produce` at RATE records/s (acks=all, 3 producers) for SECONDS. While
# it runs, each broker in turn is sent SIGTERM, waited for, started again on its data
# directory, and waited for until every replica is in sync again. Prints the bench's
# errors and p50/p99/max latency (from each record's intended send time) per run, and
# each broker's stop time (SIGTERM to exit).
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-2}; RATE=${4:-5000}; SECONDS_RUN=${5:-40}
CONF="$(cd "$(dirname "$0")/.." && pwd)/config/cluster-3.toml"
PEERS=1=127.0.0.1:24292,2=127.0.0.1:24392,3=127.0.0.1:24492
BOOT=127.0.0.1:24292,127.0.0.1:24392,127.0.0.1:24492

SUMMARY='
import json, sys
d = json.load(open(sys.argv[1]))
l = d["latency_ms"]
print("errors %d records/s %.0f p50 %.1f ms p99 %.1f ms max %.1f ms" % (d["errors"], d["records_per_sec"], l["p50"], l["p99"], l["max"]))
'

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

start_broker() { # bin dir id
  "$1/conveyor-broker" --config "$CONF" --node-id "$3" --data-dir "$2/$3" --peers "$PEERS" \
    --listen "127.0.0.1:$((24192 + $3 * 100))" --metrics-listen "127.0.0.1:$((24193 + $3 * 100))" \
    >>"$2/log$3" 2>&1 &
  PIDS[$3]=$!
  wait_port $((24192 + $3 * 100))
}

# Every partition of topic r has 3 replicas in sync, within 60 s.
wait_in_sync() { # bin
  for _ in $(seq 1 300); do
    "$1/conveyor" --broker "$BOOT" topic describe r --output json 2>/dev/null |
      python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if all(len(p.get("in_sync",[]))==3 for p in d["partitions"]) else 1)' \
      2>/dev/null && return 0
    sleep 0.2
  done
  echo "replicas did not get in sync" >&2; return 1
}

run() { # bin tag
  local bin=$1 tag=$2 d bench out stops=""
  d=$(mktemp -d /tmp/conveyor-rolling.XXXX)
  declare -a PIDS
  for i in 1 2 3; do start_broker "$bin" "$d" "$i"; done
  for _ in $(seq 1 100); do
    "$bin/conveyor" --broker "$BOOT" topic create r --partitions 3 --replication-factor 3 >/dev/null 2>&1 && break
    sleep 0.2
  done
  wait_in_sync "$bin"
  timeout $((SECONDS_RUN + 120)) "$bin/conveyor" --broker "$BOOT" bench produce --topic r --producers 3 \
    --rate "$RATE" --records $((RATE * SECONDS_RUN)) --record-size 100 --timeout-secs $((SECONDS_RUN + 90)) \
    --output json >"$d/bench.json" 2>"$d/bench.err" &
  bench=$!
  sleep 5
  for i in 1 2 3; do
    local t0 t1
    t0=$(date +%s%N)
    kill -TERM "${PIDS[$i]}"
    # Bounded: a broker that has not exited after 60 s is killed.
    { sleep 60; kill -KILL "${PIDS[$i]}" 2>/dev/null; } &
    local watchdog=$!
    wait "${PIDS[$i]}" 2>/dev/null
    kill "$watchdog" 2>/dev/null
    t1=$(date +%s%N)
    stops="$stops b$i=$(((t1 - t0) / 1000000))ms"
    start_broker "$bin" "$d" "$i"
    wait_in_sync "$bin"
    sleep 2
  done
  wait "$bench"
  out=$(python3 -c "$SUMMARY" "$d/bench.json" 2>&1 || echo "no result: $(cat "$d/bench.err")")
  echo "rolling $tag: $out; stop times$stops"
  kill -TERM "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $d"; else rm -rf "$d"; fi
}

[ -n "${ONLY:-}" ] && { run "$ONLY" only; exit; }
for _ in $(seq 1 "$ROUNDS"); do
  run "$OLD" old
  run "$NEW" new
done
