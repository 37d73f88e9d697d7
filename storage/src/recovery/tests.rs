use std::os::unix::fs::FileExt;

use bytes::Bytes;

use super::*;
use crate::FlushPolicy;
use crate::batch::{BatchBuilder, Compression, Record};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 4 * 1024,
        index_interval_bytes: 512,
        max_index_bytes: 4096,
        max_batch_bytes: 2 * 1024,
        retention_ms: None,
        flush: FlushPolicy::Always,
        ..LogConfig::default()
    }
}

fn batch(tag: u64) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&Record {
        timestamp: 1,
        value: Some(Bytes::from(format!("record-{tag}-{}", "x".repeat(200)))),
        ..Record::default()
    });
    b.build().expect("batch")
}

/// A log of several segments, left without a clean close; returns its end offset.
fn fill(dir: &Path) -> u64 {
    let log = PartitionLog::open(dir, config()).expect("open");
    let mut tag = 0;
    while log.segment_count() < 4 {
        log.append_as_leader(&batch(tag), 3, tag + 1).expect("append");
        tag += 1;
    }
    log.log_end_offset()
}

fn marker_for_second_batch_of_first_segment(dir: &Path) -> CorruptBatch {
    let log = PartitionLog::open(dir, config()).expect("open");
    let first = log.read_segments()[0].clone();
    let mut second = None;
    first
        .scan_headers(0, first.size(), |position, h| {
            if position > 0 {
                second = Some((position, h.base_offset));
                return false;
            }
            true
        })
        .expect("scan");
    let (position, offset) = second.expect("two batches in the first segment");
    CorruptBatch {
        offset,
        segment_base_offset: first.base_offset(),
        position,
        detail: "test".into(),
    }
}

/// What the scrub does on finding damage: record the marker (and poison the log).
fn quarantine(dir: &Path, corrupt: &CorruptBatch) {
    let log = PartitionLog::open(dir, config()).expect("open");
    log.quarantine(corrupt).expect("marker");
}

#[test]
fn an_open_without_damage_reports_no_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let end = fill(dir.path());
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(log.recovery_report(), RecoveryReport::default());
}

#[test]
fn an_open_that_cuts_a_torn_tail_reports_where_and_how_much() {
    let dir = tempfile::tempdir().expect("tempdir");
    let end = fill(dir.path());
    let log = PartitionLog::open(dir.path(), config()).expect("open");
    let last = log.read_segments().last().expect("segment").log_path().to_path_buf();
    drop(log);
    let file = fs::OpenOptions::new().append(true).open(&last).expect("open segment");
    std::io::Write::write_all(&mut &file, &[0xAB; 100]).expect("torn tail");
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(
        log.recovery_report().cut,
        Some(LogCut {
            offset: end,
            dropped_bytes: 100,
            cause: CutCause::TornTail,
        })
    );
}

#[test]
fn a_marker_naming_a_batch_that_is_intact_cuts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let end = fill(dir.path());
    let corrupt = marker_for_second_batch_of_first_segment(dir.path());
    quarantine(dir.path(), &corrupt);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), end, "nothing cut");
    assert_eq!(log.segment_count(), 4);
    assert_eq!(log.recovery_report(), RecoveryReport::default(), "nothing lost");
    assert!(
        scrub::read_marker(dir.path()).expect("read").is_none(),
        "marker removed"
    );
}

#[test]
fn a_marker_naming_a_batch_past_the_segment_end_cuts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let end = fill(dir.path());
    let mut corrupt = marker_for_second_batch_of_first_segment(dir.path());
    corrupt.position = 1 << 30;
    quarantine(dir.path(), &corrupt);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), end, "nothing cut");
    assert_eq!(log.recovery_report().cut, None);
    assert!(
        log.recovery_report().damaged.is_some(),
        "a batch gone is taken for one an earlier open cut: the loss is reported"
    );
}

#[test]
fn a_marker_naming_a_damaged_batch_cuts_there_and_reports_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path());
    let corrupt = marker_for_second_batch_of_first_segment(dir.path());
    let path = file_names::segment_file(dir.path(), corrupt.segment_base_offset, file_names::LOG_SUFFIX);
    let file = fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    let at = corrupt.position + HEADER_LEN as u64 + 3;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).expect("read");
    file.write_all_at(&[byte[0] ^ 0x10], at).expect("flip");
    let last = PartitionLog::open(dir.path(), config()).expect("open").log_end_offset();
    quarantine(dir.path(), &corrupt);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), corrupt.offset);
    let report = log.recovery_report();
    let cut = report.cut.expect("a cut");
    assert_eq!(cut.offset, corrupt.offset);
    assert_eq!(cut.cause, CutCause::CorruptBatch);
    assert!(cut.dropped_bytes > 0);
    // `fill` stamps batch `tag` (offset `tag`) with epoch 3 and Raft index `tag + 1`.
    let stamp = BatchStamp {
        leader_epoch: 3,
        raft_index: last,
    };
    assert_eq!(
        report.damaged,
        Some(Damaged {
            last_before: Some(stamp)
        }),
        "the last batch the log held before the cut"
    );
    drop(log);

    // Until the loss is recorded and the marker released, every open reports it again.
    let log = PartitionLog::open(dir.path(), config()).expect("reopen after a crash");
    assert_eq!(log.log_end_offset(), corrupt.offset, "nothing more cut");
    assert_eq!(log.recovery_report().cut, None);
    assert_eq!(log.recovery_report().damaged, report.damaged, "reported again");
    log.retire();
    assert!(
        matches!(log.release_corruption_marker(), Err(LogError::Closed)),
        "a retired log releases nothing"
    );
    drop(log);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    log.release_corruption_marker().expect("release");
    drop(log);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.recovery_report(), RecoveryReport::default());
}

#[test]
fn a_marker_in_the_first_format_reports_its_loss_without_a_stamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    fill(dir.path());
    let corrupt = marker_for_second_batch_of_first_segment(dir.path());
    let path = file_names::segment_file(dir.path(), corrupt.segment_base_offset, file_names::LOG_SUFFIX);
    let file = fs::OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(b"\xff\xff", corrupt.position + HEADER_LEN as u64 + 3)
        .expect("flip");
    let mut content = Vec::new();
    for word in [corrupt.offset, corrupt.segment_base_offset, corrupt.position] {
        content.extend_from_slice(&word.to_le_bytes());
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&content);
    hasher.update(b"old");
    content.extend_from_slice(&hasher.finalize().to_le_bytes());
    content.extend_from_slice(b"old");
    fs::write(dir.path().join(scrub::CORRUPTION_MARKER), content).expect("old marker");
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), corrupt.offset, "cut where it names");
    assert_eq!(log.recovery_report().damaged, Some(Damaged { last_before: None }));
}

/// `count` batches in one segment (stamped epoch 3, Raft index `tag + 1`), left without a
/// clean close; returns the byte position of each batch.
fn one_segment(dir: &Path, count: u64) -> Vec<u64> {
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        index_interval_bytes: 256,
        ..config()
    };
    let log = PartitionLog::open(dir, config).expect("open");
    for tag in 0..count {
        log.append_as_leader(&batch(tag), 3, tag + 1).expect("append");
    }
    assert_eq!(log.segment_count(), 1);
    let segment = log.read_segments()[0].clone();
    let mut positions = Vec::new();
    segment
        .scan_headers(0, segment.size(), |position, _| {
            positions.push(position);
            true
        })
        .expect("scan");
    positions
}

fn flip_payload_byte(dir: &Path, position: u64) {
    let path = file_names::segment_file(dir, 0, file_names::LOG_SUFFIX);
    let file = fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
    let at = position + HEADER_LEN as u64 + 3;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).expect("read");
    file.write_all_at(&[byte[0] ^ 0x10], at).expect("flip");
}

#[test]
fn a_bad_frame_with_intact_batches_after_it_is_reported_as_damage_with_the_last_intact_stamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let positions = one_segment(dir.path(), 40);
    flip_payload_byte(dir.path(), positions[10]);
    let log = PartitionLog::open(
        dir.path(),
        LogConfig {
            segment_bytes: 64 * 1024,
            index_interval_bytes: 256,
            ..config()
        },
    )
    .expect("reopen");
    assert_eq!(log.log_end_offset(), 10, "cut at the bad frame");
    let cut = log.recovery_report().cut.expect("a cut");
    assert_eq!(
        cut.cause,
        CutCause::Damage {
            last_intact: BatchStamp {
                leader_epoch: 3,
                raft_index: 40
            }
        },
        "the batches after the bad frame are intact: damage, not a torn write"
    );
}

#[test]
fn a_bad_last_frame_is_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let positions = one_segment(dir.path(), 40);
    flip_payload_byte(dir.path(), positions[39]);
    let log = PartitionLog::open(dir.path(), config()).expect("reopen");
    assert_eq!(log.log_end_offset(), 39);
    assert_eq!(
        log.recovery_report().cut.map(|c| c.cause),
        Some(CutCause::TornTail),
        "nothing intact after it"
    );
}

#[test]
fn a_bad_frame_in_a_segment_followed_by_later_segments_is_damage_with_their_last_stamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Under `os` a roll does not move the recovery point: every segment is scanned.
    let config = LogConfig {
        flush: FlushPolicy::Os,
        ..config()
    };
    let log = PartitionLog::open(dir.path(), config.clone()).expect("open");
    let mut tag = 0;
    while log.segment_count() < 4 {
        log.append_as_leader(&batch(tag), 3, tag + 1).expect("append");
        tag += 1;
    }
    let second = log.read_segments()[1].clone();
    let (base, size) = (second.base_offset(), second.size());
    drop(second);
    drop(log);
    let path = file_names::segment_file(dir.path(), base, file_names::LOG_SUFFIX);
    // The last batch of the second segment: no index entry of its own segment follows it.
    let mut last = 0;
    let seg = fs::read(&path).expect("read");
    let mut at = 0usize;
    while at < seg.len() {
        last = at as u64;
        at += BatchHeader::parse(&seg[at..]).expect("header").size();
    }
    assert_eq!(at as u64, size);
    let file = fs::OpenOptions::new().write(true).open(&path).expect("open");
    file.write_all_at(b"\xff\xff", last + HEADER_LEN as u64 + 3)
        .expect("flip");
    let log = PartitionLog::open(dir.path(), config).expect("reopen");
    assert_eq!(log.segment_count(), 2, "later segments dropped with the cut");
    assert_eq!(
        log.recovery_report().cut.map(|c| c.cause),
        Some(CutCause::Damage {
            last_intact: BatchStamp {
                leader_epoch: 3,
                raft_index: tag
            }
        }),
        "the later segments held intact batches"
    );
}
