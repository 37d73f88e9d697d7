//! Writing dead letters: records rejected, or out of deliveries, go to the group's
//! dead-letter topic (created on its first dead letter, with the source's partition count),
//! into the partition they came from (mod its count, so a key's dead letters stay in
//! order), with their key, value and headers and headers naming where they came from and
//! why. A record is archived only after its dead letter was written with acks=all: a crash in
//! between writes it again (a duplicate dead letter, never a lost record).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conveyor_proto::v1::produce_client::ProduceClient;
use conveyor_proto::v1::{Acks as WireAcks, PartitionProduce, ProduceRequest};
use conveyor_storage::batch::{BatchBuilder, Compression, Header, Record, RecordBatch, ValidatedBatch};

use super::ShareCoordinator;
use super::state::SharesState;
use crate::coordinator::host::Shard;
use crate::coordinator::internal_topic::{self, TopicKind};
use crate::error::{BrokerError, Result};
use crate::replica::proposal::Acks;

/// Headers a dead letter carries besides the record's own.
pub const SOURCE_TOPIC: &str = "conveyor-dlq-topic";
pub const SOURCE_PARTITION: &str = "conveyor-dlq-partition";
pub const SOURCE_OFFSET: &str = "conveyor-dlq-offset";
pub const DELIVERY_COUNT: &str = "conveyor-dlq-delivery-count";
pub const REASON: &str = "conveyor-dlq-reason";
/// Dead letters written per step.
const STEP: usize = 500;
/// Pause after a failed step.
const RETRY: Duration = Duration::from_secs(1);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// One record to dead-letter.
struct Letter {
    partition: i32,
    offset: u64,
    record: Record,
}

/// Writes `group`'s waiting dead letters until none is left (or the state stops being
/// current, or a purge or redrive pauses them).
pub async fn run(coordinator: Arc<ShareCoordinator>, shard: Arc<Shard<SharesState>>, group: String) {
    loop {
        match step(&coordinator, &shard, &group).await {
            Ok(true) => continue,
            Ok(false) => return,
            Err(e) => {
                tracing::warn!(group, error = %e, "dead letters not written yet; retrying");
                if !shard.is_current() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Writes one step of dead letters; false when there was nothing to do (the task ends).
async fn step(coordinator: &ShareCoordinator, shard: &Arc<Shard<SharesState>>, group: &str) -> Result<bool> {
    let (letters, dlq, source, partitions) = {
        let mut st = shard.lock().await;
        let Some(g) = st.groups.get_mut(group) else {
            return Ok(false);
        };
        let mut letters = Vec::new();
        for (p, w) in &g.windows {
            for (offset, reason, deliveries) in w.dead_lettering() {
                if letters.len() >= STEP {
                    break;
                }
                let Some(batch) = w.batch_of(offset) else { continue };
                let record = letter_of(&batch.bytes, offset, &g.settings.topic, *p, deliveries, &reason)?;
                letters.push(Letter {
                    partition: *p,
                    offset,
                    record,
                });
            }
        }
        if letters.is_empty() || g.dead_letters_paused || !shard.is_current() {
            g.dead_lettering = false;
            return Ok(false);
        }
        let partitions = coordinator
            .registry()
            .get(&g.settings.topic)
            .map_or(1, |t| t.partition_count() as u32);
        (
            letters,
            g.settings.dead_letter_topic.clone(),
            g.settings.topic.clone(),
            partitions,
        )
    };
    let _ = source;
    let topic = internal_topic::ensure_exists(
        coordinator.registry(),
        &coordinator.admin_lock,
        &dlq,
        partitions,
        0,
        TopicKind::DeadLetter,
    )
    .await?;
    let count = (topic.partition_count() as i32).max(1);
    let mut by_partition: std::collections::BTreeMap<i32, Vec<&Letter>> = std::collections::BTreeMap::new();
    for l in &letters {
        by_partition.entry(l.partition % count).or_default().push(l);
    }
    for (p, ls) in by_partition {
        let mut builder = BatchBuilder::new(Compression::None);
        for l in ls {
            builder.push(&l.record);
        }
        let bytes = builder
            .build()
            .map_err(|e| BrokerError::Internal(format!("a dead-letter batch: {e}")))?;
        append(coordinator, &dlq, p, bytes).await?;
    }
    let mut st = shard.lock().await;
    let Some(g) = st.groups.get_mut(group) else {
        return Ok(false);
    };
    let mut changed: std::collections::BTreeMap<i32, Vec<u64>> = std::collections::BTreeMap::new();
    for l in &letters {
        if let Some(w) = g.windows.get_mut(&l.partition)
            && w.archive(l.offset)
        {
            changed.entry(l.partition).or_default().push(l.offset);
        }
    }
    let written: u64 = changed.values().map(|v| v.len() as u64).sum();
    coordinator.metrics.dead_letters.add(written);
    g.dead_letters_written += written;
    let mut changes = Vec::new();
    for (p, offsets) in changed {
        changes.extend(g.record_of(group, p, &offsets));
    }
    g.room.notify_waiters();
    g.available.notify_waiters();
    let committed = shard.append_ahead(&changes).await?;
    drop(st);
    committed.wait().await?;
    Ok(true)
}

/// The dead letter of the record at `offset` of `batch`.
fn letter_of(batch: &Bytes, offset: u64, topic: &str, partition: i32, deliveries: u32, reason: &str) -> Result<Record> {
    let bad = |e| BrokerError::from_batch(topic, partition, e);
    let parsed = RecordBatch::parse(batch.clone()).map_err(bad)?;
    for r in parsed.records().map_err(bad)? {
        let r = r.map_err(bad)?;
        if r.offset != offset {
            continue;
        }
        let mut headers = r.headers;
        let mut add = |k: &str, v: String| {
            headers.push(Header {
                key: Bytes::copy_from_slice(k.as_bytes()),
                value: Some(Bytes::from(v)),
            })
        };
        add(SOURCE_TOPIC, topic.to_string());
        add(SOURCE_PARTITION, partition.to_string());
        add(SOURCE_OFFSET, offset.to_string());
        add(DELIVERY_COUNT, deliveries.to_string());
        add(REASON, reason.to_string());
        return Ok(Record {
            timestamp: r.timestamp,
            key: r.key,
            value: r.value,
            headers,
        });
    }
    Err(BrokerError::Internal(format!(
        "record {offset} of {topic} partition {partition} is not in its cached batch"
    )))
}

/// Appends `bytes` to `topic` `partition` with acks=all: through this broker's replica when
/// it leads it, otherwise through the leader's `Produce`.
pub async fn append(coordinator: &ShareCoordinator, topic: &str, partition: i32, bytes: Bytes) -> Result<()> {
    let registry = coordinator.registry();
    let t = registry.get(topic)?;
    match registry.leader(&t, partition) {
        Ok(replica) => {
            let batch =
                ValidatedBatch::new(bytes, 64 << 20).map_err(|e| BrokerError::from_batch(topic, partition, e))?;
            let reply = replica
                .enqueue_in(None, vec![batch], Acks::All, None, Vec::new(), Some(WRITE_TIMEOUT))
                .await?;
            tokio::time::timeout(WRITE_TIMEOUT, reply)
                .await
                .map_err(|_| BrokerError::TimedOut {
                    what: format!("a dead letter to '{topic}' partition {partition}"),
                    after: WRITE_TIMEOUT,
                    state: "not committed yet".into(),
                })?
                .map_err(|_| BrokerError::ShuttingDown)??;
            Ok(())
        }
        Err(BrokerError::NotLeader { leader, .. }) if leader != 0 => {
            let transport = registry.transport();
            let channel =
                crate::peer::connect(leader, transport.client_address(leader), Duration::from_secs(2)).await?;
            let request = ProduceRequest {
                request_id: 0,
                acks: WireAcks::All as i32,
                partitions: vec![PartitionProduce {
                    topic: topic.to_string(),
                    partition,
                    batches: vec![bytes],
                    ..Default::default()
                }],
            };
            let unreachable = |reason: String| BrokerError::BrokerUnreachable {
                id: leader,
                address: transport.client_address(leader).unwrap_or_default(),
                reason,
            };
            let answer = tokio::time::timeout(WRITE_TIMEOUT, ProduceClient::new(channel).produce(request))
                .await
                .map_err(|_| unreachable("no answer to a dead letter".into()))?
                .map_err(|s| unreachable(s.message().to_string()))?
                .into_inner();
            match answer.partitions.first().and_then(|p| p.error.as_ref()) {
                Some(e) if e.code != 0 => Err(unreachable(format!("the dead letter was refused: {}", e.message))),
                _ => Ok(()),
            }
        }
        Err(e) => Err(e),
    }
}
