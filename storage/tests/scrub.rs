//! The scrub: verifying sealed segments, quarantining a log with a corrupt batch, and cutting
//! it there when it is reopened.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use common::{batch, batches, files_with, small_config};
use conveyor_storage::batch::{HEADER_LEN, STAMPED_LEN};
use conveyor_storage::crash_sim::power_cut;
use conveyor_storage::scrub::CORRUPTION_MARKER;
use conveyor_storage::{CorruptBatch, FlushPolicy, LogError, PartitionLog, ScrubCursor, ScrubStep};

/// A small chunk, so that a pass takes many steps and resumes mid-segment.
const CHUNK: u64 = 1000;
const SEGMENTS: usize = 5;

/// Appends until the log has `SEGMENTS` segments; returns (base offset, bytes after the
/// stamped prefix) of every batch.
fn fill(log: &PartitionLog) -> Vec<(u64, Bytes)> {
    let mut appended = Vec::new();
    let mut tag = 0;
    while log.segment_count() < SEGMENTS {
        let b = batch(tag, 4, 1_700_000_000_000);
        let info = log.append(&b).expect("append");
        appended.push((info.base_offset, b.slice(STAMPED_LEN..)));
        tag += 1;
    }
    appended
}

/// Runs one whole pass: bytes verified and the corrupt batch found, if any.
fn scrub_pass(log: &PartitionLog) -> (u64, Option<CorruptBatch>) {
    let mut cursor = ScrubCursor::start();
    let mut verified = 0;
    loop {
        match log.scrub_step(cursor, CHUNK).expect("scrub step") {
            ScrubStep::Verified { bytes, next } => {
                verified += bytes;
                cursor = next;
            }
            ScrubStep::PassComplete => return (verified, None),
            ScrubStep::Corrupt(c) => return (verified, Some(c)),
        }
    }
}

fn xor_byte(path: &Path, at: u64, mask: u8) {
    let file = fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).expect("read");
    byte[0] ^= mask;
    file.write_all_at(&byte, at).expect("write");
}

#[test]
fn a_scrub_of_an_intact_log_verifies_every_sealed_byte_and_not_the_active_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    fill(&log);
    let logs = files_with(dir.path(), "log");
    let sealed: u64 = logs[..logs.len() - 1]
        .iter()
        .map(|p| fs::metadata(p).expect("stat").len())
        .sum();
    let (verified, corrupt) = scrub_pass(&log);
    assert_eq!(corrupt, None);
    assert_eq!(
        verified, sealed,
        "every sealed byte verified once, the active segment never"
    );
    assert!(!log.is_poisoned());
    log.append(&batch(9999, 1, 1)).expect("appends go on");
}

/// Where the damage goes, relative to the start of a batch.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// A record byte: covered by the CRC.
    Record,
    /// The length field: the frame no longer fits.
    Length,
    /// The base offset: outside the CRC, caught by continuity.
    BaseOffset,
}

fn corrupt_a_sealed_batch(damage: Damage) -> (tempfile::TempDir, Vec<(u64, Bytes)>, CorruptBatch) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("open");
    let appended = fill(&log);
    // A batch in the middle of the second (sealed) segment.
    let second = files_with(dir.path(), "log")[1].clone();
    let second_base: u64 = second
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let in_second: Vec<u64> = appended
        .iter()
        .map(|(b, _)| *b)
        .filter(|&b| b >= second_base)
        .take_while(|&b| log.locate(b).expect("locate").expect("found").segment_base_offset == second_base)
        .collect();
    let target = in_second[in_second.len() / 2];
    let at = log.locate(target).expect("locate").expect("found");
    let byte = match damage {
        Damage::Record => at.position + HEADER_LEN as u64 + 10,
        Damage::Length => at.position + 10,
        Damage::BaseOffset => at.position + 3,
    };
    xor_byte(&second, byte, 0x5a);

    let (_, found) = scrub_pass(&log);
    let found = found.unwrap_or_else(|| panic!("{damage:?}: the scrub finds the damage"));
    assert_eq!(found.offset, target, "{damage:?}: {found}");
    assert_eq!(found.segment_base_offset, second_base, "{damage:?}: {found}");
    assert_eq!(found.position, at.position, "{damage:?}: {found}");
    assert!(log.is_poisoned());
    assert_eq!(log.quarantined(), Some(&found));
    assert!(dir.path().join(CORRUPTION_MARKER).exists(), "the finding is persisted");
    let read = log.read(0, 1 << 20).expect_err("a quarantined log serves nothing");
    assert!(matches!(read, LogError::Corrupt { .. }), "{read}");
    assert!(read.to_string().contains(&format!("offset {target}")), "{read}");
    let append = log
        .append(&batch(9999, 1, 1))
        .expect_err("a quarantined log takes no appends");
    assert!(matches!(append, LogError::Poisoned { .. }), "{append}");
    (dir, appended, found)
}

fn assert_reopen_cuts_at(dir: &Path, appended: &[(u64, Bytes)], found: &CorruptBatch) {
    let log = PartitionLog::open(dir, small_config(FlushPolicy::Always)).expect("reopen");
    assert_eq!(log.log_end_offset(), found.offset, "cut at the corrupt batch");
    assert!(log.recovery_report().damaged.is_some(), "the loss is reported");
    assert!(
        dir.join(CORRUPTION_MARKER).exists(),
        "the marker stays until the replication layer has recorded the loss"
    );
    log.release_corruption_marker().expect("release");
    assert!(!dir.join(CORRUPTION_MARKER).exists(), "released");
    let kept: Vec<(u64, Bytes)> = batches(&log)
        .into_iter()
        .map(|b| (b.header().base_offset, b.bytes().slice(STAMPED_LEN..)))
        .collect();
    let expected: Vec<_> = appended
        .iter()
        .take_while(|(b, _)| *b < found.offset)
        .cloned()
        .collect();
    assert_eq!(kept, expected, "everything before the corrupt batch is intact");
    let info = log.append(&batch(4242, 2, 1)).expect("appends go on at the cut");
    assert_eq!(info.base_offset, found.offset);
    let (_, corrupt) = scrub_pass(&log);
    assert_eq!(corrupt, None, "nothing corrupt is left");
}

#[test]
fn a_scrub_finds_damage_in_a_sealed_segment_at_its_batch_and_reopening_cuts_the_log_there() {
    for damage in [Damage::Record, Damage::Length, Damage::BaseOffset] {
        let (dir, appended, found) = corrupt_a_sealed_batch(damage);
        assert_reopen_cuts_at(dir.path(), &appended, &found);
    }
}

#[test]
fn a_corruption_marker_survives_a_power_cut_before_the_cut_and_the_next_open_cuts() {
    let (dir, appended, found) = corrupt_a_sealed_batch(Damage::Record);
    power_cut(dir.path()).expect("power cut");
    assert!(dir.path().join(CORRUPTION_MARKER).exists(), "the marker was durable");
    assert_reopen_cuts_at(dir.path(), &appended, &found);
}

#[test]
fn a_clean_close_does_not_skip_the_cut_a_marker_asks_for() {
    let (dir, appended, found) = corrupt_a_sealed_batch(Damage::Record);
    // close() refuses on a poisoned log, so write the clean-shutdown marker as a close would.
    fs::write(dir.path().join(".clean_shutdown"), b"").expect("marker");
    assert_reopen_cuts_at(dir.path(), &appended, &found);
}

#[test]
fn a_damaged_corruption_marker_stops_open_with_a_message_that_says_what_to_do() {
    let (dir, _, _) = corrupt_a_sealed_batch(Damage::Record);
    let marker = dir.path().join(CORRUPTION_MARKER);
    xor_byte(&marker, 2, 0xff);
    let err = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect_err("damaged marker");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("remove the file"), "{err}");
}

#[test]
fn a_scrub_running_alongside_appends_truncations_and_retention_reports_no_false_corruption() {
    const ROUNDS: u64 = 60;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Os)).expect("open");
    fill(&log);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            for round in 0..ROUNDS {
                for i in 0..20 {
                    log.append(&batch(round * 100 + i, 4, 1_700_000_000_000))
                        .expect("append");
                }
                // Cut back into an older (sealed) segment at a batch boundary, as a Raft
                // conflict does, and let retention drop the oldest segment now and then.
                let back = log.log_end_offset().saturating_sub(150).max(log.log_start_offset());
                if let Some(at) = log.locate(back).expect("locate") {
                    log.truncate_to(at.batch_base_offset).expect("truncate");
                }
                if round % 10 == 9 {
                    log.delete_segments_before(log.log_start_offset() + 1)
                        .expect("retention");
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            let (_, corrupt) = scrub_pass(&log);
            assert_eq!(corrupt, None, "a healthy log changing under the scrub is not damage");
        }
    });
    assert!(!log.is_poisoned());
    let (_, corrupt) = scrub_pass(&log);
    assert_eq!(corrupt, None);
}
