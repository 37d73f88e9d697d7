//! Snapshots of a state machine replayed from a Raft group's log: the controller's metadata
//! now, the group, share and transaction coordinators later. A snapshot is the state's bytes
//! at an applied point of the log; a start loads the newest readable one and replays only
//! the log after it, and the log's prefix below the snapshot point may then be deleted.
//!
//! The bytes are the state machine's business ([`StateMachine`]); this module stores them
//! (one file per snapshot, named by Raft index, with a CRC) and hands them to Raft, which
//! sends them to a follower that is behind the leader's log start (see
//! [`super::raft_storage::RaftLog::set_state_snapshots`]): such a follower cannot replay the
//! records it lacks, so it receives the state itself.
//!
//! # Crash behaviour
//! A snapshot is written to a temporary file, fsynced, renamed into place and the directory
//! fsynced: a crash leaves the whole file or none. The newest [`KEEP`] snapshots are kept,
//! and the owner lets the log go only below the oldest kept one, so a damaged newest file
//! still leaves a readable one whose tail is in the log. Older ones go only below the
//! owner's Raft snapshot index ([`SnapshotStore::prune_only_below`]), whose state Raft
//! sends. A received snapshot is marked pending until its owner applied it.
//!
//! # Thread-safety
//! Every method is blocking file I/O: call off the reactor. Writers are serialised by a
//! lock in the store (the owner's applier and Raft's install of a received snapshot can
//! write at once); readers (Raft sending a snapshot) read whole files or the cached payload.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// How many snapshots are kept on disk.
pub const KEEP: usize = 2;
const MAGIC: &[u8; 8] = b"CVSNAP01";
const SUFFIX: &str = ".snap";
/// Names the received snapshot whose state is not applied yet (see [`SnapshotStore::install`]).
const INSTALL_PENDING: &str = "install-pending";
/// Magic, offset, index, term, payload length.
const HEADER: usize = 8 + 8 * 4;

/// A state machine whose state can be written at an applied point and loaded back.
pub trait StateMachine: Sized {
    fn encode_state(&self) -> Vec<u8>;
    fn decode_state(bytes: &[u8]) -> Result<Self, String>;
}

/// Where a snapshot sits in its group's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotPoint {
    /// The Raft index and term of the last entry the state includes.
    pub index: u64,
    pub term: u64,
    /// The log offset after that entry's batch: where replay resumes.
    pub offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("snapshot {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(transparent)]
    Producer(#[from] conveyor_storage::producer_state::snapshot::SnapshotError),
}

/// A snapshot read back whole and verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub point: SnapshotPoint,
    pub payload: Bytes,
}

/// The snapshots of one state machine, in their own directory.
#[derive(Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    /// Serialises writes and their pruning.
    writing: Mutex<()>,
    /// Only snapshots below this Raft index may be pruned: Raft answers a follower with the
    /// state at its own snapshot index, which must stay until compaction moves past it.
    prune_below: AtomicU64,
    /// The payload last written or loaded, by index: Raft asks for the same one again and
    /// again while a follower catches up.
    cached: Mutex<Option<(u64, Bytes)>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl SnapshotStore {
    pub fn new(dir: impl Into<PathBuf>) -> SnapshotStore {
        SnapshotStore {
            dir: dir.into(),
            writing: Mutex::new(()),
            prune_below: AtomicU64::new(u64::MAX),
            cached: Mutex::new(None),
        }
    }

    /// From now on, prunes only snapshots below Raft index `index` (the owner's Raft
    /// snapshot index: the one `Storage::snapshot` serves). A store starts unrestricted.
    pub fn prune_only_below(&self, index: u64) {
        self.prune_below.store(index, Ordering::Relaxed);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes the state at `point` durably (temp file, fsync, rename, directory fsync) and
    /// removes all but the newest [`KEEP`] snapshots. Blocking.
    pub fn write(&self, point: SnapshotPoint, payload: &[u8]) -> Result<(), SnapshotError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let mut bytes = Vec::with_capacity(HEADER + payload.len() + 4);
        bytes.extend_from_slice(MAGIC);
        for n in [point.offset, point.index, point.term, payload.len() as u64] {
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        let name = file_name(point.index);
        conveyor_storage::replace_file_durably(&self.dir, &name, &bytes).map_err(|e| SnapshotError::Io {
            path: self.dir.join(&name),
            reason: e.to_string(),
        })?;
        *self.lock_cached() = Some((point.index, Bytes::copy_from_slice(payload)));
        self.prune_locked()
    }

    /// Removes all but the newest [`KEEP`] snapshots, none at or past the pruning floor
    /// ([`Self::prune_only_below`]). Blocking.
    pub fn prune(&self) -> Result<(), SnapshotError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        self.prune_locked()
    }

    fn prune_locked(&self) -> Result<(), SnapshotError> {
        let floor = self.prune_below.load(Ordering::Relaxed);
        for &old in self.indexes()?.iter().rev().skip(KEEP).filter(|&&i| i < floor) {
            let path = self.dir.join(file_name(old));
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(())
    }

    fn lock_cached(&self) -> std::sync::MutexGuard<'_, Option<(u64, Bytes)>> {
        self.cached.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The Raft index of a received snapshot whose state the owner has not applied yet: a
    /// start must apply it as the committed, live view it is, not as a replayed one.
    pub fn pending_install(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join(INSTALL_PENDING)).ok()?;
        text.trim().parse().ok()
    }

    /// The owner applied the received snapshot at `index`. Blocking.
    pub fn installed(&self, index: u64) -> Result<(), SnapshotError> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if self.pending_install() != Some(index) {
            return Ok(());
        }
        let path = self.dir.join(INSTALL_PENDING);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))
    }

    /// The Raft indexes of the stored snapshots, oldest first. Blocking.
    pub fn indexes(&self) -> Result<Vec<u64>, SnapshotError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir)(e)),
        };
        let mut indexes = Vec::new();
        for entry in entries {
            let name = entry.map_err(io(&self.dir))?.file_name();
            if let Some(index) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            {
                indexes.push(index);
            }
        }
        indexes.sort_unstable();
        Ok(indexes)
    }

    /// Reads and verifies the snapshot at Raft index `index`. Blocking.
    pub fn load(&self, index: u64) -> Result<Loaded, SnapshotError> {
        let loaded = self.load_file(index)?;
        *self.lock_cached() = Some((index, loaded.payload.clone()));
        Ok(loaded)
    }

    fn load_file(&self, index: u64) -> Result<Loaded, SnapshotError> {
        let path = self.dir.join(file_name(index));
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let damaged = |reason: String| SnapshotError::Damaged {
            path: path.clone(),
            reason,
        };
        if bytes.len() < HEADER + 4 || &bytes[..8] != MAGIC {
            return Err(damaged("not a snapshot file (bad header)".into()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        if crc32fast::hash(body) != stored {
            return Err(damaged("its checksum does not match".into()));
        }
        let field = |i: usize| {
            let at = 8 + 8 * i;
            u64::from_le_bytes(body[at..at + 8].try_into().unwrap_or_default())
        };
        let point = SnapshotPoint {
            offset: field(0),
            index: field(1),
            term: field(2),
        };
        if field(3) != (body.len() - HEADER) as u64 || point.index != index {
            return Err(damaged("its length or index does not match its name".into()));
        }
        Ok(Loaded {
            point,
            payload: Bytes::copy_from_slice(&body[HEADER..]),
        })
    }

    /// The newest snapshot that reads back whole, with the failures met on the way (newest
    /// first), for the caller to report. A damaged file is renamed `*.damaged` (kept for a
    /// person to look at): left in place it would count as one of the [`KEEP`] newest and
    /// push out a good one. Blocking.
    pub fn load_newest(&self) -> (Option<Loaded>, Vec<SnapshotError>) {
        let mut failures = Vec::new();
        let indexes = match self.indexes() {
            Ok(indexes) => indexes,
            Err(e) => return (None, vec![e]),
        };
        for index in indexes.into_iter().rev() {
            match self.load(index) {
                Ok(loaded) => return (Some(loaded), failures),
                Err(e) => {
                    if let SnapshotError::Damaged { path, .. } = &e {
                        let aside = path.with_extension("damaged");
                        if let Err(e) = std::fs::rename(path, &aside) {
                            tracing::warn!(path = %path.display(), error = %e, "cannot set a damaged snapshot aside");
                        }
                    }
                    failures.push(e);
                }
            }
        }
        (None, failures)
    }
}

fn file_name(index: u64) -> String {
    format!("{index:020}{SUFFIX}")
}

/// What a Raft log needs from a state machine's snapshots: the state to send a follower
/// behind the log start, and a place to store one received from the leader.
pub trait StateSnapshots: std::fmt::Debug + Send + Sync {
    /// The state as of `point` (the log start a follower is sent), if one is stored there.
    /// Blocking.
    fn state_at(&self, point: &SnapshotPoint) -> Option<Bytes>;
    /// Stores a leader's state durably, before the log is reset past it. Blocking.
    fn install(&self, point: SnapshotPoint, payload: &[u8]) -> Result<(), SnapshotError>;
    /// The furthest offset at or below `cutoff` where the log may start and the state there
    /// is stored (`None`: nowhere yet).
    fn compaction_limit(&self, cutoff: u64) -> Option<u64> {
        Some(cutoff)
    }
    /// The log now starts at `offset`: older snapshots may go. Blocking.
    fn log_starts_at(&self, _offset: u64) {}
}

impl StateSnapshots for SnapshotStore {
    fn state_at(&self, point: &SnapshotPoint) -> Option<Bytes> {
        let index = point.index;
        if let Some((cached, payload)) = self.lock_cached().as_ref()
            && *cached == index
        {
            return Some(payload.clone());
        }
        match self.load(index) {
            Ok(loaded) => Some(loaded.payload),
            Err(e) => {
                tracing::warn!(error = %e, "cannot send a state snapshot to a follower");
                None
            }
        }
    }

    /// Stores a received snapshot, marked pending first: the log is reset right after, and
    /// the owner applies the state later, so a crash in between must not leave the state
    /// looking like one replayed from this broker's own log.
    fn install(&self, point: SnapshotPoint, payload: &[u8]) -> Result<(), SnapshotError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        conveyor_storage::replace_file_durably(&self.dir, INSTALL_PENDING, point.index.to_string().as_bytes())
            .map_err(|e| SnapshotError::Io {
                path: self.dir.join(INSTALL_PENDING),
                reason: e.to_string(),
            })?;
        self.write(point, payload)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use conveyor_storage::batch::{BatchBuilder, Compression, Record};
    use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
    use raft::eraftpb::{Entry, HardState};
    use raft::{Storage, StorageError};

    use super::*;
    use crate::replica::entry::Origin;
    use crate::replica::raft_storage::{RaftLog, ReplicaError, snapshot_offset};

    fn point(index: u64) -> SnapshotPoint {
        SnapshotPoint {
            index,
            term: 3,
            offset: index * 10,
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written_and_only_the_newest_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::new(dir.path().join("snapshots"));
        assert_eq!(store.load_newest().0, None, "no snapshot yet");
        for index in [5, 9, 12] {
            store
                .write(point(index), format!("state-{index}").as_bytes())
                .expect("write");
        }
        assert_eq!(store.indexes().expect("list"), vec![9, 12]);
        let (newest, failures) = store.load_newest();
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            newest,
            Some(Loaded {
                point: point(12),
                payload: Bytes::from_static(b"state-12")
            })
        );
        let at = |index| SnapshotPoint {
            index,
            term: 0,
            offset: 0,
        };
        assert_eq!(store.state_at(&at(9)), Some(Bytes::from_static(b"state-9")));
        assert_eq!(store.state_at(&at(5)), None, "removed");
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_damaged_newest_snapshot_falls_back_to_the_older_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::new(dir.path());
        store.write(point(4), b"older").expect("write");
        store.write(point(8), b"newer").expect("write");
        let newest = dir.path().join(file_name(8));
        let mut bytes = std::fs::read(&newest).expect("read");
        let last = bytes.len() - 6;
        bytes[last] ^= 0xff;
        std::fs::write(&newest, &bytes).expect("damage");
        let (loaded, failures) = store.load_newest();
        assert_eq!(loaded.expect("older one").payload, Bytes::from_static(b"older"));
        assert_eq!(failures.len(), 1);
        assert!(failures[0].to_string().contains("checksum"), "{}", failures[0]);
        assert_eq!(store.indexes().expect("list"), vec![4], "the damaged one is set aside");
        assert!(dir.path().join(file_name(8)).with_extension("damaged").exists());

        std::fs::write(dir.path().join(file_name(4)), b"short").expect("damage");
        let (loaded, failures) = store.load_newest();
        assert!(loaded.is_none());
        assert_eq!(failures.len(), 1);
    }

    #[test]
    fn the_snapshot_raft_serves_is_kept_until_compaction_moves_past_it_and_writers_do_not_collide() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SnapshotStore::new(dir.path()));
        store.prune_only_below(9);
        for index in [5, 9, 12, 15] {
            store.write(point(index), b"state").expect("write");
        }
        assert_eq!(store.indexes().expect("list"), vec![9, 12, 15], "Raft still serves 9");
        store.prune_only_below(12);
        store.prune().expect("prune");
        assert_eq!(store.indexes().expect("list"), vec![12, 15]);

        // Raft's install and the applier write at once: neither fails on the other's pruning.
        store.prune_only_below(u64::MAX);
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..100 {
                        store
                            .write(point(100 + i * 2 + w), b"state")
                            .expect("a concurrent write");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        assert_eq!(store.indexes().expect("list").len(), KEEP);
    }

    #[test]
    fn a_stop_between_storing_a_snapshot_point_and_resetting_the_log_is_finished_at_open() {
        use crate::replica::raft_state::RaftStateFile;
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, count, ahead) in [("behind", 3, true), ("within", 30, false)] {
            let at = dir.path().join(name);
            let log = raft_log(&at, None);
            let entries: Vec<Entry> = (1..=count).map(entry).collect();
            log.append(&entries, Origin::Peer).expect("append");
            log.persist().expect("persist");
            let offset = if ahead {
                log.partition_log().log_end_offset() + 1000
            } else {
                log.offset_after(10)
            };
            drop(log);
            // What `apply_snapshot` stores before it resets the log, and no more.
            let mut state = RaftStateFile::load(&at.join("log")).expect("state");
            state.snapshot_index = 100;
            state.snapshot_term = 2;
            state.snapshot_offset = offset;
            state.hard_state.commit = 100;
            state.store(&at.join("log")).expect("store");

            let reopened = raft_log(&at, None);
            let plog = reopened.partition_log();
            assert_eq!(
                (
                    reopened.last_entry().index,
                    plog.log_start_offset(),
                    plog.log_end_offset()
                ),
                (100, offset, offset),
                "{name}: the log restarts empty at the snapshot point"
            );
        }
    }

    fn raft_log(dir: &Path, store: Option<Arc<SnapshotStore>>) -> RaftLog {
        let config = LogConfig {
            segment_bytes: 1024,
            max_batch_bytes: 512,
            flush: FlushPolicy::Always,
            retention_ms: None,
            ..LogConfig::default()
        };
        let log = Arc::new(PartitionLog::open(dir.join("log"), config).expect("log"));
        let mut raft = RaftLog::open(log).expect("raft log");
        if let Some(store) = store {
            raft.set_state_snapshots(store);
        }
        raft
    }

    fn entry(index: u64) -> Entry {
        let mut b = BatchBuilder::new(Compression::None);
        b.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(format!("record-{index}-{}", "x".repeat(100)))),
            ..Record::default()
        });
        Entry {
            index,
            term: 2,
            data: b.build().expect("batch"),
            ..Entry::default()
        }
    }

    #[test]
    fn a_group_with_state_sends_it_in_its_raft_snapshot_and_a_follower_stores_it_before_its_log_resets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leader_store = Arc::new(SnapshotStore::new(dir.path().join("leader-snapshots")));
        let leader = raft_log(&dir.path().join("leader"), Some(Arc::clone(&leader_store)));
        let entries: Vec<Entry> = (1..=30).map(entry).collect();
        leader.append(&entries, Origin::Peer).expect("append");
        leader.persist().expect("persist");
        let hs = HardState {
            term: 2,
            commit: 30,
            ..HardState::default()
        };
        leader.set_hard_state(&hs).expect("commit");
        leader.evict_cache_to(30);
        let point = SnapshotPoint {
            index: 20,
            term: 2,
            offset: leader.offset_after(20),
        };
        leader_store.write(point, b"the state at 20").expect("write");
        assert_eq!(leader.compact_below(point.offset).expect("compact"), 20);
        assert!(
            leader.partition_log().log_start_offset() > 0,
            "segments wholly below the snapshot are deleted"
        );

        let snapshot = leader.snapshot(5, 2).expect("snapshot");
        assert_eq!(snapshot.get_metadata().index, 20);
        assert_eq!(snapshot_offset(&snapshot), Some(point.offset));
        assert_eq!(&snapshot.data[8..], b"the state at 20");

        let follower_store = Arc::new(SnapshotStore::new(dir.path().join("follower-snapshots")));
        let follower = raft_log(&dir.path().join("follower"), Some(Arc::clone(&follower_store)));
        follower.apply_snapshot(&snapshot).expect("apply");
        assert_eq!(
            follower_store.load(20).expect("stored"),
            Loaded {
                point,
                payload: Bytes::from_static(b"the state at 20")
            }
        );
        assert_eq!(follower.partition_log().log_start_offset(), point.offset);

        // A follower whose group carries state refuses a snapshot without it, before it
        // resets anything.
        let mut bare = snapshot.clone();
        bare.data = snapshot.data.slice(..8);
        let other = raft_log(
            &dir.path().join("other"),
            Some(Arc::new(SnapshotStore::new(dir.path().join("o")))),
        );
        other.append(&entries[..3], Origin::Peer).expect("append");
        assert!(matches!(
            other.apply_snapshot(&bare),
            Err(ReplicaError::Inconsistent { .. })
        ));
        assert_eq!(other.last_entry().index, 3, "the log is left as it was");

        // Served again from the payload the store keeps, without reading the file.
        std::fs::remove_file(leader_store.dir().join(file_name(20))).expect("remove");
        assert_eq!(&leader.snapshot(5, 2).expect("cached").data[8..], b"the state at 20");
        // Without its stored state (nor the cached one) the leader has no snapshot to send yet.
        leader_store
            .write(SnapshotPoint { index: 25, ..point }, b"the state at 25")
            .expect("write");
        assert!(matches!(
            leader.snapshot(5, 2),
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
        ));
    }
}
