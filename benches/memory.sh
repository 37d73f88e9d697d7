#!/usr/bin/env bash
# Peak broker memory (VmHWM from /proc/PID/status) of two builds under two loads, alternating
# old and new in one run (this machine is noisy and shared: compare ranges, never one run):
#   produce: 8 producers push RECORDS 100-byte records (conveyor bench produce, acks=all);
#   flood:   STREAMS (1000) concurrent produce streams over CONNECTIONS (10) connections, each
#            sending one 16 MiB request, cut after FLOOD_SECS (60) seconds (conveyor bench
#            flood; the old CLI has none, so the new CLI floods both builds).
#
#   benches/memory.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [RECORDS]
#
# Each broker runs with the default config on empty data directories. It runs under
# `ulimit -v CAP_KB` (default 4 GiB of address space) so a build that does not bound its
# memory cannot take a shared machine down: a broker that dies there is reported as such,
# with the last VmHWM sampled. MODE=produce or MODE=flood runs one load only. Uses ports
# PORT and PORT+1 on 127.0.0.1 (default 21292).
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-2}; N=${4:-10000000}; MODE=${MODE:-all}
STREAMS=${STREAMS:-1000}; CONNECTIONS=${CONNECTIONS:-10}; CAP_KB=${CAP_KB:-4194304}; FLOOD_SECS=${FLOOD_SECS:-60}
PORT=${PORT:-21292}; ADDR=127.0.0.1:$PORT

wait_port() {
  for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "port $1 did not open" >&2; return 1
}

hwm() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status" 2>/dev/null; }

# run BIN_DIR TAG LOAD
run() {
  local bin=$1 tag=$2 load=$3 d pid sampler out peak
  d=$(mktemp -d /tmp/conveyor-mem.XXXX)
  (ulimit -v "$CAP_KB"; exec "$bin/conveyor-broker" --data-dir "$d/data" --listen "$ADDR" \
    --metrics-listen "127.0.0.1:$((PORT + 1))" >"$d/log" 2>&1) &
  pid=$!
  wait_port "$PORT" || { kill -9 "$pid"; rm -rf "$d"; return; }
  # Sampled too, for a broker that dies before the load ends.
  (while kill -0 "$pid" 2>/dev/null; do hwm "$pid" >"$d/hwm.tmp" && mv "$d/hwm.tmp" "$d/hwm"; sleep 0.2; done) &
  sampler=$!
  if [ "$load" = produce ]; then
    out=$(timeout 900 "$bin/conveyor" --broker "$ADDR" bench produce --topic m --producers 8 \
      --records "$N" --record-size 100 2>&1 | grep -E "records/s|error" | head -3)
  else
    out=$(timeout 900 "$NEW/conveyor" --broker "$ADDR" bench flood --topic f --streams "$STREAMS" \
      --connections "$CONNECTIONS" --request-bytes 16777216 --requests-per-stream 1 --max-secs "$FLOOD_SECS" 2>&1 | head -3)
  fi
  peak=$(hwm "$pid")
  if [ -z "$peak" ]; then
    peak="$(cat "$d/hwm" 2>/dev/null) (broker died: $(tail -c 300 "$d/log" | tr '\n' ' '))"
  fi
  echo "$load $tag: VmHWM ${peak} MiB; $(echo "$out" | tr '\n' ' ')"
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  rm -rf "$d"
}

for r in $(seq 1 "$ROUNDS"); do
  for load in produce flood; do
    [ "$MODE" = all ] || [ "$MODE" = "$load" ] || continue
    run "$OLD" "old (round $r)" "$load"
    run "$NEW" "new (round $r)" "$load"
  done
done
