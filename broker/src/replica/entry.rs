//! Raft entries as record batches, so that the Raft log and the partition log are one.
//!
//! | Raft entry | batch stored |
//! |---|---|
//! | normal, with data | the data itself: a client batch, validated |
//! | normal, empty (leader no-op) | control batch with no records |
//! | `EntryConfChange` / `EntryConfChangeV2` | control batch with one record: key `raft.conf_change` or `raft.conf_change_v2`, value the change, header `raft.context` if any |
//!
//! Every replica appends the same entries in the same order, so every replica stamps the same
//! offsets; the batch header carries the entry's term (as leader epoch) and Raft index.

use bytes::Bytes;
use conveyor_storage::BatchError;
use conveyor_storage::batch::{BatchBuilder, Compression, Header, Record, RecordBatch, ValidatedBatch};
use raft::eraftpb::{Entry, EntryType};

const CONF_CHANGE_KEY: &str = "raft.conf_change";
const CONF_CHANGE_V2_KEY: &str = "raft.conf_change_v2";
const CONTEXT_HEADER: &str = "raft.context";

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("raft entry {index} does not hold a valid record batch: {source}")]
    NotABatch {
        index: u64,
        #[source]
        source: BatchError,
    },
    #[error("raft entry {index}: a client batch must not be a control batch")]
    ControlData { index: u64 },
    #[error("raft entry {index}: normal entries carry no context")]
    UnexpectedContext { index: u64 },
    #[error("stored batch at raft index {index} is not a raft entry: {reason}")]
    Malformed { index: u64, reason: String },
}

/// Where an entry comes from, which decides how much to check before storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Appended by the leader of this term: entries of this term are its own proposals,
    /// validated by the produce path and unchanged since. Older entries are checked.
    LeaderOf(u64),
    /// Replicated from the leader: frame and CRC are checked.
    Peer,
}

/// The batch that stores `entry`, to be appended to a log whose size limit is
/// `max_batch_bytes`.
///
/// A replicated entry is checked for integrity only (frame, CRC), never against the topic's
/// limits of today: its leader accepted it under the limits in force then, every replica must
/// store the same entries, and a replica that refused one (after `max.message.bytes` was
/// lowered, say) would stop replicating for good.
pub fn to_batch(entry: &Entry, max_batch_bytes: usize, origin: Origin) -> Result<ValidatedBatch, EntryError> {
    let index = entry.index;
    let bytes = match entry.get_entry_type() {
        EntryType::EntryNormal if entry.data.is_empty() => control(None, &entry.context, index)?,
        EntryType::EntryNormal => {
            if !entry.context.is_empty() {
                return Err(EntryError::UnexpectedContext { index });
            }
            entry.data.clone()
        }
        EntryType::EntryConfChange => control(Some((CONF_CHANGE_KEY, &entry.data)), &entry.context, index)?,
        EntryType::EntryConfChangeV2 => control(Some((CONF_CHANGE_V2_KEY, &entry.data)), &entry.context, index)?,
    };
    // The leader validated its client batches fully before proposing them and appends them
    // unchanged; everything else (replicated entries, older terms) gets frame and CRC checks,
    // which catch corruption in transit or at rest.
    let own = origin == Origin::LeaderOf(entry.term);
    let not_a_batch = |source| EntryError::NotABatch { index, source };
    if !own {
        // The size bound is the batch itself: only its integrity is in question here.
        ValidatedBatch::frame_checked(bytes.clone(), bytes.len()).map_err(not_a_batch)?;
    }
    // Wrapped at the log's own limit, so that appending does not validate it again against
    // today's limits.
    let batch = ValidatedBatch::already_validated(bytes, max_batch_bytes).map_err(not_a_batch)?;
    if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() && batch.header().is_control() {
        return Err(EntryError::ControlData { index });
    }
    Ok(batch)
}

fn control(change: Option<(&'static str, &Bytes)>, context: &Bytes, index: u64) -> Result<Bytes, EntryError> {
    let mut builder = BatchBuilder::new(Compression::None).control(true);
    if let Some((key, value)) = change {
        let headers = if context.is_empty() {
            vec![]
        } else {
            vec![Header {
                key: Bytes::from_static(CONTEXT_HEADER.as_bytes()),
                value: Some(context.clone()),
            }]
        };
        builder.push(&Record {
            // Every replica builds this batch itself: nothing in it may depend on local time.
            timestamp: 0,
            key: Some(Bytes::from_static(key.as_bytes())),
            value: Some(value.clone()),
            headers,
        });
    }
    builder
        .build_at(0)
        .map_err(|source| EntryError::NotABatch { index, source })
}

/// The Raft entry a stored batch represents.
pub fn from_batch(batch: &RecordBatch) -> Result<Entry, EntryError> {
    let header = batch.header();
    let index = header.raft_index;
    let mut entry = Entry {
        index,
        term: header.leader_epoch,
        ..Entry::default()
    };
    if !header.is_control() {
        entry.set_entry_type(EntryType::EntryNormal);
        entry.data = batch.bytes().clone();
        return Ok(entry);
    }
    let malformed = |reason: String| EntryError::Malformed { index, reason };
    let mut records = batch.records().map_err(|e| malformed(e.to_string()))?;
    let Some(record) = records.next() else {
        entry.set_entry_type(EntryType::EntryNormal);
        return Ok(entry);
    };
    let record = record.map_err(|e| malformed(e.to_string()))?;
    let key = record.key.unwrap_or_default();
    let entry_type = match &key[..] {
        k if k == CONF_CHANGE_KEY.as_bytes() => EntryType::EntryConfChange,
        k if k == CONF_CHANGE_V2_KEY.as_bytes() => EntryType::EntryConfChangeV2,
        other => {
            return Err(malformed(format!(
                "unknown control record {:?}",
                String::from_utf8_lossy(other)
            )));
        }
    };
    entry.set_entry_type(entry_type);
    entry.data = record.value.unwrap_or_default();
    if let Some(h) = record.headers.iter().find(|h| &h.key[..] == CONTEXT_HEADER.as_bytes()) {
        entry.context = h.value.clone().unwrap_or_default();
    }
    Ok(entry)
}
