//! Reading metadata records out of the controller log's batches.

use bytes::Bytes;
use conveyor_proto::internal::v1::{MetadataRecord, metadata_record};
use conveyor_storage::batch::BatchIter;
use prost::Message;

use crate::replica::state_snapshot::SnapshotPoint;

/// A metadata record and where it sits in the controller log.
#[derive(Debug, Clone)]
pub(super) struct Located {
    /// The base offset of its batch, and the offset after it.
    pub(super) base: u64,
    pub(super) next: u64,
    pub(super) change: metadata_record::Change,
}

/// The metadata records in `bytes` (control batches, such as Raft no-ops, carry none), and
/// where the last batch ends: its Raft entry and the offset after it.
pub(super) fn located_records_in(bytes: Bytes) -> anyhow::Result<(Vec<Located>, Option<SnapshotPoint>)> {
    let mut changes = Vec::new();
    let mut next = None;
    for batch in BatchIter::new(bytes) {
        let batch = batch?;
        let (base, after) = (batch.header().base_offset, batch.header().next_offset());
        next = Some(SnapshotPoint {
            index: batch.header().raft_index,
            term: batch.header().leader_epoch,
            offset: after,
        });
        if batch.header().is_control() {
            continue;
        }
        for record in batch.records()? {
            let value = record?.value.unwrap_or_default();
            if let Some(change) = MetadataRecord::decode(value)?.change {
                changes.push(Located {
                    base,
                    next: after,
                    change,
                });
            }
        }
    }
    Ok((changes, next))
}

/// As [`located_records_in`], the records alone.
pub(super) fn records_in(bytes: Bytes) -> anyhow::Result<(Vec<metadata_record::Change>, Option<u64>)> {
    let (located, next) = located_records_in(bytes)?;
    Ok((located.into_iter().map(|l| l.change).collect(), next.map(|p| p.offset)))
}
