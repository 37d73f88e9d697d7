//! Reading a share group's partitions into their windows.
//!
//! One task per group and partition, while its coordinator's state is current: it reads
//! stored batches from the window's end (from this broker's replica when it leads the
//! partition, waiting on its high watermark; otherwise from the leader's `Fetch`,
//! long-polling), checks each batch's CRC, notes each record's offset, key hash,
//! timestamp and `conveyor-deliver-at` header on the blocking pool, and adds them to the
//! window while it has room. A new group's partition starts where `auto_offset_reset` says,
//! written as the partition's first snapshot before anything of it is delivered.

use std::collections::VecDeque;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use conveyor_proto::v1::fetch_client::FetchClient;
use conveyor_proto::v1::{FetchRequest, PartitionFetch};
use conveyor_storage::batch::{BatchIter, RecordBatch};

use super::ShareCoordinator;
use super::state::SharesState;
use super::window::{CachedBatch, Limits, Parsed, Window};
use crate::blocking::blocking;
use crate::coordinator::end_offsets::{self, Spec};
use crate::coordinator::groups::assignor::TopicPartition;
use crate::coordinator::host::Shard;
use crate::error::{BrokerError, Result};

/// The header naming when a record may first be delivered (ms since the Unix epoch).
pub const DELIVER_AT_HEADER: &str = "conveyor-deliver-at";
/// Bytes read per step.
const READ_BYTES: usize = 1 << 20;
/// How long one read waits for new records.
const READ_WAIT: Duration = Duration::from_millis(500);
/// Pause after a failed read.
const RETRY: Duration = Duration::from_millis(200);

/// Fills `group`'s window of `partition` until the state stops being current or the group
/// or partition goes.
pub async fn run(coordinator: Arc<ShareCoordinator>, shard: Arc<Shard<SharesState>>, group: String, partition: i32) {
    let outcome = fill(&coordinator, &shard, &group, partition).await;
    if let Err(e) = &outcome {
        tracing::debug!(group, partition, error = %e, "share group fill stopped");
    }
    let mut st = shard.lock().await;
    if let Some(g) = st.groups.get_mut(&group) {
        g.filling.remove(&partition);
    }
}

async fn fill(
    coordinator: &ShareCoordinator,
    shard: &Arc<Shard<SharesState>>,
    group: &str,
    partition: i32,
) -> Result<()> {
    let registry = coordinator.registry();
    let mut ahead: VecDeque<(CachedBatch, Vec<Parsed>)> = VecDeque::new();
    let mut ahead_from: Option<u64> = None;
    let room_opened = {
        let st = shard.lock().await;
        let Some(g) = st.groups.get(group) else { return Ok(()) };
        Arc::clone(&g.room)
    };
    loop {
        if !shard.is_current() {
            return Ok(());
        }
        // Registered before the window is looked at, so room opened after the look wakes it.
        let notified = room_opened.notified();
        let mut notified = std::pin::pin!(notified);
        notified.as_mut().enable();
        let (topic, from, full) = {
            let st = shard.lock().await;
            let Some(g) = st.groups.get(group) else { return Ok(()) };
            let Some(w) = g.windows.get(&partition) else {
                return Ok(());
            };
            let limits = Limits::for_inflight(g.settings.max_inflight as usize);
            let now = conveyor_storage::unix_millis();
            let full = !w.has_room(&limits, g.settings.key_order, now);
            (g.settings.topic.clone(), w.end.ok_or(g.settings.earliest), full)
        };
        let from = match from {
            Ok(from) => from,
            Err(_) if full => {
                wait_for_room(notified).await;
                continue;
            }
            Err(earliest) => {
                begin(coordinator, shard, group, &topic, partition, earliest).await?;
                continue;
            }
        };
        // Batches read but not pushed yet (the window had room for part of a read): pushed
        // as room opens, so a read is parsed once however slowly it is taken in.
        if ahead_from != Some(from) {
            ahead.clear();
        }
        if full && !ahead.is_empty() {
            wait_for_room(notified).await;
            continue;
        }
        // A full window reads its next records ahead (one read, bounded as any), so they
        // are parsed and ready when room opens rather than read only then.
        if ahead.is_empty() {
            let read = match read(registry, &topic, partition, from).await {
                Ok(r) => r,
                Err(BrokerError::UnknownTopic(_)) => return Ok(()),
                Err(e) => {
                    tracing::debug!(group, topic, partition, error = %e, "share group read failed; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let Read { batches, log_start } = read;
            if batches.is_empty() {
                if from < log_start {
                    let mut st = shard.lock().await;
                    if let Some(w) = st.groups.get_mut(group).and_then(|g| g.windows.get_mut(&partition)) {
                        tracing::warn!(
                            group,
                            topic,
                            partition,
                            from,
                            log_start,
                            "records left the log before the share group read them"
                        );
                        w.skip_to(log_start);
                    }
                }
                continue;
            }
            let (topic_name, index) = (topic.clone(), partition);
            ahead = blocking(move || parse(&topic_name, index, batches, from)).await?.into();
            ahead_from = Some(from);
        }
        if full {
            // Room opened while reading wakes this at once (the wait was registered first).
            wait_for_room(notified).await;
            continue;
        }
        let mut st = shard.lock().await;
        let Some(g) = st.groups.get_mut(group) else {
            return Ok(());
        };
        let Some(w) = g.windows.get_mut(&partition) else {
            return Ok(());
        };
        if w.end != Some(from) {
            ahead.clear();
            continue;
        }
        let limits = Limits::for_inflight(g.settings.max_inflight as usize);
        take_in(
            w,
            &mut ahead,
            &limits,
            g.settings.key_order,
            conveyor_storage::unix_millis(),
        );
        ahead_from = w.end;
        g.available.notify_waiters();
    }
}

/// Waits for acknowledgements or dead letters to open room in the window (delays end by
/// time: looked at again after 100 ms).
async fn wait_for_room(notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) {
    let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
}

/// Pushes batches of `ahead` (read from the window's end) into `w` while it has room: the
/// window's bounds hold per batch (one scan of the window, then a count), and what does not
/// fit stays in `ahead` for later.
pub fn take_in(
    w: &mut Window,
    ahead: &mut VecDeque<(CachedBatch, Vec<Parsed>)>,
    limits: &Limits,
    key_order: bool,
    now: i64,
) {
    let mut room = w.room(limits, key_order, now);
    while let Some((_, records)) = ahead.front() {
        if room == 0 || !w.fits(limits) {
            break;
        }
        room = room.saturating_sub(records.len());
        if let Some((batch, records)) = ahead.pop_front() {
            w.push(batch, &records);
        }
    }
}

/// Sets a new partition's start (`earliest`: the log start, else the high watermark) and
/// writes it; a start already set stays. Where the offset cannot be looked up yet, it
/// returns after a pause with the start unset.
pub(super) async fn begin(
    coordinator: &ShareCoordinator,
    shard: &Arc<Shard<SharesState>>,
    group: &str,
    topic: &str,
    partition: i32,
    earliest: bool,
) -> Result<()> {
    let spec = if earliest { Spec::Earliest } else { Spec::Latest };
    let tp = TopicPartition::new(topic.to_string(), partition);
    let found = end_offsets::lookup(coordinator.registry(), std::slice::from_ref(&tp), spec).await;
    let Some(offset) = found.get(&tp).copied() else {
        tokio::time::sleep(RETRY).await;
        return Ok(());
    };
    let mut st = shard.lock().await;
    let Some(g) = st.groups.get_mut(group) else {
        return Ok(());
    };
    let Some(w) = g.windows.get_mut(&partition) else {
        return Ok(());
    };
    if w.end.is_some() {
        return Ok(());
    }
    w.begin_at(offset);
    let change = g.record_of(group, partition, &[]);
    let committed = shard.append_ahead(&change.into_iter().collect::<Vec<_>>()).await?;
    drop(st);
    committed.wait().await
}

/// Stored batches of `topic` `partition` from `from` (empty when there are none yet).
pub async fn read_once(
    registry: &crate::controller::Registry,
    topic: &str,
    partition: i32,
    from: u64,
) -> Result<Bytes> {
    Ok(read(registry, topic, partition, from).await?.batches)
}

struct Read {
    batches: Bytes,
    log_start: u64,
}

/// Stored batches of `topic` `partition` from `from`, waiting up to [`READ_WAIT`] for some.
async fn read(registry: &crate::controller::Registry, topic: &str, partition: i32, from: u64) -> Result<Read> {
    let t = registry.get(topic)?;
    match registry.leader(&t, partition) {
        Ok(replica) => {
            let mut watch = replica.watch_high_watermark();
            let deadline = tokio::time::Instant::now() + READ_WAIT;
            loop {
                let log_start = replica.log().log_start_offset();
                if from < log_start {
                    return Ok(Read {
                        batches: Bytes::new(),
                        log_start,
                    });
                }
                let hw = replica.high_watermark();
                if hw > from {
                    let log = replica.log();
                    let (name, index) = (topic.to_string(), partition);
                    let batches = blocking(move || {
                        log.read_up_to(from, READ_BYTES, hw)
                            .map_err(|e| BrokerError::from_log(&name, index, e))
                    })
                    .await?;
                    return Ok(Read { batches, log_start });
                }
                if tokio::time::timeout_at(deadline, watch.changed()).await.is_err() {
                    return Ok(Read {
                        batches: Bytes::new(),
                        log_start,
                    });
                }
            }
        }
        Err(BrokerError::NotLeader { leader, .. }) if leader != 0 => {
            let transport = registry.transport();
            let channel =
                crate::peer::connect(leader, transport.client_address(leader), Duration::from_secs(2)).await?;
            let request = FetchRequest {
                partitions: vec![PartitionFetch {
                    topic: topic.to_string(),
                    partition,
                    offset: from,
                    max_bytes: READ_BYTES as u32,
                }],
                max_wait_ms: READ_WAIT.as_millis() as u32,
                min_bytes: 1,
                max_bytes: READ_BYTES as u32,
                decode_records: false,
            };
            let answer = tokio::time::timeout(READ_WAIT * 4, FetchClient::new(channel).fetch(request))
                .await
                .map_err(|_| BrokerError::BrokerUnreachable {
                    id: leader,
                    address: transport.client_address(leader).unwrap_or_default(),
                    reason: "no answer to a share group's read".into(),
                })?
                .map_err(|status| {
                    use prost::Message as _;
                    let detail = conveyor_proto::v1::ErrorDetail::decode(status.details()).unwrap_or_default();
                    if detail.code == conveyor_proto::v1::ErrorCode::OffsetOutOfRange as i32 {
                        return BrokerError::OffsetOutOfRange {
                            topic: topic.to_string(),
                            partition,
                            offset: from,
                            log_start_offset: detail.log_start_offset,
                            log_end_offset: detail.log_end_offset,
                        };
                    }
                    BrokerError::BrokerUnreachable {
                        id: leader,
                        address: transport.client_address(leader).unwrap_or_default(),
                        reason: status.message().to_string(),
                    }
                });
            match answer {
                Ok(answer) => {
                    let data = answer.into_inner().partitions.into_iter().next().unwrap_or_default();
                    Ok(Read {
                        batches: data.batches,
                        log_start: data.log_start_offset,
                    })
                }
                Err(BrokerError::OffsetOutOfRange { log_start_offset, .. }) if from < log_start_offset => Ok(Read {
                    batches: Bytes::new(),
                    log_start: log_start_offset,
                }),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The hash of a record key the window orders by (never 0, which means no key).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish().max(1)
}

/// A `conveyor-deliver-at` value: ms since the epoch, in decimal (or 8 bytes big-endian).
pub fn deliver_at(value: &[u8]) -> Option<i64> {
    if let Ok(text) = std::str::from_utf8(value)
        && let Ok(ms) = text.trim().parse::<i64>()
    {
        return Some(ms);
    }
    let bytes: [u8; 8] = value.try_into().ok()?;
    Some(i64::from_be_bytes(bytes))
}

/// Each batch of `bytes` with its records at or after `from` noted; CRC-checked (altered
/// bytes are refused, never delivered). Blocking.
pub fn parse(topic: &str, partition: i32, bytes: Bytes, from: u64) -> Result<Vec<(CachedBatch, Vec<Parsed>)>> {
    let mut out = Vec::new();
    for batch in BatchIter::new(bytes) {
        let batch: RecordBatch = batch.map_err(|e| BrokerError::from_batch(topic, partition, e))?;
        let damaged = |source| BrokerError::DamagedOnDisk {
            topic: topic.to_string(),
            partition,
            offset: batch.header().base_offset,
            source,
        };
        batch.verify_crc().map_err(damaged)?;
        let header = batch.header();
        let cached = CachedBatch {
            base: header.base_offset,
            next: header.next_offset(),
            bytes: batch.bytes().clone(),
        };
        let mut records = Vec::new();
        if !header.is_control() && cached.next > from {
            records.reserve(header.record_count.min(1 << 16) as usize);
            // Borrowed: only the offset, key hash, timestamp and one header are kept.
            batch
                .for_each_record(|r| {
                    if r.offset < from {
                        return;
                    }
                    records.push(Parsed {
                        offset: r.offset,
                        key: r.key.map_or(0, key_hash),
                        timestamp: r.timestamp,
                        deliver_at: r.header(DELIVER_AT_HEADER.as_bytes()).and_then(deliver_at),
                    });
                })
                .map_err(|e| BrokerError::from_batch(topic, partition, e))?;
        }
        out.push((cached, records));
    }
    Ok(out)
}
