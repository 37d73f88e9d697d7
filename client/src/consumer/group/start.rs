//! Where newly assigned partitions start: the group's committed offset, or the reset
//! policy's offset when the group committed none.

use std::collections::HashMap;
use std::time::Duration;

use super::config::OffsetReset;
use crate::Client;
use crate::admin::OffsetSpec;
use crate::error::{ClientError, Result};
use crate::groups::{self, TopicPartition};

/// How long looking up committed offsets follows a moving or loading coordinator.
const FETCH_OFFSETS_DEADLINE: Duration = Duration::from_secs(15);

/// The outcome of starting partitions: per partition (with the incarnation its start was
/// begun under) its first offset, or why it has none.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) outcomes: Vec<(TopicPartition, u64, Result<u64>)>,
}

/// Looks up where each of `partitions` starts, after `delay` (a retry's backoff).
pub(super) async fn resolve(
    client: Client,
    group: String,
    reset: OffsetReset,
    partitions: Vec<(TopicPartition, u64)>,
    delay: Duration,
) -> Started {
    tokio::time::sleep(delay).await;
    let keys: Vec<TopicPartition> = partitions.iter().map(|(p, _)| p.clone()).collect();
    let committed = match groups::fetch_offsets(&client, &group, &keys, FETCH_OFFSETS_DEADLINE).await {
        Ok(offsets) => offsets
            .into_iter()
            .map(|o| (TopicPartition::new(o.topic, o.partition), o.offset))
            .collect::<HashMap<_, _>>(),
        Err(e) => {
            return Started {
                outcomes: partitions
                    .into_iter()
                    .map(|(p, inc)| (p, inc, Err(e.clone())))
                    .collect(),
            };
        }
    };
    let starts = futures::future::join_all(partitions.iter().map(|(p, _)| async {
        match committed.get(p) {
            Some(&offset) => Ok(offset),
            None => reset_offset(&client, &group, reset, p).await,
        }
    }))
    .await;
    let outcomes = partitions
        .into_iter()
        .zip(starts)
        .map(|((p, incarnation), start)| (p, incarnation, start))
        .collect();
    Started { outcomes }
}

async fn reset_offset(client: &Client, group: &str, reset: OffsetReset, p: &TopicPartition) -> Result<u64> {
    let spec = match reset {
        OffsetReset::Earliest => OffsetSpec::Earliest,
        OffsetReset::Latest => OffsetSpec::Latest,
        OffsetReset::None => {
            return Err(ClientError::NoCommittedOffset {
                group: group.to_string(),
                topic: p.topic.clone(),
                partition: p.partition,
            });
        }
    };
    Ok(client.admin().list_offset(&p.topic, p.partition, spec).await?.offset)
}
