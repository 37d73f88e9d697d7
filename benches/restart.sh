#!/usr/bin/env bash
# Broker restart after a clean shutdown: time until every partition is open and resident
# memory once started, for two builds
# alternating on the same data directory (this machine is noisy: compare medians and ranges).
#
#   benches/restart.sh OLD_BIN_DIR NEW_BIN_DIR big|many [ROUNDS]
#
# big:  one partition holding ~5 GB (5,000,000 records of 1,000 bytes, 16 KiB producer batches).
# many: 1,000 partitions of ~10 MB each (10,000,000 records of 1,000 bytes, 16 KiB batches).
# The data is written once by NEW (flush.policy=os), in DIR (default /tmp/conveyor-restart-MODE),
# then each round starts OLD, NEW, NEW again (the first NEW open follows OLD's close, which
# left no term checkpoints; the second follows NEW's own close), each stopped with SIGTERM
# (a clean shutdown). Prints seconds from start until every partition of the topic has
# elected itself (logged once it is open) and VmRSS (RssAnon, RssFile) 3 s after that. Delete DIR afterwards.
# Uses 127.0.0.1 ports PORT and PORT+1 (default 22001).
set -u
OLD=$1; NEW=$2; MODE=$3; ROUNDS=${4:-3}
PORT=${PORT:-22001}
DIR=${DIR:-/tmp/conveyor-restart-$MODE}
ADDR=127.0.0.1:$PORT

wait_port() {
  for _ in $(seq 1 60000); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.005; done
  echo "port $1 did not open" >&2; return 1
}

# COLD=1 evicts the data directory's files from the page cache before each start (only
# those files: posix_fadvise DONTNEED, no root needed), as after a reboot.
evict() {
  [ "${COLD:-0}" = 1 ] || return 0
  python3 - "$DIR" <<'PY'
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        fd = os.open(os.path.join(root, f), os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
PY
}

start() { # bin -> sets PID, READY (seconds until every partition of topic t has a leader)
  local t0 t1 n
  evict
  t0=$(date +%s%N)
  "$1/conveyor-broker" --data-dir "$DIR" --listen "$ADDR" --metrics-listen "127.0.0.1:$((PORT + 1))" >"$DIR.run.log" 2>&1 &
  PID=$!
  # Partitions open in the background after the broker listens; each one that opens elects
  # itself at once (a group of one) and logs it.
  for _ in $(seq 1 120000); do
    n=$(grep -c "topic=t partition=[0-9]* leader=true" "$DIR.run.log")
    [ "$n" -ge "$PARTS" ] && break
    sleep 0.005
  done
  t1=$(date +%s%N)
  cat "$DIR.run.log" >>"$DIR.log"
  if [ "$n" -lt "$PARTS" ]; then
    echo "only $n of $PARTS partitions elected a leader within the wait; see $DIR.log" >&2
    kill -TERM "$PID"; wait "$PID" || true
    exit 1
  fi
  READY=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
}

stop() {
  kill -TERM "$PID"; wait "$PID"
}

case $MODE in
  big) PARTS=1; RECORDS=5000000 ;;
  many) PARTS=1000; RECORDS=10000000 ;;
  *) echo "mode: big or many" >&2; exit 2 ;;
esac
if [ ! -d "$DIR" ]; then
  mkdir -p "$DIR"
  "$NEW/conveyor-broker" --data-dir "$DIR" --listen "$ADDR" --metrics-listen "127.0.0.1:$((PORT + 1))" >>"$DIR.log" 2>&1 &
  PID=$!
  wait_port "$PORT" || exit 1
  # Created first: 1,000 partitions take longer to create than the bench waits.
  "$NEW/conveyor" --broker "$ADDR" topic create t --partitions "$PARTS" --config flush.policy=os
  for _ in $(seq 1 600); do
    [ "$(grep -c "topic=t partition=[0-9]* leader=true" "$DIR.log")" -ge "$PARTS" ] && break
    sleep 0.1
  done
  "$NEW/conveyor" --broker "$ADDR" bench produce --topic t --partitions "$PARTS" --records "$RECORDS" \
    --record-size 1000 --batch-size 16384 --producers 4 --config flush.policy=os --timeout-secs 3000 2>&1 | tail -3
  stop
  echo "filled: $(du -sh "$DIR" | cut -f1), $(find "$DIR" -name '*.log' | wc -l) segment files"
fi

for r in $(seq 1 "$ROUNDS"); do
  for pair in "old:$OLD" "new-after-old:$NEW" "new-after-new:$NEW"; do
    tag=${pair%%:*}; bin=${pair#*:}
    start "$bin"
    sleep 3
    rss=$(awk '/^(VmRSS|RssAnon|RssFile):/ { printf "%s %s kB  ", $1, $2 }' "/proc/$PID/status")
    stop
    echo "round $r $tag: partitions open after ${READY}s, $rss"
  done
done
