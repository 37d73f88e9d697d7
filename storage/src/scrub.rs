//! Scrubbing: verifying stored batches before they are served, and quarantining damage.
//!
//! [`PartitionLog::scrub_step`] verifies a bounded chunk of the *sealed* segments (never the
//! active one) and returns where to resume, so that a caller can rate-limit a pass over a log
//! and spread it over time. Each batch's frame is checked: its length fits the segment, its
//! base offset continues the previous batch, and its CRC matches. The stamped leader epoch and
//! Raft index sit outside the CRC and cannot be checked here (see [`crate::recovery`]).
//!
//! # Locks
//! Reads go through the segment file with `pread` and hold no lock; the segment list is read
//! under its lock only long enough to clone it. Only when damage is found is the writer lock
//! taken, to check the finding against a log that cannot change underneath (a truncation can
//! cut a sealed segment while it is read), so appends are never blocked on a healthy log.
//!
//! # Quarantine
//! A corrupt batch is first recorded durably in the partition directory (the marker file
//! [`CORRUPTION_MARKER`]: its offset, segment and byte position), then the log is poisoned:
//! reads fail with [`LogError::Corrupt`] and appends with [`LogError::Poisoned`], so the bad
//! bytes are never served. The next [`PartitionLog::open`] of the directory honours the marker:
//! it cuts the log at the corrupt batch (everything from it on is dropped) and removes the
//! marker only once that cut is durable, so a crash between marking and cutting cuts on the
//! following open. The replica then catches up from its leader.
//!
//! Cutting is only right where a peer holds the data again: the caller says so with
//! [`OnDamage`]. A replica with no other voter (a single node, replication factor 1) must
//! not cut acknowledged data that is mostly intact; its damage is only reported
//! ([`OnDamage::Report`]), reads that reach the bad batch fail their CRC checks, and the
//! repair is an operator's.
//!
//! An I/O error while reading is not damage: the step fails and the pass is retried later.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use crate::batch::{BatchHeader, CRC_START, HEADER_LEN, MAGIC, validate::check_frame};
use crate::error::{LogError, Result};
use crate::log::PartitionLog;
use crate::segment::Segment;
use crate::sync::{replace_file_durably, sync_dir};

/// Marker file naming the first corrupt batch found; present until open cuts the log there.
pub const CORRUPTION_MARKER: &str = "corrupt-batch";

/// Largest read the scrub makes at once for a batch that does not fit the caller's chunk;
/// such a batch's CRC is computed over reads of this size.
const LARGE_BATCH_READ: usize = 1 << 20;

/// Where a scrub pass resumes: a byte position in a sealed segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScrubCursor {
    segment_base_offset: u64,
    /// The segment object `position` belongs to: the cleaner may have replaced the segment
    /// with one of the same base offset since, where the position means nothing.
    segment_id: u64,
    position: u64,
    /// The base offset the batch at `position` must have.
    next_offset: u64,
}

impl ScrubCursor {
    /// The start of a pass: the first sealed segment.
    pub fn start() -> ScrubCursor {
        ScrubCursor::default()
    }

    /// Base offset of the segment the scrub resumes in (or the first one after it).
    pub fn segment_base_offset(&self) -> u64 {
        self.segment_base_offset
    }

    /// The byte position within that segment.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Where a pass goes on after `corrupt` when the damage is only reported: the next
    /// sealed segment. A damaged frame's length cannot be trusted, so the rest of its segment
    /// is not walked; every later segment still is.
    pub fn past_segment_of(corrupt: &CorruptBatch) -> ScrubCursor {
        ScrubCursor {
            segment_base_offset: corrupt.segment_base_offset.saturating_add(1),
            segment_id: 0,
            position: 0,
            next_offset: 0,
        }
    }
}

/// A batch that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBatch {
    /// The offset the batch should start at.
    pub offset: u64,
    pub segment_base_offset: u64,
    /// Byte position of the batch in its segment's `.log` file.
    pub position: u64,
    /// What is wrong with it.
    pub detail: String,
}

impl std::fmt::Display for CorruptBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "batch at offset {} (byte {} of segment {}) is corrupt: {}",
            self.offset, self.position, self.segment_base_offset, self.detail
        )
    }
}

/// What a scrub does with a corrupt batch it found and confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Record it durably and poison the log, so that it is reopened and cut there and then
    /// repaired from a peer.
    Quarantine,
    /// Only report it: nothing is changed (there is no peer to repair from).
    Report,
}

/// The leader epoch and Raft index stamped on a batch. Ordered by epoch, then index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BatchStamp {
    pub leader_epoch: u64,
    pub raft_index: u64,
}

/// What the corruption marker records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Marker {
    pub corrupt: CorruptBatch,
    /// The stamp of the log's last batch when the damage was found. The log is poisoned in
    /// the same step, under the writer lock, so nothing newer was ever appended to it: a
    /// replica never acknowledged an entry past this stamp. `None` only in a marker written
    /// before markers carried it: a quarantine that cannot read the stamp fails instead.
    pub last_before: Option<BatchStamp>,
}

/// What one [`PartitionLog::scrub_step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScrubStep {
    /// `bytes` bytes verified intact; call again with `next`.
    Verified { bytes: u64, next: ScrubCursor },
    /// Every sealed segment from the cursor on is verified: the pass is complete.
    PassComplete,
    /// A corrupt batch was found. Under [`OnDamage::Quarantine`] it is recorded durably and
    /// the log is quarantined.
    Corrupt(CorruptBatch),
}

impl PartitionLog {
    /// Verifies about `max_bytes` (at least one batch) of the sealed segments from `cursor`.
    /// On damage the log is quarantined (see the module docs) before this returns. Fails on a
    /// log that is poisoned or closed.
    pub fn scrub_step(&self, cursor: ScrubCursor, max_bytes: u64) -> Result<ScrubStep> {
        self.scrub_step_with(cursor, max_bytes, OnDamage::Quarantine)
    }

    /// As [`scrub_step`](Self::scrub_step), doing `on_damage` with a corrupt batch.
    pub fn scrub_step_with(&self, cursor: ScrubCursor, max_bytes: u64, on_damage: OnDamage) -> Result<ScrubStep> {
        self.check_readable()?;
        self.check_poisoned()?;
        let segment = {
            let segments = self.read_segments();
            let sealed = &segments[..segments.len() - 1];
            match sealed.iter().find(|s| s.base_offset() >= cursor.segment_base_offset) {
                Some(s) => Arc::clone(s),
                None => return Ok(ScrubStep::PassComplete),
            }
        };
        let base = segment.base_offset();
        let (start, expected) = if base == cursor.segment_base_offset && segment.id() == cursor.segment_id {
            (cursor.position, cursor.next_offset.max(base))
        } else {
            (0, base)
        };
        let end = segment.size();
        match verify_range(&segment, start, expected, end, max_bytes.max(HEADER_LEN as u64)) {
            Ok(Progress { position, next_offset }) if position >= end => Ok(ScrubStep::Verified {
                bytes: position - start,
                next: ScrubCursor {
                    segment_base_offset: next_offset.max(base + 1),
                    segment_id: 0,
                    position: 0,
                    next_offset,
                },
            }),
            Ok(Progress { position, next_offset }) => Ok(ScrubStep::Verified {
                bytes: position - start,
                next: ScrubCursor {
                    segment_base_offset: base,
                    segment_id: segment.id(),
                    position,
                    next_offset,
                },
            }),
            Err(Found { io: Some(e), .. }) => Err(e),
            Err(found) => self.confirm_and_quarantine(&segment, found, cursor, on_damage),
        }
    }

    /// Re-checks a finding under the writer lock, so that a segment cut by a concurrent
    /// truncation is not mistaken for damage, then quarantines the log.
    fn confirm_and_quarantine(
        &self,
        segment: &Arc<Segment>,
        found: Found,
        cursor: ScrubCursor,
        on_damage: OnDamage,
    ) -> Result<ScrubStep> {
        let _writer = self.lock_writer();
        let still_sealed = {
            let segments = self.read_segments();
            segments[..segments.len() - 1].iter().any(|s| Arc::ptr_eq(s, segment))
        };
        let end = segment.size();
        if !still_sealed || found.position >= end {
            // The segment changed under the scrub: start it again.
            return Ok(ScrubStep::Verified {
                bytes: 0,
                next: ScrubCursor {
                    segment_base_offset: cursor.segment_base_offset,
                    ..ScrubCursor::default()
                },
            });
        }
        let detail = match verify_range(segment, found.position, found.offset, end, HEADER_LEN as u64) {
            Err(Found { io: Some(e), .. }) => return Err(e),
            Err(again) if again.position == found.position => again.detail,
            // Fine on a second look: not damage at rest.
            _ => {
                return Ok(ScrubStep::Verified { bytes: 0, next: cursor });
            }
        };
        let corrupt = CorruptBatch {
            offset: found.offset,
            segment_base_offset: segment.base_offset(),
            position: found.position,
            detail,
        };
        if on_damage == OnDamage::Quarantine {
            self.quarantine_locked(&corrupt)?;
        }
        Ok(ScrubStep::Corrupt(corrupt))
    }

    /// Records `corrupt` durably in the partition directory and poisons the log, so that
    /// nothing more is served or appended until it is reopened (and cut there). The scrub
    /// does this under the writer lock it already holds; tests mark a batch directly.
    #[cfg(test)]
    pub(crate) fn quarantine(&self, corrupt: &CorruptBatch) -> Result<()> {
        let _writer = self.lock_writer();
        self.quarantine_locked(corrupt)
    }

    /// As [`quarantine`](Self::quarantine), the writer lock held: nothing is appended
    /// between reading the log's last stamp and poisoning it, so the marker's stamp bounds
    /// everything this log ever held (see [`Marker`]).
    fn quarantine_locked(&self, corrupt: &CorruptBatch) -> Result<()> {
        tracing::error!(
            dir = %self.dir().display(),
            offset = corrupt.offset,
            segment = corrupt.segment_base_offset,
            position = corrupt.position,
            detail = %corrupt.detail,
            "corrupt batch found; the log is quarantined and will be cut there when reopened"
        );
        // Without the stamp a marker could only promise the worst (an entry of a newer term),
        // which can keep a healthy group from electing a leader: fail this step instead,
        // before anything is poisoned or written, and let the next pass try again.
        let last_before = match self.last_stamp() {
            Ok(Some(stamp)) => stamp,
            Ok(None) => {
                return Err(LogError::Corrupt {
                    path: self.dir().to_path_buf(),
                    detail: format!("{corrupt}, but the log holds no batch whose stamp bounds what it held"),
                });
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir().display(), error = %e, "could not read the last batch's stamp; not quarantining this pass");
                return Err(e);
            }
        };
        self.set_quarantined(corrupt.clone());
        write_marker(
            self.dir(),
            &Marker {
                corrupt: corrupt.clone(),
                last_before: Some(last_before),
            },
        )
    }

    /// The stamp of the log's last batch, if it has one.
    fn last_stamp(&self) -> Result<Option<BatchStamp>> {
        for segment in self.segments_snapshot().iter().rev() {
            let size = segment.size();
            if size == 0 {
                continue;
            }
            let start = segment.offset_index().last().map_or(0, |e| u64::from(e.position));
            let mut last = None;
            segment.scan_headers(start, size, |_, h| {
                last = Some(BatchStamp {
                    leader_epoch: h.leader_epoch,
                    raft_index: h.raft_index,
                });
                true
            })?;
            if last.is_some() {
                return Ok(last);
            }
        }
        Ok(None)
    }

    /// Removes the corruption marker a reopening kept (see [`crate::RecoveryReport`]): the
    /// caller has durably recorded what the report's [`Damaged`](crate::Damaged) says.
    /// Refused on a closed or retired log.
    pub fn release_corruption_marker(&self) -> Result<()> {
        let _writer = self.lock_writer();
        if self.is_closed() {
            return Err(LogError::Closed);
        }
        remove_marker(self.dir())
    }
}

struct Progress {
    position: u64,
    next_offset: u64,
}

struct Found {
    position: u64,
    offset: u64,
    detail: String,
    /// Set when the bytes could not be read at all: an I/O error, not damage.
    io: Option<LogError>,
}

/// Whether a failed read means the bytes are missing (the file is shorter than the segment
/// says: damage) rather than that reading failed (an I/O error, retried later).
fn missing_bytes(e: &LogError) -> bool {
    matches!(e, LogError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof)
}

/// Verifies batches from `position` (which must start at `expected`) towards `end`, reading
/// about `budget` bytes. Stops at a batch boundary.
fn verify_range(
    segment: &Segment,
    mut position: u64,
    mut expected: u64,
    end: u64,
    budget: u64,
) -> std::result::Result<Progress, Found> {
    let start = position;
    let found = |position: u64, offset: u64, detail: String| Found {
        position,
        offset,
        detail,
        io: None,
    };
    while position < end && (position == start || position - start < budget) {
        if end - position < HEADER_LEN as u64 {
            return Err(found(
                position,
                expected,
                "a partial batch header ends the segment".into(),
            ));
        }
        let want = (end - position).min(budget.max(HEADER_LEN as u64)) as usize;
        let chunk = segment.read_exact_at(position, want).map_err(|e| {
            if missing_bytes(&e) {
                found(position, expected, format!("unreadable: {e}"))
            } else {
                Found {
                    io: Some(e),
                    ..found(position, expected, String::new())
                }
            }
        })?;
        let mut at = 0usize;
        while at + HEADER_LEN <= chunk.len() {
            let here = position + at as u64;
            let header = BatchHeader::parse(&chunk[at..]).map_err(|e| found(here, expected, e.to_string()))?;
            let size = header.size() as u64;
            if size < HEADER_LEN as u64 || here + size > end {
                return Err(found(
                    here,
                    expected,
                    format!("batch length {size} runs past the segment end (byte {end})"),
                ));
            }
            if header.base_offset != expected {
                return Err(found(
                    here,
                    expected,
                    format!("base offset {} does not continue the log", header.base_offset),
                ));
            }
            if at as u64 + size <= chunk.len() as u64 {
                check_frame(&chunk[at..at + size as usize], usize::MAX)
                    .map_err(|e| found(here, expected, e.to_string()))?;
            } else if at == 0 {
                verify_large(segment, here, &header).map_err(|d| found(here, expected, d))?;
            } else {
                break;
            }
            at += size as usize;
            expected = header.next_offset();
            if at as u64 >= budget {
                break;
            }
        }
        if at == 0 {
            break;
        }
        position += at as u64;
    }
    Ok(Progress {
        position,
        next_offset: expected,
    })
}

/// Checks a batch too large for one read: its version and its CRC, computed over bounded reads.
fn verify_large(segment: &Segment, position: u64, header: &BatchHeader) -> std::result::Result<(), String> {
    if header.magic != MAGIC {
        return Err(format!("batch format version {} is not supported", header.magic));
    }
    let mut hasher = crc32fast::Hasher::new();
    let end = position + header.size() as u64;
    let mut at = position + CRC_START as u64;
    while at < end {
        let len = (end - at).min(LARGE_BATCH_READ as u64) as usize;
        let buf = segment.read_exact_at(at, len).map_err(|e| format!("unreadable: {e}"))?;
        hasher.update(&buf);
        at += len as u64;
    }
    let actual = hasher.finalize();
    if actual != header.crc {
        return Err(format!(
            "batch CRC mismatch: header says {:#010x}, content hashes to {actual:#010x}",
            header.crc
        ));
    }
    Ok(())
}

/// Marks the format that carries the last stamp (the first one did not start with a tag).
const MARKER_V2: &[u8; 4] = b"CBM2";
/// Bytes before the detail in each format.
const V1_FIXED: usize = 28;
const V2_FIXED: usize = 4 + 5 * 8 + 1 + 4;

/// `"CBM2" [offset u64][segment base u64][position u64][u8 has_stamp][leader epoch u64]
/// [raft index u64][crc32 of everything before it + detail][detail]`. The first format,
/// still read, was `[offset u64][segment base u64][position u64][crc32 of the 24 bytes +
/// detail][detail]`, without a stamp.
fn write_marker(dir: &Path, marker: &Marker) -> Result<()> {
    let corrupt = &marker.corrupt;
    let stamp = marker.last_before.unwrap_or(BatchStamp {
        leader_epoch: 0,
        raft_index: 0,
    });
    let mut content = Vec::with_capacity(V2_FIXED + corrupt.detail.len());
    content.extend_from_slice(MARKER_V2);
    for word in [corrupt.offset, corrupt.segment_base_offset, corrupt.position] {
        content.extend_from_slice(&word.to_le_bytes());
    }
    content.push(u8::from(marker.last_before.is_some()));
    content.extend_from_slice(&stamp.leader_epoch.to_le_bytes());
    content.extend_from_slice(&stamp.raft_index.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&content);
    hasher.update(corrupt.detail.as_bytes());
    content.extend_from_slice(&hasher.finalize().to_le_bytes());
    content.extend_from_slice(corrupt.detail.as_bytes());
    replace_file_durably(dir, CORRUPTION_MARKER, &content)
}

/// The recorded marker, if one is present. A damaged marker cannot be trusted to name the
/// right place; it reads as `Err` so that the caller decides.
pub(crate) fn read_marker(dir: &Path) -> Result<Option<Marker>> {
    let path = dir.join(CORRUPTION_MARKER);
    let content = match fs::read(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(LogError::io("read corruption marker", &path)(e)),
    };
    match decode_v2(&content).or_else(|| decode_v1(&content)) {
        Some(marker) => Ok(Some(marker)),
        None => Err(LogError::Corrupt {
            path: path.clone(),
            detail: "the corruption marker is damaged, so where to cut the log is unknown; remove the file to \
                     open the log as it is (the scrub will find the damage again)"
                .into(),
        }),
    }
}

fn u64_at(content: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(content.get(at..at + 8)?.try_into().ok()?))
}

fn crc_checks(content: &[u8], fixed: usize) -> bool {
    let crc = u32::from_le_bytes(content[fixed - 4..fixed].try_into().unwrap_or_default());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&content[..fixed - 4]);
    hasher.update(&content[fixed..]);
    hasher.finalize() == crc
}

fn decode_v2(content: &[u8]) -> Option<Marker> {
    if content.len() < V2_FIXED || &content[..4] != MARKER_V2 || !crc_checks(content, V2_FIXED) {
        return None;
    }
    let last_before = match content[28] {
        0 => None,
        1 => Some(BatchStamp {
            leader_epoch: u64_at(content, 29)?,
            raft_index: u64_at(content, 37)?,
        }),
        _ => return None,
    };
    Some(Marker {
        corrupt: CorruptBatch {
            offset: u64_at(content, 4)?,
            segment_base_offset: u64_at(content, 12)?,
            position: u64_at(content, 20)?,
            detail: String::from_utf8_lossy(&content[V2_FIXED..]).into_owned(),
        },
        last_before,
    })
}

fn decode_v1(content: &[u8]) -> Option<Marker> {
    if content.len() < V1_FIXED || !crc_checks(content, V1_FIXED) {
        return None;
    }
    Some(Marker {
        corrupt: CorruptBatch {
            offset: u64_at(content, 0)?,
            segment_base_offset: u64_at(content, 8)?,
            position: u64_at(content, 16)?,
            detail: String::from_utf8_lossy(&content[V1_FIXED..]).into_owned(),
        },
        last_before: None,
    })
}

/// Removes the marker durably: the cut it names is durable, and what it says was lost has
/// been recorded where it is needed (or nothing was lost).
pub(crate) fn remove_marker(dir: &Path) -> Result<()> {
    let path = dir.join(CORRUPTION_MARKER);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::io("remove corruption marker", &path)(e)),
        _ => sync_dir(dir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{BatchBuilder, Compression, Record};
    use crate::config::{FlushPolicy, LogConfig};

    fn log_with_sealed_segments(dir: &Path) -> PartitionLog {
        let config = LogConfig {
            segment_bytes: 4096,
            max_batch_bytes: 2048,
            index_interval_bytes: 512,
            max_index_bytes: 4096,
            flush: FlushPolicy::Os,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(dir, config).expect("open");
        let mut i = 0u32;
        while log.segment_count() < 3 {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1,
                key: None,
                value: Some(bytes::Bytes::from(format!("value-{i}-{}", "v".repeat(200)))),
                headers: vec![],
            });
            log.append(&b.build().expect("batch")).expect("append");
            i += 1;
        }
        log
    }

    fn found_in(segment: &Segment) -> Found {
        let position = segment.size() / 2;
        Found {
            position,
            offset: segment.base_offset(),
            detail: "unreadable".into(),
            io: None,
        }
    }

    #[test]
    fn a_finding_in_a_segment_truncated_meanwhile_is_not_reported_and_the_segment_is_scrubbed_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_with_sealed_segments(dir.path());
        let second = Arc::clone(&log.read_segments()[1]);
        let found = found_in(&second);
        // A Raft conflict cuts the log back into the segment the scrub was reading.
        log.truncate_to(second.base_offset()).expect("truncate");
        let cursor = ScrubCursor {
            segment_base_offset: second.base_offset(),
            segment_id: second.id(),
            position: found.position,
            next_offset: found.offset,
        };
        let step = log
            .confirm_and_quarantine(&second, found, cursor, OnDamage::Quarantine)
            .expect("step");
        assert_eq!(
            step,
            ScrubStep::Verified {
                bytes: 0,
                next: ScrubCursor {
                    segment_base_offset: second.base_offset(),
                    ..ScrubCursor::default()
                }
            }
        );
        assert!(!log.is_poisoned());
        assert!(!dir.path().join(CORRUPTION_MARKER).exists());
    }

    #[test]
    fn a_finding_that_a_second_look_does_not_confirm_is_not_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_with_sealed_segments(dir.path());
        let first = Arc::clone(&log.read_segments()[0]);
        // The batch at byte 0 of the first segment is intact.
        let found = Found {
            position: 0,
            offset: first.base_offset(),
            detail: "unreadable".into(),
            io: None,
        };
        let step = log
            .confirm_and_quarantine(&first, found, ScrubCursor::start(), OnDamage::Quarantine)
            .expect("step");
        assert_eq!(
            step,
            ScrubStep::Verified {
                bytes: 0,
                next: ScrubCursor::start()
            }
        );
        assert!(!log.is_poisoned());
    }

    #[test]
    fn given_the_last_stamp_cannot_be_read_the_quarantine_fails_and_writes_no_marker() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_with_sealed_segments(dir.path());
        let segments = log.read_segments();
        let (first, active) = (Arc::clone(&segments[0]), Arc::clone(&segments[segments.len() - 1]));
        drop(segments);
        let file = fs::OpenOptions::new().write(true).open(first.log_path()).expect("open");
        file.write_all_at(b"\xff\xff", HEADER_LEN as u64 + 4).expect("flip");
        // The active segment's bytes are gone from under the log: its last stamp is unreadable.
        assert!(active.size() > 0);
        fs::OpenOptions::new()
            .write(true)
            .open(active.log_path())
            .expect("open")
            .set_len(2)
            .expect("shorten");
        let step = log.scrub_step(ScrubCursor::start(), 1 << 20);
        assert!(step.is_err(), "the step fails and the pass is retried: {step:?}");
        assert!(
            !dir.path().join(CORRUPTION_MARKER).exists(),
            "no marker without the stamp that bounds what the replica acknowledged"
        );
        assert!(!log.is_poisoned(), "nothing is quarantined yet");
    }
}
