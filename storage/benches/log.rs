//! Storage throughput and latency: append (flush `os`; flush `always` with 4 appenders),
//! sequential read, offset lookup. 100-byte records in batches of 1,000.
//!
//! `cargo bench -p conveyor-storage`. Data goes to `CONVEYOR_BENCH_DIR` (default: the system
//! temp dir); point it at the disk you want to measure.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const RECORDS_PER_BATCH: usize = 1000;
const RECORD_BYTES: usize = 100;
/// The log is kept below this size while appending gigabytes. It also keeps dirty page
/// cache below the kernel's writeback thresholds, so `flush_os` measures the append path
/// rather than the disk's sustained write bandwidth (which flush `always` measures).
const KEEP_BYTES: u64 = 512 << 20;

fn bench_dir() -> tempfile::TempDir {
    match std::env::var("CONVEYOR_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    }
}

fn make_batch() -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    let value = Bytes::from(vec![b'x'; RECORD_BYTES]);
    for i in 0..RECORDS_PER_BATCH {
        b.push(&Record {
            timestamp: 1_700_000_000_000 + i as i64,
            key: None,
            value: Some(value.clone()),
            headers: vec![],
        });
    }
    b.build().expect("batch")
}

fn config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        flush,
        retention_ms: None,
        segment_bytes: 128 << 20,
        ..LogConfig::default()
    }
}

fn trim(log: &PartitionLog) {
    if log.size_bytes() > KEEP_BYTES {
        log.delete_segments_before(log.log_end_offset()).expect("trim");
    }
}

fn append_os(c: &mut Criterion) {
    let batch = make_batch();
    let dir = bench_dir();
    let log = PartitionLog::open(dir.path(), config(FlushPolicy::Os)).expect("open");
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("flush_os", |b| {
        b.iter(|| {
            log.append(black_box(&batch)).expect("append");
            trim(&log);
        })
    });
    g.finish();
}

fn append_always_group_commit(c: &mut Criterion) {
    const APPENDERS: u64 = 4;
    let batch = make_batch();
    let dir = bench_dir();
    let log = Arc::new(PartitionLog::open(dir.path(), config(FlushPolicy::Always)).expect("open"));
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.bench_function("flush_always_4_appenders", |b| {
        b.iter_custom(|iters| {
            let per_thread = iters.div_ceil(APPENDERS);
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..APPENDERS {
                    let (log, batch) = (&log, &batch);
                    s.spawn(move || {
                        for _ in 0..per_thread {
                            log.append(batch).expect("append");
                        }
                    });
                }
            });
            let elapsed = start.elapsed();
            trim(&log);
            elapsed
        })
    });
    g.finish();
}

/// How much the read benchmarks read from: about 512 MiB.
const FILLED_BYTES: u64 = 512 << 20;

/// A log of about [`FILLED_BYTES`], appended with flush `os` and left in the page cache.
fn filled_log(dir: &tempfile::TempDir) -> PartitionLog {
    let batch = make_batch();
    let log = PartitionLog::open(dir.path(), config(FlushPolicy::Os)).expect("open");
    while log.size_bytes() < FILLED_BYTES {
        log.append(&batch).expect("fill");
    }
    log
}

fn sequential_read(c: &mut Criterion) {
    const READ_BYTES: usize = 1 << 20;
    let dir = bench_dir();
    let log = filled_log(&dir);
    let mut g = c.benchmark_group("read");
    g.throughput(Throughput::Bytes(READ_BYTES as u64));
    let mut next = 0u64;
    g.bench_function("sequential_1MiB", |b| {
        b.iter(|| {
            if next >= log.log_end_offset() {
                next = 0;
            }
            let bytes = log.read(next, READ_BYTES).expect("read");
            next = last_next_offset(&bytes);
            black_box(bytes);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("lookup");
    let end = log.log_end_offset();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    g.bench_function("offset", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            black_box(log.locate(x % end).expect("locate"))
        })
    });
    g.bench_function("timestamp", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            black_box(
                log.offset_for_timestamp(1_700_000_000_000 + (x % 1000) as i64)
                    .expect("lookup"),
            )
        })
    });
    g.finish();
}

fn last_next_offset(bytes: &Bytes) -> u64 {
    conveyor_storage::batch::BatchIter::new(bytes.clone())
        .last()
        .and_then(Result::ok)
        .map_or(0, |b| b.header().next_offset())
}

fn validate(c: &mut Criterion) {
    let batch = make_batch();
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("validate_1000x100B", |b| {
        b.iter(|| conveyor_storage::batch::validate(black_box(&batch), 1 << 20).expect("valid"))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    targets = validate, append_os, append_always_group_commit, sequential_read
}
criterion_main!(benches);
