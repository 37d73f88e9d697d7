#!/usr/bin/env bash
# Start time of a broker whose metadata log holds many topic creations and deletions, for two
# builds, alternating in one run (this machine is noisy: compare medians and ranges).
#
#   benches/metadata_start.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [TOPICS]
#
# Each *_BIN_DIR holds release `conveyor-broker` and `conveyor` binaries. For each build, one
# single-broker data directory is prepared by that build: TOPICS topics are created and
# deleted with the CLI (2 * TOPICS metadata records; default 5000 topics, 10,000 records).
# Then each round restarts old, then new, on its directory and times process start to the
# first answered `conveyor topic list` (the broker serves only after its start replay).
# Uses ports PORT and PORT+1 on 127.0.0.1 (PORT defaults to 23292). WORK=DIR keeps the
# prepared directories in DIR (DIR/old, DIR/new; one that exists already is reused).
set -u
OLD=$1; NEW=$2; ROUNDS=${3:-3}; TOPICS=${4:-5000}; PORT=${PORT:-23292}; JOBS=${JOBS:-4}
ADDR=127.0.0.1:$PORT

start_broker() { # bin dir
  "$1/conveyor-broker" --data-dir "$2" --listen "$ADDR" --metrics-listen "127.0.0.1:$((PORT + 1))" >>"$2.log" 2>&1 &
  echo $!
}

serving() { # bin
  "$1/conveyor" --broker "$ADDR" topic list >/dev/null 2>&1
}

stop_broker() { kill -TERM "$1"; wait "$1" 2>/dev/null; }

prepare() { # bin dir
  local pid
  [ -d "$2" ] && return 0
  pid=$(start_broker "$1" "$2")
  until serving "$1"; do sleep 0.05; done
  seq -f "churn-%05g" 1 "$TOPICS" | xargs -P "$JOBS" -I{} sh -c \
    "'$1/conveyor' --broker $ADDR topic create {} --partitions 1 >/dev/null && '$1/conveyor' --broker $ADDR topic delete {} >/dev/null" \
    || echo "some creations or deletions failed" >&2
  stop_broker "$pid"
}

timed_start() { # bin dir tag
  local pid t0 t1
  t0=$(date +%s%N)
  pid=$(start_broker "$1" "$2")
  until serving "$1"; do sleep 0.01; done
  t1=$(date +%s%N)
  echo "$3: $(((t1 - t0) / 1000000)) ms"
  stop_broker "$pid"
}

KEEP=${WORK:+yes}
WORK=${WORK:-$(mktemp -d /tmp/conveyor-metastart.XXXX)}
mkdir -p "$WORK"
prepare "$OLD" "$WORK/old"
prepare "$NEW" "$WORK/new"
echo "metadata log: old $(du -sh "$WORK/old/__cluster_metadata" | cut -f1), new $(du -sh "$WORK/new/__cluster_metadata" | cut -f1)"
for _ in $(seq 1 "$ROUNDS"); do
  timed_start "$OLD" "$WORK/old" old
  timed_start "$NEW" "$WORK/new" new
done
[ -n "$KEEP" ] || rm -rf "$WORK"
