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

/// Records of one stored batch to dead-letter: (offset, reason, deliveries).
struct FromBatch {
    partition: i32,
    batch: Bytes,
    records: Vec<(u64, String, u32)>,
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
    let (work, dlq, source, partitions) = {
        let mut st = shard.lock().await;
        let Some(g) = st.groups.get_mut(group) else {
            return Ok(false);
        };
        // Under the lock only the batches are picked (cheap clones); they are decoded after.
        let mut work: Vec<FromBatch> = Vec::new();
        let mut count = 0;
        for (p, w) in &g.windows {
            for (offset, reason, deliveries) in w.dead_lettering() {
                if count >= STEP {
                    break;
                }
                let Some(batch) = w.batch_of(offset) else { continue };
                match work.last_mut() {
                    Some(last) if last.partition == *p && last.batch.as_ptr() == batch.bytes.as_ptr() => {
                        last.records.push((offset, reason, deliveries));
                    }
                    _ => work.push(FromBatch {
                        partition: *p,
                        batch: batch.bytes.clone(),
                        records: vec![(offset, reason, deliveries)],
                    }),
                }
                count += 1;
            }
        }
        if work.is_empty() || g.dead_letters_paused || !shard.is_current() {
            g.dead_lettering = false;
            return Ok(false);
        }
        let partitions = coordinator
            .registry()
            .get(&g.settings.topic)
            .map_or(1, |t| t.partition_count() as u32);
        (
            work,
            g.settings.dead_letter_topic.clone(),
            g.settings.topic.clone(),
            partitions,
        )
    };
    let letters = crate::blocking::blocking(move || letters_of(&source, work)).await?;
    let existed = coordinator.registry().get(&dlq).is_ok();
    let topic = internal_topic::ensure_exists(
        coordinator.registry(),
        &coordinator.admin_lock,
        &dlq,
        partitions,
        0,
        TopicKind::DeadLetter,
    )
    .await?;
    if !existed {
        mark_created(shard, group, &dlq).await?;
    }
    let max_batch = (topic.effective.max_message_bytes as usize).clamp(1 << 10, 64 << 20);
    let count = (topic.partition_count() as i32).max(1);
    let mut by_partition: std::collections::BTreeMap<i32, Vec<&Letter>> = std::collections::BTreeMap::new();
    for l in &letters {
        by_partition.entry(l.partition % count).or_default().push(l);
    }
    for (p, ls) in by_partition {
        for bytes in batches_within(&ls, max_batch)? {
            append(coordinator, &dlq, p, bytes).await?;
        }
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

/// Records that this group created its dead-letter topic (so a purge or redrive may delete
/// it).
async fn mark_created(shard: &Arc<Shard<SharesState>>, group: &str, dlq: &str) -> Result<()> {
    let mut st = shard.lock().await;
    let Some(g) = st.groups.get(group) else { return Ok(()) };
    if g.settings.dead_letter_topic_created || g.settings.dead_letter_topic != dlq {
        return Ok(());
    }
    let mut settings = g.settings.clone();
    settings.dead_letter_topic_created = true;
    let change = SharesState::creation(group, &settings);
    shard.write(&mut st, vec![change]).await
}

/// `letters` as batches of at most `max_bytes` each (a letter larger than that alone is one
/// batch of its own, which the topic then refuses: it is retried, and reported).
fn batches_within(letters: &[&Letter], max_bytes: usize) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut builder = BatchBuilder::new(Compression::None);
    let built = |b: BatchBuilder| {
        b.build()
            .map_err(|e| BrokerError::Internal(format!("a dead-letter batch: {e}")))
    };
    for l in letters {
        let size = l.record.key.as_ref().map_or(0, Bytes::len)
            + l.record.value.as_ref().map_or(0, Bytes::len)
            + l.record
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len) + 8)
                .sum::<usize>()
            + 32;
        if !builder.is_empty() && builder.estimated_size() + size > max_bytes.saturating_sub(256) {
            out.push(built(std::mem::replace(
                &mut builder,
                BatchBuilder::new(Compression::None),
            ))?);
        }
        builder.push(&l.record);
    }
    if !builder.is_empty() {
        out.push(built(builder)?);
    }
    Ok(out)
}

/// The dead letters of `work`, each stored batch decoded once. Blocking.
fn letters_of(topic: &str, work: Vec<FromBatch>) -> Result<Vec<Letter>> {
    let mut out = Vec::new();
    for w in work {
        let bad = |e| BrokerError::from_batch(topic, w.partition, e);
        let parsed = RecordBatch::parse(w.batch).map_err(bad)?;
        let mut wanted = w.records.into_iter().peekable();
        for r in parsed.records().map_err(bad)? {
            let r = r.map_err(bad)?;
            let Some((offset, _, _)) = wanted.peek() else { break };
            if r.offset != *offset {
                continue;
            }
            let Some((offset, reason, deliveries)) = wanted.next() else {
                break;
            };
            let mut headers = r.headers;
            let mut add = |k: &str, v: String| {
                headers.push(Header {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: Some(Bytes::from(v)),
                })
            };
            add(SOURCE_TOPIC, topic.to_string());
            add(SOURCE_PARTITION, w.partition.to_string());
            add(SOURCE_OFFSET, offset.to_string());
            add(DELIVERY_COUNT, deliveries.to_string());
            add(REASON, reason);
            out.push(Letter {
                partition: w.partition,
                offset,
                record: Record {
                    timestamp: r.timestamp,
                    key: r.key,
                    value: r.value,
                    headers,
                },
            });
        }
        // A wanted record missing from its cached batch is an error, not a silent skip:
        // the writer would find the same records waiting at once and go round without a pause.
        if let Some((offset, _, _)) = wanted.peek() {
            return Err(BrokerError::Internal(format!(
                "record {offset} of '{topic}' partition {} is not in its cached batch",
                w.partition
            )));
        }
    }
    Ok(out)
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
