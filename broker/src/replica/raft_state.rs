//! The per-partition `raft-state` file: HardState, ConfState and the snapshot point (index
//! and term of the last entry before the log's first).
//!
//! # On-disk format
//! `"CRS1" | u32 len | HardState (protobuf) | u32 len | ConfState (protobuf) |
//! u64 snapshot_index | u64 snapshot_term | u64 snapshot_offset | [u8 2 | u64 term | u64 index]
//! | u32 crc32` (little-endian; the CRC covers everything before it). The bracketed part is
//! present only while the replica is recovering lost entries (see
//! [`super::lost_entries`]): the last entry it may have acknowledged. Files of replicas not
//! recovering have the same bytes as before it existed. A file with `[u8 1 | u64 target]`
//! there, the first form (a commit index to reach), reads as recovering with the promise
//! `(stored term, u64::MAX)`: nothing said what it acknowledged, so the worst is assumed (it
//! recovers once its log holds an entry of a newer term).
//!
//! # Crash behaviour
//! Replaced atomically (`conveyor_storage::replace_file_durably`). A
//! torn or damaged file is an error, never silently reset: losing a vote could elect two
//! leaders in one term.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::Message;
use raft::eraftpb::{ConfState, HardState};

const MAGIC: &[u8; 4] = b"CRS1";
pub const FILE_NAME: &str = "raft-state";

/// Everything Raft needs that is not an entry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RaftStateFile {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    /// Index of the last entry before the first one in the log (0 for a fresh log).
    pub snapshot_index: u64,
    pub snapshot_term: u64,
    /// Offset at which the log starts right after the snapshot point.
    pub snapshot_offset: u64,
    /// Set while the replica is recovering entries it lost: the last entry it may have
    /// acknowledged before the loss (see [`super::lost_entries`]).
    pub recovering: Option<Promise>,
}

/// The (term, index) of the last entry a replica may have acknowledged. Ordered as Raft
/// compares logs for being up to date: by term, then by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Promise {
    pub term: u64,
    pub index: u64,
}

impl std::fmt::Display for Promise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.index == u64::MAX {
            write!(f, "any entry of term {}", self.term)
        } else {
            write!(f, "entry {} of term {}", self.index, self.term)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error(transparent)]
    Write(#[from] conveyor_storage::LogError),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

impl RaftStateFile {
    /// Reads the file in `dir`; a fresh partition has none and gets the default.
    pub fn load(dir: &Path) -> Result<RaftStateFile, StateError> {
        let path = dir.join(FILE_NAME);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RaftStateFile::default()),
            Err(e) => return Err(io("read", &path)(e)),
        };
        Self::decode(&bytes).map_err(|reason| StateError::Damaged { path, reason })
    }

    fn decode(bytes: &[u8]) -> Result<RaftStateFile, String> {
        let body_len = bytes.len().checked_sub(4).ok_or("shorter than its checksum")?;
        let (body, crc) = bytes.split_at(body_len);
        let crc = u32::from_le_bytes(crc.try_into().map_err(|_| "bad checksum")?);
        if crc32fast::hash(body) != crc {
            return Err("checksum mismatch".into());
        }
        if body.get(..4) != Some(&MAGIC[..]) {
            return Err("unknown format".into());
        }
        let mut pos = 4;
        let mut section = || -> Result<&[u8], String> {
            let len = body.get(pos..pos + 4).ok_or("truncated")?;
            let len = u32::from_le_bytes(len.try_into().map_err(|_| "truncated")?) as usize;
            let s = body.get(pos + 4..pos + 4 + len).ok_or("truncated")?;
            pos += 4 + len;
            Ok(s)
        };
        let hard_state = HardState::parse_from_bytes(section()?).map_err(|e| e.to_string())?;
        let conf_state = ConfState::parse_from_bytes(section()?).map_err(|e| e.to_string())?;
        let tail = body.get(pos..pos + 24).ok_or("truncated")?;
        let word = |i: usize| u64::from_le_bytes(tail[i * 8..(i + 1) * 8].try_into().unwrap_or_default());
        let recovering = match body.get(pos + 24..) {
            None | Some([]) => None,
            Some([1, target @ ..]) if target.len() == 8 => Some(Promise {
                term: hard_state.term,
                index: u64::MAX,
            }),
            Some([2, promise @ ..]) if promise.len() == 16 => Some(Promise {
                term: u64::from_le_bytes(promise[..8].try_into().map_err(|_| "truncated")?),
                index: u64::from_le_bytes(promise[8..].try_into().map_err(|_| "truncated")?),
            }),
            Some(_) => return Err("unknown trailing fields".into()),
        };
        Ok(RaftStateFile {
            hard_state,
            conf_state,
            snapshot_index: word(0),
            snapshot_term: word(1),
            snapshot_offset: word(2),
            recovering,
        })
    }

    fn encode(&self) -> Result<Vec<u8>, protobuf::ProtobufError> {
        let mut out = MAGIC.to_vec();
        for section in [self.hard_state.write_to_bytes()?, self.conf_state.write_to_bytes()?] {
            out.extend_from_slice(&(section.len() as u32).to_le_bytes());
            out.extend_from_slice(&section);
        }
        for word in [self.snapshot_index, self.snapshot_term, self.snapshot_offset] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        if let Some(promise) = self.recovering {
            out.push(2);
            out.extend_from_slice(&promise.term.to_le_bytes());
            out.extend_from_slice(&promise.index.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Durably replaces the file in `dir`.
    pub fn store(&self, dir: &Path) -> Result<(), StateError> {
        let bytes = self.encode().map_err(|e| StateError::Damaged {
            path: dir.join(FILE_NAME),
            reason: e.to_string(),
        })?;
        Ok(conveyor_storage::replace_file_durably(dir, FILE_NAME, &bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_damage_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            RaftStateFile::load(dir.path()).expect("fresh"),
            RaftStateFile::default()
        );
        let state = RaftStateFile {
            hard_state: HardState {
                term: 7,
                vote: 2,
                commit: 40,
                ..HardState::default()
            },
            conf_state: ConfState {
                voters: vec![1, 2, 3],
                ..ConfState::default()
            },
            snapshot_index: 10,
            snapshot_term: 3,
            snapshot_offset: 1234,
            recovering: None,
        };
        state.store(dir.path()).expect("store");
        assert_eq!(RaftStateFile::load(dir.path()).expect("load"), state);
        let path = dir.path().join(FILE_NAME);
        let mut bytes = fs::read(&path).expect("read");
        bytes[6] ^= 1;
        fs::write(&path, bytes).expect("write");
        assert!(matches!(
            RaftStateFile::load(dir.path()),
            Err(StateError::Damaged { .. })
        ));
    }

    #[test]
    fn the_recovering_flag_survives_a_reload_and_files_without_it_read_as_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = RaftStateFile {
            hard_state: HardState {
                term: 3,
                ..HardState::default()
            },
            ..RaftStateFile::default()
        };
        let old_bytes = plain.encode().expect("encode");
        // The format before the flag: three words after the sections, then the CRC.
        assert_eq!(
            old_bytes.len(),
            4 + 4 + plain.hard_state.write_to_bytes().expect("hs").len() + 4 + 24 + 4
        );
        for (term, index) in [(3, 0), (2, 42), (3, u64::MAX)] {
            let state = RaftStateFile {
                recovering: Some(Promise { term, index }),
                ..plain.clone()
            };
            state.store(dir.path()).expect("store");
            assert_eq!(RaftStateFile::load(dir.path()).expect("load"), state);
        }
        // The first form, a commit index to reach: read as the worst promise of its term.
        let mut first_form = old_bytes[..old_bytes.len() - 4].to_vec();
        first_form.push(1);
        first_form.extend_from_slice(&42u64.to_le_bytes());
        let crc = crc32fast::hash(&first_form);
        first_form.extend_from_slice(&crc.to_le_bytes());
        fs::write(dir.path().join(FILE_NAME), first_form).expect("write");
        assert_eq!(
            RaftStateFile::load(dir.path()).expect("load").recovering,
            Some(Promise {
                term: 3,
                index: u64::MAX
            })
        );
        plain.store(dir.path()).expect("store cleared");
        assert_eq!(RaftStateFile::load(dir.path()).expect("load").recovering, None);
        assert_eq!(fs::read(dir.path().join(FILE_NAME)).expect("read"), old_bytes);
    }
}
