#!/usr/bin/env bash
# Broker CPU per small request, two builds alternating in one run (this machine is noisy:
# compare medians and ranges).
#
#   benches/request_cost.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [RATE] [RECORDS]
#
# Each round starts, for old then new, one broker on an empty data directory with a
# one-partition topic (FLUSH=always by default; FLUSH=os for flush.policy=os) and runs
# `conveyor bench produce --rate RATE --linger 0ms` (MODE=e2e: `bench e2e`) for RECORDS
# 100-byte records (default 10,000/s, 50,000 records). The broker's CPU is read from
# /proc/PID/stat (so builds without `process_cpu_seconds_total` can be measured too) and
# divided by the produce and fetch requests its metrics counted; context switches are summed
# over its live threads' /proc status (a blocking thread that exited during the run is not
# counted; `conveyor bench --broker-metrics` counts every thread). ARGS adds `bench`
# arguments to both sides.
# Uses ports 19292-19293 on 127.0.0.1.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}; RATE=${4:-10000}; N=${5:-50000}
FLUSH=${FLUSH:-always}; MODE=${MODE:-produce}
TICK=$(getconf CLK_TCK)

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

counter() {
  curl -s 127.0.0.1:19293/metrics | awk -v n="$1" '$1 == n {s += $2} END {print s + 0}'
}

run() {
  local bin=$1 tag=$2 d pid c0 c1 r0 r1 s0 s1 out
  d=$(mktemp -d /tmp/conveyor-cost.XXXX)
  "$bin/conveyor-broker" --data-dir "$d" --listen 127.0.0.1:19292 --metrics-listen 127.0.0.1:19293 >"$d/log" 2>&1 &
  pid=$!
  wait_port 19292
  "$bin/conveyor" --broker 127.0.0.1:19292 topic create c --partitions 1 --config "flush.policy=$FLUSH" >/dev/null
  cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
  switches() { cat /proc/"$pid"/task/*/status | awk '/voluntary_ctxt_switches/ {s += $2} END {print s}'; }
  requests() { echo $(( $(counter conveyor_produce_requests_total) + $(counter conveyor_fetch_requests_total) )); }
  c0=$(cpu); r0=$(requests); s0=$(switches)
  out=$(timeout 300 "$bin/conveyor" --broker 127.0.0.1:19292 bench "$MODE" --topic c --records "$N" --rate "$RATE" \
    --linger 0ms ${ARGS:-} 2>&1)
  c1=$(cpu); r1=$(requests); s1=$(switches)
  awk -v tag="$tag" -v c=$((c1 - c0)) -v r=$((r1 - r0)) -v s=$((s1 - s0)) -v t="$TICK" -v n="$N" 'BEGIN {
    printf "%s %s flush=%s: broker cpu %.2f s, %d requests, %.1f us/request, %.1f us/record, %.2f switches/request\n",
      ENVIRON["MODE"] ? ENVIRON["MODE"] : "produce", tag, ENVIRON["FLUSH"] ? ENVIRON["FLUSH"] : "always",
      c / t, r, r ? c / t * 1e6 / r : 0, c / t * 1e6 / n, r ? s / r : 0 }'
  grep -E "latency" <<<"$out" | sed "s/^/  $tag /"
  kill -TERM "$pid"; wait "$pid" 2>/dev/null; rm -rf "$d"
}

export FLUSH MODE
for _ in $(seq 1 "$ROUNDS"); do
  run "$OLD" old
  run "$NEW" new
done
