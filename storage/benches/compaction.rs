//! Cleaner throughput on a large log (not a criterion benchmark: one pass over gigabytes is
//! the measurement). Builds a log of `COMPACTION_BENCH_MB` MiB (default 2048) of 100-byte
//! values over `COMPACTION_BENCH_KEYS` distinct keys (default 1,000,000), in batches of 100
//! records, then times one cleaning pass and prints what it read, wrote and kept, the key
//! map's memory and the process's peak memory. `benches/compaction.sh` runs it next to a
//! `dd` baseline of the same disk.
//!
//! `cargo bench -p conveyor-storage --bench compaction` (`COMPACTION_BENCH_DIR` picks the
//! directory; default a temporary one under the target directory's disk).

use std::time::Instant;

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_storage::{CleanBounds, CompactionPolicy, FlushPolicy, IoThrottle, LogConfig, PartitionLog};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage.ru_maxrss
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let target = env("COMPACTION_BENCH_MB", 2048) << 20;
    let keys = env("COMPACTION_BENCH_KEYS", 1_000_000);
    let key_map_bytes = env("COMPACTION_BENCH_KEY_MAP_BYTES", 128 << 20) as usize;
    let base = std::env::var("COMPACTION_BENCH_DIR").unwrap_or_else(|_| ".".into());
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let config = LogConfig {
        segment_bytes: (128 << 20).min(target / 16).max(1 << 20),
        retention_ms: None,
        flush: FlushPolicy::Os,
        ..LogConfig::default()
    };
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let value = Bytes::from(vec![b'v'; 100]);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let started = Instant::now();
    let mut records = 0u64;
    while log.size_bytes() < target {
        let mut b = BatchBuilder::new(Compression::None);
        for _ in 0..100 {
            // xorshift: uniform keys, each written about (records / keys) times.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b.push(&Record {
                timestamp: 1,
                key: Some(Bytes::from(format!("key-{:010}", state % keys))),
                value: Some(value.clone()),
                headers: vec![],
            });
        }
        log.append_unsynced(&b.build().expect("batch")).expect("append");
        records += 100;
    }
    log.flush().expect("flush");
    println!(
        "built: {} MiB, {records} records over {keys} keys, {} segments, in {:.1} s",
        log.size_bytes() >> 20,
        log.segment_count(),
        started.elapsed().as_secs_f64()
    );
    if std::env::var("COMPACTION_BENCH_DROP_CACHES").is_ok() {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }
    let rss_before = peak_rss_kib();
    let bounds = CleanBounds {
        committed_end: log.log_end_offset(),
        tombstone_floor: log.log_end_offset(),
        now_ms: conveyor_storage::unix_millis(),
    };
    let started = Instant::now();
    let report = log
        .clean(
            &CompactionPolicy::default(),
            &bounds,
            key_map_bytes,
            &IoThrottle::unlimited(),
            true,
        )
        .expect("clean")
        .expect("a pass");
    let took = started.elapsed().as_secs_f64();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "pass: {:.1} s; cleaned {:.0} MiB -> {:.0} MiB ({:.0} MiB/s of log); read {:.0} MiB, wrote {:.0} MiB; records {} -> {}; keys {}; up to offset {} of {}",
        took,
        mib(report.bytes_before),
        mib(report.bytes_after),
        mib(report.bytes_before) / took,
        mib(report.bytes_read),
        mib(report.bytes_written),
        report.records_before,
        report.records_after,
        report.keys,
        report.cleaned_up_to,
        log.log_end_offset(),
    );
    println!(
        "memory: key map {:.1} MiB allocated (setting {:.0} MiB); peak RSS {:.0} MiB before the pass, {:.0} MiB after",
        report.key_map_bytes as f64 / f64::from(1 << 20),
        key_map_bytes as f64 / f64::from(1 << 20),
        rss_before as f64 / 1024.0,
        peak_rss_kib() as f64 / 1024.0,
    );
}
