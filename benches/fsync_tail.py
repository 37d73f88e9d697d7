#!/usr/bin/env python3
"""The disk's own fsync tail: append 250 bytes and fdatasync, in a loop, for SECONDS.

    benches/fsync_tail.py [SECONDS] [DIR]

A produce with flush.policy=always is answered after an fdatasync: this is the distribution
each such answer waits on, stalls included (docs/request_cost.md). DIR defaults to the
current directory: run it on the disk that holds the broker's data.
"""
import os
import sys
import tempfile
import time

seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
if not seconds > 0:
    sys.exit("SECONDS must be positive")
fd, path = tempfile.mkstemp(prefix=".fsync_tail.", dir=sys.argv[2] if len(sys.argv) > 2 else ".")
try:
    latencies = []
    start = time.monotonic()
    end = start + seconds
    while not latencies or time.monotonic() < end:
        os.write(fd, b"x" * 250)
        t = time.monotonic()
        os.fdatasync(fd)
        latencies.append(time.monotonic() - t)
    elapsed = time.monotonic() - start
finally:
    os.close(fd)
    os.unlink(path)
latencies.sort()
n = len(latencies)


def ms(q):
    return latencies[min(n - 1, int(n * q))] * 1000


stalled = sum(x for x in latencies if x > 0.010)
print(f"{n} fdatasyncs in {elapsed:.1f} s: p50 {ms(0.5):.2f} ms, p99 {ms(0.99):.2f} ms, "
      f"p99.9 {ms(0.999):.2f} ms, max {latencies[-1] * 1000:.1f} ms; "
      f"{stalled:.3f} s in fdatasyncs over 10 ms")
