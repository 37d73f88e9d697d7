//! Producer state snapshots: the [`ProducerTable`] of every batch below an offset, in
//! `producers/<offset, 20 digits>.snapshot` inside the partition directory.
//!
//! A snapshot is written when the state reaches a segment's base offset (so that retention,
//! which deletes whole segments, always leaves a log whose start has a snapshot) and at a
//! clean close; opening loads the newest one at or below where replay must end and replays
//! batch headers from there. A follower that receives a Raft snapshot stores the leader's.
//!
//! # Format (little-endian)
//! ```text
//! magic "CVPS", version u8 = 1, offset u64, producers u32,
//! per producer: id i64, epoch i16, last_write_ms i64, batches u8,
//!               per batch: first_sequence i32, last_sequence i32, base_offset u64, last_offset u64
//! crc32 (crc32fast) of everything before it
//! ```
//!
//! # Crash behaviour
//! Files are written to a temporary name, synced and renamed (`replace_file_durably`); a
//! damaged file is skipped with a warning in favour of an older one (replay is longer).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{BatchMeta, MAX_CACHED_BATCHES, ProducerEntry, ProducerTable};

/// The directory inside a partition's directory that holds its producer snapshots.
pub const DIR: &str = "producers";
const SUFFIX: &str = ".snapshot";
const MAGIC: &[u8; 4] = b"CVPS";
const VERSION: u8 = 1;
const HEAD: usize = 4 + 1 + 8 + 4;
const PRODUCER: usize = 8 + 2 + 8 + 1;
const BATCH: usize = 4 + 4 + 8 + 8;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("producer snapshot {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("producer snapshot is damaged: {0}")]
    Damaged(String),
    #[error("producer snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: crate::LogError,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The bytes of a snapshot of `table` at `offset`.
pub fn encode(offset: u64, table: &ProducerTable) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD + table.len() * (PRODUCER + 2 * BATCH) + 4);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    let mut ids: Vec<_> = table.entries().collect();
    // Sorted, so that a table encodes the same way every time.
    ids.sort_by_key(|(id, _)| **id);
    for (id, entry) in ids {
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&entry.epoch.to_le_bytes());
        out.extend_from_slice(&entry.last_write_ms.to_le_bytes());
        out.push(entry.batches.len() as u8);
        for b in &entry.batches {
            out.extend_from_slice(&b.first_sequence.to_le_bytes());
            out.extend_from_slice(&b.last_sequence.to_le_bytes());
            out.extend_from_slice(&b.base_offset.to_le_bytes());
            out.extend_from_slice(&b.last_offset.to_le_bytes());
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let end = self.at + N;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| SnapshotError::Damaged(format!("ends at byte {} of a field", self.at)))?;
        self.at = end;
        let mut out = [0; N];
        out.copy_from_slice(slice);
        Ok(out)
    }
}

/// The offset and table a snapshot holds, checked whole (CRC, lengths, bounds) first.
pub fn decode(bytes: &[u8]) -> Result<(u64, ProducerTable), SnapshotError> {
    let damaged = |what: String| SnapshotError::Damaged(what);
    if bytes.len() < HEAD + 4 {
        return Err(damaged(format!("{} bytes is shorter than a header", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != stored {
        return Err(damaged("checksum mismatch".into()));
    }
    let mut r = Reader { bytes: body, at: 0 };
    if &r.take::<4>()? != MAGIC {
        return Err(damaged("not a producer snapshot (bad magic)".into()));
    }
    let [version] = r.take::<1>()?;
    if version != VERSION {
        return Err(damaged(format!("unknown version {version}")));
    }
    let offset = u64::from_le_bytes(r.take()?);
    let count = u32::from_le_bytes(r.take()?) as usize;
    // Bounded by the bytes present, whatever the count claims.
    if count > (body.len() - HEAD) / PRODUCER {
        return Err(damaged(format!("claims {count} producers in {} bytes", body.len())));
    }
    let mut table = ProducerTable::with_capacity(count);
    for _ in 0..count {
        let id = i64::from_le_bytes(r.take()?);
        let epoch = i16::from_le_bytes(r.take()?);
        let last_write_ms = i64::from_le_bytes(r.take()?);
        let [n] = r.take::<1>()?;
        if id < 0 || epoch < 0 || usize::from(n) > MAX_CACHED_BATCHES {
            return Err(damaged(format!("producer {id} epoch {epoch} with {n} batches")));
        }
        let mut batches = VecDeque::with_capacity(usize::from(n));
        for _ in 0..n {
            batches.push_back(BatchMeta {
                first_sequence: i32::from_le_bytes(r.take()?),
                last_sequence: i32::from_le_bytes(r.take()?),
                base_offset: u64::from_le_bytes(r.take()?),
                last_offset: u64::from_le_bytes(r.take()?),
            });
        }
        table.put(
            id,
            ProducerEntry {
                epoch,
                batches,
                last_write_ms,
            },
        );
    }
    if r.at != body.len() {
        return Err(damaged(format!("{} bytes after the last producer", body.len() - r.at)));
    }
    Ok((offset, table))
}

/// The snapshot files of one partition.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    offsets: Mutex<BTreeSet<u64>>,
}

fn file_name(offset: u64) -> String {
    format!("{offset:020}{SUFFIX}")
}

fn parse_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SUFFIX)?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

impl SnapshotStore {
    /// The store of the partition in `partition_dir` (created on the first write). Blocking.
    pub fn open(partition_dir: &Path) -> Result<SnapshotStore, SnapshotError> {
        let dir = partition_dir.join(DIR);
        let mut offsets = BTreeSet::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(io("list", &dir))?;
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if let Some(offset) = parse_name(&name) {
                        offsets.insert(offset);
                    } else if name.ends_with(".tmp") {
                        // A write a crash interrupted: never renamed, never trusted.
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("list", &dir)(e)),
        }
        Ok(SnapshotStore {
            dir,
            offsets: Mutex::new(offsets),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        self.offsets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Offsets of the stored snapshots, ascending.
    pub fn offsets(&self) -> Vec<u64> {
        self.lock().iter().copied().collect()
    }

    /// The newest snapshot offset at or below `offset`.
    pub fn latest_at_or_below(&self, offset: u64) -> Option<u64> {
        self.lock().range(..=offset).next_back().copied()
    }

    /// Stores the state of every batch below `offset`. Blocking.
    pub fn write(&self, offset: u64, table: &ProducerTable) -> Result<(), SnapshotError> {
        self.write_bytes(offset, &encode(offset, table))
    }

    /// Stores snapshot bytes received from a leader, after checking them. Blocking.
    pub fn install(&self, bytes: &[u8]) -> Result<(u64, ProducerTable), SnapshotError> {
        let (offset, table) = decode(bytes)?;
        self.write_bytes(offset, bytes)?;
        Ok((offset, table))
    }

    fn write_bytes(&self, offset: u64, bytes: &[u8]) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let name = file_name(offset);
        crate::replace_file_durably(&self.dir, &name, bytes).map_err(|source| SnapshotError::Write {
            path: self.dir.join(&name),
            source,
        })?;
        self.lock().insert(offset);
        Ok(())
    }

    /// The bytes of the newest readable snapshot at or below `offset`, with its offset.
    /// Damaged files are skipped (and reported). Blocking.
    pub fn read_at_or_below(&self, offset: u64) -> Option<(u64, Vec<u8>, ProducerTable)> {
        let candidates: Vec<u64> = self.lock().range(..=offset).rev().copied().collect();
        for at in candidates {
            let path = self.dir.join(file_name(at));
            let loaded = std::fs::read(&path)
                .map_err(io("read", &path))
                .and_then(|bytes| decode(&bytes).map(|(o, t)| (o, bytes, t)));
            match loaded {
                Ok((o, bytes, table)) if o == at => return Some((at, bytes, table)),
                Ok((o, ..)) => {
                    tracing::warn!(path = %path.display(), holds = o, "producer snapshot holds another offset than its name; skipped")
                }
                Err(e) => tracing::warn!(error = %e, "producer snapshot skipped; an older one is used"),
            }
        }
        None
    }

    /// Deletes the snapshots no longer needed once the log starts at `log_start`: all but
    /// the newest one at or below it. Blocking.
    pub fn prune_below(&self, log_start: u64) {
        let Some(keep) = self.latest_at_or_below(log_start) else {
            return;
        };
        let doomed: Vec<u64> = self.lock().range(..keep).copied().collect();
        for at in doomed {
            let path = self.dir.join(file_name(at));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete an old producer snapshot");
                    continue;
                }
            }
            self.lock().remove(&at);
        }
    }
}
