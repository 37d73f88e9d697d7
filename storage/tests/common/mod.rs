//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use std::path::{Path, PathBuf};

use conveyor_storage::batch::{BatchBuilder, BatchIter, Compression, Record, RecordBatch, StoredRecord};
use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};

/// A batch of `count` records whose values encode `tag` and the record's index.
pub fn batch(tag: u64, count: u32, timestamp: i64) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for i in 0..count {
        b.push(&Record {
            timestamp,
            key: Some(Bytes::from(format!("key-{}", i % 7))),
            value: Some(Bytes::from(format!("batch-{tag}-record-{i}-{}", "x".repeat(40)))),
            headers: vec![],
        });
    }
    b.build().expect("build batch")
}

pub fn small_config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 512,
        max_index_bytes: 4096,
        max_batch_bytes: 16 * 1024,
        retention_ms: None,
        flush,
        ..LogConfig::default()
    }
}

/// Every record in the log from its start, read in `chunk`-byte reads.
pub fn read_all(log: &PartitionLog, chunk: usize) -> Vec<StoredRecord> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    while next < log.log_end_offset() {
        let bytes = log.read(next, chunk).expect("read");
        assert!(!bytes.is_empty(), "read at {next} returned nothing before the log end");
        for batch in BatchIter::new(bytes) {
            let batch = batch.expect("whole batch");
            assert!(batch.header().base_offset <= next || next == log.log_start_offset());
            for r in batch.records().expect("records") {
                out.push(r.expect("record"));
            }
            next = batch.header().next_offset();
        }
    }
    out
}

/// Every batch in the log from its start, in order.
pub fn batches(log: &PartitionLog) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let mut next = log.log_start_offset();
    while next < log.log_end_offset() {
        for batch in BatchIter::new(log.read(next, 1 << 20).expect("read")) {
            let batch = batch.expect("whole batch");
            next = batch.header().next_offset();
            out.push(batch);
        }
    }
    out
}

/// Base offsets of every batch in the log, in order.
pub fn batch_bases(log: &PartitionLog) -> Vec<u64> {
    batches(log).iter().map(|b| b.header().base_offset).collect()
}

/// The files in `dir` with extension `ext`, sorted (segment files sort by base offset).
pub fn files_with(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}
