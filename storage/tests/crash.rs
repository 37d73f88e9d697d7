//! Crash consistency: damage the files the way a crash can, reopen, and check that the log
//! holds exactly a prefix of what was appended, with everything before the damage intact.
//!
//! Under `FlushPolicy::Always` every sealed segment was fsynced when it rolled, so a crash can
//! only tear the active segment; these tests damage that segment's `.log` (cut or flipped
//! byte) or any index file. Bytes of the leader epoch and Raft index fields are not damaged:
//! they sit outside the CRC by design (see the `recovery` module docs).

mod common;

use std::fs;

use bytes::Bytes;
use common::{batches, files_with, small_config};
use conveyor_storage::batch::{BatchBuilder, Compression, Record, STAMPED_LEN};
use conveyor_storage::{FlushPolicy, PartitionLog};
use proptest::prelude::*;

/// All batches in the log, as (base offset, bytes after the stamped prefix).
fn stored_batches(log: &PartitionLog) -> Vec<(u64, Bytes)> {
    batches(log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect()
}

#[derive(Debug, Clone)]
enum Damage {
    Cut(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Index(prop::sample::Index, prop::sample::Index, u8),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(Damage::Cut),
        (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, x)| Damage::Flip(i, x)),
        (any::<prop::sample::Index>(), any::<prop::sample::Index>(), 1u8..=255)
            .prop_map(|(f, i, x)| Damage::Index(f, i, x)),
    ]
}

fn make_batch(seed: u64, count: u32, value_len: usize, compression: Compression) -> Bytes {
    let mut b = BatchBuilder::new(compression);
    for i in 0..count {
        b.push(&Record {
            timestamp: 1_700_000_000_000 + seed as i64,
            key: Some(Bytes::from(format!("{seed}-{i}"))),
            value: Some(Bytes::from(vec![(seed as u8).wrapping_add(i as u8); value_len])),
            headers: vec![],
        });
    }
    b.build().expect("build")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn after_damage_the_log_is_exactly_the_prefix_before_it(
        shapes in proptest::collection::vec((1u32..20, 1usize..200, 0u8..3), 5..60),
        damage in arb_damage(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = small_config(FlushPolicy::Always);
        let mut appended = Vec::new();
        {
            let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
            for (seed, (count, len, codec)) in shapes.iter().enumerate() {
                let codec = [Compression::None, Compression::Lz4, Compression::Zstd][*codec as usize];
                let b = make_batch(seed as u64, *count, *len, codec);
                let info = log.append(&b).expect("append");
                prop_assert!(log.durable_offset() >= info.next_offset);
                appended.push((info.base_offset, b.slice(STAMPED_LEN..), b.len() as u64, info.next_offset));
            }
            // Dropped without close: the next open sees a crash.
        }
        let logs = files_with(dir.path(), "log");
        let last = logs.last().expect("a segment").clone();
        let last_base: u64 = last.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse().ok()).expect("base");
        // Byte positions of the batches in the last segment.
        let mut spans = Vec::new();
        let mut pos = 0u64;
        for (base, _, size, _) in &appended {
            if *base >= last_base {
                spans.push((pos, pos + size));
                pos += size;
            }
        }
        let file_len = fs::metadata(&last).expect("stat").len();
        prop_assert_eq!(file_len, pos);
        let first_in_last = appended.iter().position(|(b, _, _, _)| *b >= last_base).expect("batches in last");
        let expected_kept = match &damage {
            Damage::Cut(at) => {
                let cut = at.index(file_len as usize + 1) as u64;
                fs::OpenOptions::new().write(true).open(&last).expect("open").set_len(cut).expect("cut");
                first_in_last + spans.iter().filter(|(_, end)| *end <= cut).count()
            }
            Damage::Flip(at, xor) => {
                let mut bytes = fs::read(&last).expect("read");
                let mut i = at.index(bytes.len()) as u64;
                let (start, _) = spans.iter().copied().find(|(s, e)| *s <= i && i < *e).expect("in a batch");
                if (start + 12..start + 28).contains(&i) {
                    i = start; // the base offset field: outside the CRC but checked for continuity
                }
                bytes[i as usize] ^= xor;
                fs::write(&last, bytes).expect("write");
                first_in_last + spans.iter().filter(|(_, end)| *end <= i).count()
            }
            Damage::Index(file, at, xor) => {
                let mut indexes = files_with(dir.path(), "index");
                indexes.extend(files_with(dir.path(), "timeindex"));
                let target = file.get(&indexes).clone();
                let mut bytes = fs::read(&target).expect("read");
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] ^= xor;
                    fs::write(&target, bytes).expect("write");
                }
                appended.len()
            }
        };
        let log = PartitionLog::open(dir.path(), config).expect("reopen after damage");
        let stored = stored_batches(&log);
        prop_assert_eq!(stored.len(), expected_kept, "damage {:?}", damage);
        for ((base, body), (abase, abody, _, _)) in stored.iter().zip(&appended) {
            prop_assert_eq!(base, abase);
            prop_assert_eq!(body, abody);
        }
        // The end is where the last kept batch ended, as its append reported it.
        let end = appended[..expected_kept].last().map_or(0, |(_, _, _, next)| *next);
        prop_assert_eq!(log.log_end_offset(), end);
        // The recovered log takes appends at its end.
        let info = log.append(&make_batch(999, 1, 1, Compression::None)).expect("append after recovery");
        prop_assert_eq!(info.base_offset, end);
    }
}

#[test]
fn an_unclean_open_truncates_a_half_written_batch_and_logs_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = small_config(FlushPolicy::Always);
    {
        let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
        for i in 0..3 {
            log.append(&make_batch(i, 5, 50, Compression::None)).expect("append");
        }
    }
    let seg = dir.path().join("00000000000000000000.log");
    let full = fs::metadata(&seg).expect("stat").len();
    // Simulate a torn write: half a batch of garbage after the last complete one.
    let mut bytes = fs::read(&seg).expect("read");
    bytes.extend_from_slice(&make_batch(9, 5, 50, Compression::None)[..100]);
    fs::write(&seg, bytes).expect("write");
    let logged = LogCapture::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logged.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let log = tracing::subscriber::with_default(subscriber, || PartitionLog::open(dir.path(), config)).expect("reopen");
    assert_eq!(log.log_end_offset(), 15);
    assert_eq!(
        fs::metadata(&seg).expect("stat").len(),
        full,
        "torn tail removed from disk"
    );
    let logged = logged.text();
    let truncation = logged
        .lines()
        .find(|l| l.contains("truncating torn or corrupt tail of segment"))
        .unwrap_or_else(|| panic!("the truncation is logged; the log was:\n{logged}"));
    assert!(truncation.contains("WARN"), "{truncation}");
    assert!(truncation.contains("dropped_bytes=100"), "{truncation}");
    assert!(truncation.contains(&format!("valid_bytes={full}")), "{truncation}");
    assert!(truncation.contains("00000000000000000000.log"), "{truncation}");
}

/// Collects formatted tracing output in memory.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> LogCapture {
        self.clone()
    }
}
