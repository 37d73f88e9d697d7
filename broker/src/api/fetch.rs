//! The `Fetch` service: long-polling fetch of stored batches and offset lookups.
//!
//! Fetch returns whole batches exactly as stored, up to each partition's high watermark. When
//! fewer than `min_bytes` are available it waits on the partitions' high-watermark watches
//! (no polling loop) until data arrives or `max_wait_ms` passes.
//!
//! With `decode_records` the broker decodes the batches itself (see [`decode`]): it checks
//! each batch's CRC first and answers DATA_LOSS rather than serve altered bytes, decompresses
//! one batch at a time within `[limits] max_uncompressed_batch_bytes`, counts the response
//! budget in decoded bytes, and does all of it on the blocking pool. What it decodes is
//! reserved first from the broker-wide decompression budget it shares with produce
//! validation ([`super::inflate_budget`]) and held by the decoded records until the response
//! is encoded (see [`decode_reads`]); a fetch that cannot get its share within a bounded wait
//! is answered BUSY (retriable).
//!
//! A partition's `log_start_offset` is read after its batches: when retention deleted the
//! segment holding the requested offset between the bounds check and the read, the batches
//! start at the new log start, and the client can tell that from a damaged base offset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_proto::v1::fetch_server::Fetch;
use conveyor_proto::v1::*;
use conveyor_storage::batch::BatchIter;
use futures::FutureExt;
use prost::Message;
use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use super::inflate_budget::{self, ByteBudget, Reservation, decoding_bytes};
use super::{Context, blocking};
use crate::error::{BrokerError, Result, check_topic_name_length};
use crate::replica::partition::Partition;

const DEFAULT_MAX_BYTES: u32 = 16 << 20;
const DEFAULT_PARTITION_MAX_BYTES: u32 = 1 << 20;
/// Largest response, below the broker's gRPC message limit with room for framing.
const MAX_RESPONSE_BYTES: u32 = 48 << 20;

#[derive(Debug, Clone)]
pub struct FetchService {
    pub ctx: Arc<Context>,
}

struct Wanted {
    partition: Arc<Partition>,
    offset: u64,
    max_bytes: usize,
}

/// What one read of one partition produced.
struct Read {
    high_watermark: u64,
    log_start_offset: u64,
    batches: Bytes,
    /// A partition-level failure (its offset left the log): other partitions go on.
    error: Option<BrokerError>,
}

/// Reads every wanted partition once, within the request's byte budget. Blocking unless
/// `disk` is false, when only bounds and errors are filled in.
fn read_once(wanted: &[Wanted], budget: usize, disk: bool) -> Result<Vec<Read>> {
    let mut left = budget;
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let p = &w.partition;
        let mut read = bounds(w);
        let hw = read.high_watermark;
        if read.error.is_none() && disk && left > 0 && w.offset < hw {
            read.batches = p
                .log()
                .read_up_to(w.offset, w.max_bytes.min(left), hw)
                .map_err(|e| BrokerError::from_log(&p.topic, p.index, e))?;
            // After the read: a retention pass that ran meanwhile may have moved the start
            // past the offset asked for, and the batches then start there.
            read.log_start_offset = p.log().log_start_offset();
        }
        left = left.saturating_sub(read.batches.len());
        out.push(read);
    }
    Ok(out)
}

/// A partition's bounds as a read of it answers them, with no batches yet: its high
/// watermark and log start, or the error for an offset outside its log.
fn bounds(w: &Wanted) -> Read {
    let p = &w.partition;
    let high_watermark = p.high_watermark();
    let (start, end) = (p.log().log_start_offset(), p.log().log_end_offset());
    let error = (w.offset < start || w.offset > end).then(|| BrokerError::OffsetOutOfRange {
        topic: p.topic.clone(),
        partition: p.index,
        offset: w.offset,
        log_start_offset: start,
        log_end_offset: end,
    });
    Read {
        high_watermark,
        log_start_offset: start,
        batches: Bytes::new(),
        error,
    }
}

/// How far behind its high watermark a partition may be read on the reactor, in offsets.
const IN_PLACE_LAG: u64 = 4096;
/// Most bytes a fetch reads on the reactor, over all its partitions. A read that would need
/// more (a consumer close to the tail rarely does) is done on the blocking pool instead, so
/// the answer is the one the fetch always gave.
const IN_PLACE_BYTES: usize = 256 << 10;

/// Reads every wanted partition as [`read_once`] does (the same batches and bounds), on the
/// calling thread, if each is within [`IN_PLACE_LAG`] offsets of its high watermark, reads
/// in its active segment, needs at most [`IN_PLACE_BYTES`] in all, and every byte needed is
/// in the page cache; `None`, having waited on nothing, otherwise (see
/// `conveyor_storage::PartitionLog::read_up_to_in_place`).
fn read_in_place(wanted: &[Wanted], budget: usize) -> Option<Vec<Read>> {
    let near_tail = |w: &Wanted| w.partition.high_watermark().saturating_sub(w.offset) <= IN_PLACE_LAG;
    if !wanted.iter().all(near_tail) {
        return None;
    }
    let mut left = budget;
    let mut in_place_left = IN_PLACE_BYTES;
    let mut out = Vec::with_capacity(wanted.len());
    for w in wanted {
        let p = &w.partition;
        let mut read = bounds(w);
        let hw = read.high_watermark;
        // Offsets outside the log are answered by `read_once`, as they always were.
        if read.error.is_some() {
            return None;
        }
        if left > 0 && w.offset < hw {
            let full = w.max_bytes.min(left);
            let max = full.min(in_place_left);
            match p.log().read_up_to_in_place(w.offset, max, hw) {
                // Cut short by the in-place limit where `read_once` would have read on.
                Ok(Some(batches)) if max < full && next_offset_after(&batches).is_none_or(|next| next < hw) => {
                    return None;
                }
                Ok(Some(batches)) => read.batches = batches,
                // Not cached, a lock held by a writer, or the offset moved out of the log
                // meanwhile: the blocking read answers it as it always did.
                Ok(None) | Err(_) => return None,
            }
            read.log_start_offset = p.log().log_start_offset();
        }
        left = left.saturating_sub(read.batches.len());
        in_place_left = in_place_left.saturating_sub(read.batches.len());
        out.push(read);
    }
    Some(out)
}

/// The offset after the last whole batch in `batches`, if they parse.
fn next_offset_after(batches: &Bytes) -> Option<u64> {
    let mut position = 0;
    let mut next = None;
    while position < batches.len() {
        let header = conveyor_storage::batch::BatchHeader::parse(&batches[position..]).ok()?;
        if header.size() == 0 {
            return None;
        }
        next = Some(header.next_offset());
        position += header.size();
    }
    next
}

/// Where a partition's stored batches are decoded, and the bounds on doing it.
struct DecodeJob {
    topic: String,
    partition: i32,
    /// Records below this offset are skipped (the first batch may start earlier).
    from: u64,
    /// What one batch may decompress to.
    max_uncompressed: usize,
}

/// Decodes stored batches into records, skipping control batches, within `budget` decoded
/// bytes (protobuf size) of which it takes its share; at least one record is returned when
/// there is one, so a consumer always moves on. Every buffer of a record is a slice of a
/// buffer carrying `held` (its share of the decompression budget), so the share lasts as
/// long as the records do.
///
/// Every batch's CRC is checked before it is decoded: bytes altered on disk after they were
/// acknowledged are refused with [`BrokerError::DamagedOnDisk`], never served.
///
/// Also returns the offset of the first record left out when the budget ran out part-way
/// (the consumer's next offset), `None` when every batch was decoded to its end.
fn decode(
    job: &DecodeJob,
    bytes: &Bytes,
    budget: &mut usize,
    held: &Reservation,
) -> Result<(Vec<Record>, Option<u64>)> {
    let damaged = |offset: u64, source| BrokerError::DamagedOnDisk {
        topic: job.topic.clone(),
        partition: job.partition,
        offset,
        source,
    };
    let mut out = Vec::new();
    let mut at = job.from;
    for batch in BatchIter::new(bytes.clone()) {
        let batch = batch.map_err(|e| damaged(at, e))?;
        at = batch.header().base_offset;
        batch.verify_crc().map_err(|e| damaged(at, e))?;
        if batch.header().is_control() {
            continue;
        }
        let records = batch.records_within(job.max_uncompressed).map_err(|e| match e {
            e @ conveyor_storage::BatchError::InflatesTooLarge { .. } => BrokerError::InvalidRequest(format!(
                "topic '{}' partition {}: the stored batch at offset {at} cannot be decoded here: {e} ([limits] max_uncompressed_batch_bytes); fetch it without decode_records",
                job.topic, job.partition
            )),
            e => damaged(at, e),
        })?;
        // Every field of a record is a slice of its batch's records section: the share rides
        // on that buffer.
        for r in records.with_section(|section| held.attach(section)) {
            let r = r.map_err(|e| damaged(at, e))?;
            if r.offset < job.from {
                continue;
            }
            let record = Record {
                key: r.key,
                value: r.value,
                timestamp: r.timestamp,
                offset: r.offset,
                headers: r
                    .headers
                    .into_iter()
                    .map(|h| Header {
                        key: String::from_utf8_lossy(&h.key).into_owned(),
                        value: h.value,
                    })
                    .collect(),
            };
            let size = record.encoded_len();
            if size > *budget && !out.is_empty() {
                *budget = 0;
                return Ok((out, Some(record.offset)));
            }
            *budget = budget.saturating_sub(size);
            out.push(record);
        }
    }
    Ok((out, None))
}

/// Decodes each partition's read (`jobs` and `batches` pair up) within `budget` decoded bytes
/// in all, on the blocking pool, one batch at a time. The decoded records count against the
/// broker-wide decompression budget shared with produce validation (past a bounded wait the
/// fetch is answered BUSY, retriable). The share moves into the blocking job, so a fetch
/// cancelled meanwhile does not return it early, and then into the records' buffers
/// ([`Reservation::attach`]): it comes back when tonic has encoded the response and dropped
/// the message, or when a cancelled fetch drops its records, not when the handler returns.
async fn decode_reads(
    shared: &ByteBudget,
    jobs: Vec<DecodeJob>,
    batches: Vec<Bytes>,
    budget: usize,
) -> Result<Vec<Result<(Vec<Record>, Option<u64>)>>> {
    let max_uncompressed = jobs.iter().map(|j| j.max_uncompressed).max().unwrap_or(0);
    let holds = decoding_bytes(&batches, max_uncompressed, budget);
    let first = jobs.first().map(|j| (j.topic.clone(), j.partition));
    let what = move || match first {
        Some((topic, partition)) => format!("a decoding fetch of topic '{topic}' partition {partition}"),
        None => "a decoding fetch".to_string(),
    };
    shared
        .run_blocking(holds, what, move |held| {
            let mut budget = budget;
            Ok(jobs
                .iter()
                .zip(&batches)
                .map(|(job, bytes)| decode(job, bytes, &mut budget, held))
                .collect())
        })
        .await
}

impl FetchService {
    fn resolve(&self, req: &FetchRequest) -> Result<Vec<Wanted>> {
        if req.partitions.is_empty() {
            return Err(BrokerError::InvalidRequest(
                "a fetch needs at least one partition".into(),
            ));
        }
        req.partitions
            .iter()
            .map(|pf| {
                check_topic_name_length(&pf.topic)?;
                let topic = self.ctx.registry.get(&pf.topic)?;
                let partition = self.ctx.registry.leader(&topic, pf.partition)?;
                let max = if pf.max_bytes == 0 {
                    DEFAULT_PARTITION_MAX_BYTES
                } else {
                    pf.max_bytes
                };
                Ok(Wanted {
                    partition,
                    offset: pf.offset,
                    max_bytes: max as usize,
                })
            })
            .collect()
    }

    async fn fetch_inner(&self, req: FetchRequest) -> Result<FetchResponse> {
        let wanted = Arc::new(self.resolve(&req)?);
        let requested = if req.max_bytes == 0 {
            DEFAULT_MAX_BYTES
        } else {
            req.max_bytes
        };
        // A response must fit in one gRPC message.
        let budget = requested.min(MAX_RESPONSE_BYTES) as usize;
        let wait = Duration::from_millis(u64::from(req.max_wait_ms).min(self.ctx.max_fetch_wait_ms));
        let deadline = Instant::now() + wait;
        let mut watches: Vec<_> = wanted.iter().map(|w| w.partition.watch_high_watermark()).collect();
        let mut stopping = self.ctx.stopping.clone();
        let results = loop {
            for w in &mut watches {
                w.borrow_and_update();
            }
            // A consumer waiting at the tail has nothing to read: answer its bounds without
            // a hop to the blocking pool. Data committed after this check wakes the watch.
            let mut results = if wanted.iter().any(|w| w.offset < w.partition.high_watermark()) {
                // A consumer at the tail reads bytes just written: from the page cache, here,
                // without two thread hops; only what is not cached goes to the blocking pool.
                match read_in_place(&wanted, budget) {
                    Some(results) => {
                        self.ctx.metrics.fetch_reads_in_place.add(1);
                        results
                    }
                    None => {
                        let job = Arc::clone(&wanted);
                        blocking(move || read_once(&job, budget, true)).await?
                    }
                }
            } else {
                read_once(&wanted, budget, false)?
            };
            // A fetch of one partition whose offset left the log fails as a whole, with the
            // bounds in its status; with several partitions, each answers for itself.
            if results.len() == 1
                && let Some(error) = results[0].error.take()
            {
                return Err(error);
            }
            let total: usize = results.iter().map(|r| r.batches.len()).sum();
            let failed = results.iter().any(|r| r.error.is_some());
            let now = Instant::now();
            if total >= (req.min_bytes.max(1) as usize) || failed || now >= deadline {
                break results;
            }
            let changed = futures::future::select_all(watches.iter_mut().map(|w| w.changed().boxed()));
            tokio::select! {
                woke = tokio::time::timeout(deadline - now, changed) => match woke {
                    Ok((Ok(()), _, _)) => {}
                    // Timed out, or a partition stopped (deleted, shutting down): answer now.
                    _ => break results,
                },
                // A shutting-down broker answers waiting consumers instead of holding them.
                _ = stopping.wait_for(|s| *s) => break results,
            }
        };
        let records = if req.decode_records {
            let batches: Vec<Bytes> = results.iter().map(|r| r.batches.clone()).collect();
            let jobs = wanted
                .iter()
                .map(|w| DecodeJob {
                    topic: w.partition.topic.clone(),
                    partition: w.partition.index,
                    from: w.offset,
                    max_uncompressed: self.ctx.max_uncompressed_batch_bytes,
                })
                .collect();
            decode_reads(inflate_budget::shared(), jobs, batches, budget).await?
        } else {
            results.iter().map(|_| Ok((Vec::new(), None))).collect()
        };
        let single = results.len() == 1;
        let mut partitions = Vec::with_capacity(results.len());
        for ((w, read), records) in wanted.iter().zip(results).zip(records) {
            let Read {
                high_watermark,
                log_start_offset,
                batches,
                mut error,
            } = read;
            // As with an offset out of range: alone it fails the fetch, among others it is
            // that partition's answer.
            let (records, stopped_at) = match records {
                Ok(decoded) => decoded,
                Err(e) if single => return Err(e),
                Err(e) => {
                    error = Some(e);
                    (Vec::new(), None)
                }
            };
            if let Some(e) = &error {
                self.ctx.metrics.request_failed(e.error_code());
            }
            w.partition.traffic.bytes_out.add(batches.len() as u64);
            // A partition answered with an error delivered nothing: its consumer stays put.
            let next_offset = if error.is_some() {
                w.offset
            } else {
                stopped_at.unwrap_or_else(|| next_offset_after(&batches).unwrap_or(w.offset))
            };
            let batches = if req.decode_records { Bytes::new() } else { batches };
            partitions.push(PartitionData {
                topic: w.partition.topic.clone(),
                partition: w.partition.index,
                high_watermark,
                log_start_offset,
                batches,
                records,
                error: error.map(|e| e.detail()),
                next_offset,
            });
        }
        Ok(FetchResponse { partitions })
    }

    async fn list_offsets_inner(&self, req: ListOffsetsRequest) -> Result<ListOffsetsResponse> {
        let mut results = Vec::with_capacity(req.queries.len());
        for q in req.queries {
            check_topic_name_length(&q.topic)?;
            let topic = self.ctx.registry.get(&q.topic)?;
            let p = self.ctx.registry.leader(&topic, q.partition)?;
            let hw = p.high_watermark();
            let (offset, found) = match q.spec {
                Some(offset_query::Spec::Earliest(_)) | None => (p.log().log_start_offset(), true),
                Some(offset_query::Spec::Latest(_)) => (hw, true),
                Some(offset_query::Spec::Timestamp(ts)) => {
                    let log = p.log();
                    let (topic, index) = (p.topic.clone(), p.index);
                    let found = blocking(move || {
                        log.offset_for_timestamp(ts)
                            .map_err(|e| BrokerError::from_log(&topic, index, e))
                    })
                    .await?;
                    match found {
                        Some(o) if o < hw => (o, true),
                        _ => (hw, false),
                    }
                }
            };
            results.push(OffsetResult {
                topic: q.topic,
                partition: q.partition,
                offset,
                found,
                log_start_offset: p.log().log_start_offset(),
                high_watermark: hw,
                log_end_offset: p.log().log_end_offset(),
            });
        }
        Ok(ListOffsetsResponse { results })
    }
}

#[tonic::async_trait]
impl Fetch for FetchService {
    async fn fetch(&self, request: Request<FetchRequest>) -> std::result::Result<Response<FetchResponse>, Status> {
        let started = Instant::now();
        self.ctx.metrics.fetch_requests.add(1);
        let req = request.into_inner();
        // At debug level, so that a broker not asked for it pays only a level check. It names
        // the first partition (most fetches have one); the answer adds what it served.
        let first = req.partitions.first();
        let span = tracing::debug_span!(
            "fetch",
            topic = first.map(|p| p.topic.as_str()),
            partition = first.map(|p| p.partition),
            offset = first.map(|p| p.offset),
            partitions = req.partitions.len(),
            high_watermark = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        let result = self.fetch_inner(req).instrument(span.clone()).await;
        if let Ok(response) = &result
            && let Some(first) = response.partitions.first()
        {
            span.record("high_watermark", first.high_watermark);
            span.record("bytes", first.batches.len());
        }
        self.ctx.metrics.fetch_latency.observe(started.elapsed());
        result.map(Response::new).map_err(|e| {
            self.ctx.metrics.request_failed(e.error_code());
            e.into()
        })
    }

    async fn list_offsets(
        &self,
        request: Request<ListOffsetsRequest>,
    ) -> std::result::Result<Response<ListOffsetsResponse>, Status> {
        self.ctx.metrics.fetch_requests.add(1);
        self.list_offsets_inner(request.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| {
                self.ctx.metrics.request_failed(e.error_code());
                e.into()
            })
    }
}

#[cfg(test)]
mod tests {
    use conveyor_storage::batch::{self, BatchBuilder, Compression};

    use super::*;

    const VALUE: usize = 1000;

    /// `count` stored batches of one `VALUE`-byte record each, compressed, at offsets 0...
    fn stored(count: u64) -> Vec<u8> {
        let mut all = Vec::new();
        for i in 0..count {
            let mut b = BatchBuilder::new(Compression::Zstd);
            b.push(&batch::Record {
                timestamp: 1,
                value: Some(Bytes::from(vec![b'a' + i as u8; VALUE])),
                ..batch::Record::default()
            });
            let mut bytes = b.build().expect("batch").to_vec();
            batch::stamp(&mut bytes, i, 1, i + 1);
            all.extend_from_slice(&bytes);
        }
        all
    }

    fn job(max_uncompressed: usize) -> DecodeJob {
        DecodeJob {
            topic: "t".into(),
            partition: 0,
            from: 0,
            max_uncompressed,
        }
    }

    #[test]
    fn a_decoding_fetch_counts_its_budget_in_decoded_bytes_and_returns_at_least_one_record() {
        let bytes = Bytes::from(stored(10));
        assert!(bytes.len() < 10 * VALUE / 4, "the batches compress well");
        // The stored bytes fit the budget three times over; decoded, only about three do.
        let mut budget = 3 * VALUE + 100;
        let (records, stopped_at) =
            decode(&job(1 << 20), &bytes, &mut budget, &Reservation::default()).expect("decode");
        assert_eq!(records.len(), 3, "decoded bytes are what the budget counts");
        assert_eq!(
            stopped_at,
            Some(3),
            "the consumer goes on from the first record left out"
        );
        let mut budget = 1;
        let (records, stopped_at) =
            decode(&job(1 << 20), &bytes, &mut budget, &Reservation::default()).expect("decode");
        assert_eq!(records.len(), 1, "one record even over the budget");
        assert_eq!(stopped_at, Some(1));
        assert_eq!(budget, 0);
        let mut budget = 1 << 30;
        let (records, stopped_at) =
            decode(&job(1 << 20), &bytes, &mut budget, &Reservation::default()).expect("decode");
        assert_eq!(
            (records.len(), stopped_at),
            (10, None),
            "all of it: go on after the last batch"
        );
    }

    #[test]
    fn a_stored_batch_with_a_flipped_byte_is_refused_not_decoded() {
        let mut bytes = stored(3);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let mut budget = usize::MAX;
        let e = decode(&job(1 << 20), &Bytes::from(bytes), &mut budget, &Reservation::default()).expect_err("damaged");
        assert!(matches!(e, BrokerError::DamagedOnDisk { offset: 2, .. }), "{e}");
        assert!(e.to_string().contains("CRC"), "{e}");
        let status = Status::from(e);
        assert_eq!(status.code(), tonic::Code::DataLoss);
    }

    #[test]
    fn a_stored_batch_inflating_past_the_limit_is_not_decompressed() {
        let mut budget = usize::MAX;
        let e = decode(
            &job(VALUE - 1),
            &Bytes::from(stored(1)),
            &mut budget,
            &Reservation::default(),
        )
        .expect_err("too large");
        assert!(e.to_string().contains("max_uncompressed_batch_bytes"), "{e}");
    }

    #[tokio::test]
    async fn decoded_records_hold_their_share_of_the_budget_until_they_are_dropped() {
        let budget = ByteBudget::new(1 << 20, Duration::from_millis(50), "decompression memory");
        let bytes = Bytes::from(stored(4));
        let decoded = decode_reads(&budget, vec![job(1 << 20)], vec![bytes], usize::MAX)
            .await
            .expect("decode");
        let records = match decoded.as_slice() {
            [Ok((records, _))] => records.clone(),
            other => panic!("one partition's records expected: {other:?}"),
        };
        assert_eq!(records.len(), 4);
        drop(decoded);
        assert!(
            budget.available() < 1 << 20,
            "records on their way into a response still hold the decoded memory"
        );
        let response = FetchResponse {
            partitions: vec![PartitionData {
                records,
                ..PartitionData::default()
            }],
        };
        // What tonic does with the message: encode it, then drop it.
        let encoded = response.encode_to_vec();
        drop(response);
        assert!(!encoded.is_empty());
        assert_eq!(budget.available(), 1 << 20, "all returned once the records are gone");
    }
}
