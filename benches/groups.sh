#!/usr/bin/env bash
# Consumer groups on one broker, two builds alternating in one run (medians and ranges).
#
#   benches/groups.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [RECORDS]
#
# Each round, for old then new: a broker with empty data produces RECORDS records of 100
# bytes into a 12-partition topic (4 producers), then one reader consumes them all (every
# partition assigned: `bench consume`); then, on NEW only, a group of 4 members drains the
# same records committing every second (`bench consume --group --consumers 4`), a fourth
# member joins a stable group of 3 (`bench rebalance`), and 1,000 groups of 2 members
# heartbeat for 30 s (`bench groups`, broker CPU from its metrics endpoint).
# Uses ports 19292-19293 on 127.0.0.1.
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}; N=${4:-10000000}
B=127.0.0.1:19292; M=127.0.0.1:19293

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

run() {
  local bin=$1 tag=$2 d pid
  d=$(mktemp -d /tmp/conveyor-groups-bench.XXXX)
  "$bin/conveyor-broker" --data-dir "$d" --listen $B --metrics-listen $M >"$d/log" 2>&1 &
  pid=$!
  wait_port 19292
  echo "$tag produce: $(timeout 600 "$bin/conveyor" --broker $B bench produce --topic drain --partitions 12 \
    --producers 4 --records "$N" --record-size 100 2>&1 | grep "records/s")"
  echo "$tag consume (one reader): $(timeout 600 "$bin/conveyor" --broker $B bench consume --topic drain \
    --records "$N" 2>&1 | grep "records/s")"
  if [ "$tag" = new ]; then
    echo "$tag group of 4: $(timeout 600 "$bin/conveyor" --broker $B bench consume --topic drain \
      --records "$N" --group drainers --consumers 4 2>&1 | grep "records/s")"
    echo "$tag rebalance: $(timeout 600 "$bin/conveyor" --broker $B bench rebalance --rounds 3 2>&1 | tail -1)"
    echo "$tag 1000 groups: $(timeout 600 "$bin/conveyor" --broker $B bench groups --groups 1000 --members 2 \
      --duration 30s --broker-metrics $M 2>&1 | tr '\n' ' ')"
  fi
  kill -TERM "$pid"; wait "$pid" 2>/dev/null; rm -rf "$d"
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r"
  run "$OLD" old
  run "$NEW" new
done
