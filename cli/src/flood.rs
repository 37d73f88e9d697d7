//! `conveyor bench flood`: many concurrent produce streams, each sending large requests, to
//! measure what a broker holds in memory under a flood (read its VmHWM while this runs).
//!
//! It speaks raw HTTP/2 and sends one encoded request, framed once, from a shared buffer on
//! every stream, so the tool itself holds one request's bytes however many streams it opens,
//! and it sends as fast as the broker's flow control lets it, as any client could. It stops
//! by itself: once `--requests-per-stream` requests on each of `--streams` streams are
//! answered, or at `--max-secs` (then it reports what was answered by then and closes its
//! connections).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Args;
use conveyor_client::Client;
use conveyor_client::proto::{PartitionProduce, ProduceRequest, ProduceResponse, Record};
use prost::Message;
use serde_json::json;

use crate::output::{self, Format};

/// Most bytes of records in one part: under the default `max.message.bytes` (1 MiB) with
/// room for the batch's framing.
const PART_BYTES: usize = 1_000_000;

#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    /// Topic to flood; created with --partitions if it does not exist.
    #[arg(long)]
    pub topic: String,
    /// Concurrent produce streams.
    #[arg(long, default_value_t = 1000)]
    pub streams: usize,
    /// HTTP/2 connections the streams are spread over.
    #[arg(long, default_value_t = 10)]
    pub connections: usize,
    /// Bytes of record values in each request (split in parts of about 1 MB, one batch each).
    #[arg(long, default_value_t = 16 << 20)]
    pub request_bytes: usize,
    /// Requests each stream sends before it ends.
    #[arg(long, default_value_t = 1)]
    pub requests_per_stream: usize,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100_000)]
    pub record_size: usize,
    /// Partitions when the topic is created.
    #[arg(long, default_value_t = 1)]
    pub partitions: i32,
    /// Stop after this many seconds even if requests are unanswered (not an error: a flood
    /// is meant to outrun the broker).
    #[arg(long, default_value_t = 60)]
    pub max_secs: u64,
}

#[derive(Debug, Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    failed_parts: AtomicU64,
    failed_streams: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Tally {
    fn error(&self, e: String) {
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(e);
    }
}

/// One request, encoded and framed for gRPC (flag, big-endian length, message).
fn framed_request(args: &FloodArgs) -> Bytes {
    let record_size = args.record_size.clamp(1, PART_BYTES);
    let per_part = (PART_BYTES / record_size).max(1);
    let records = args.request_bytes.div_ceil(record_size).max(1);
    let value = Bytes::from(vec![b'f'; record_size]);
    let partitions = args.partitions.max(1);
    let parts = (0..records.div_ceil(per_part))
        .map(|i| PartitionProduce {
            topic: args.topic.clone(),
            partition: i as i32 % partitions,
            records: (0..per_part.min(records - i * per_part))
                .map(|_| Record {
                    value: Some(value.clone()),
                    ..Record::default()
                })
                .collect(),
            ..PartitionProduce::default()
        })
        .collect();
    let message = ProduceRequest {
        request_id: 0,
        acks: 0,
        partitions: parts,
    }
    .encode_to_vec();
    let mut out = BytesMut::with_capacity(message.len() + 5);
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.extend_from_slice(&message);
    out.freeze()
}

pub async fn run(client: &Client, address: &str, args: FloodArgs, format: Format) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.streams > 0 && args.connections > 0,
        "--streams and --connections must be positive"
    );
    crate::bench::ensure_topic(client, &args.topic, args.partitions, 1, &[]).await?;
    let request = framed_request(&args);
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut connections = Vec::new();
    for c in 0..args.connections {
        let streams = args.streams / args.connections + usize::from(c < args.streams % args.connections);
        connections.push(tokio::spawn(connection(
            address.to_string(),
            streams,
            args.requests_per_stream,
            request.clone(),
            Arc::clone(&tally),
        )));
    }
    let aborts: Vec<_> = connections.iter().map(|c| c.abort_handle()).collect();
    let all = futures::future::join_all(connections);
    let finished = tokio::time::timeout(Duration::from_secs(args.max_secs), all)
        .await
        .is_ok();
    let elapsed = started.elapsed().as_secs_f64();
    // Cut: the connections close, and the broker drops what it had not answered.
    aborts.iter().for_each(|a| a.abort());
    let (sent, answered) = (
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
    );
    let failed_parts = tally.failed_parts.load(Ordering::Relaxed);
    let failed_streams = tally.failed_streams.load(Ordering::Relaxed);
    let first_error = tally
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    match format {
        Format::Json => output::json(&json!({
            "mode": "flood", "topic": args.topic, "streams": args.streams, "connections": args.connections,
            "request_bytes": request.len(), "requests_sent": sent, "requests_answered": answered,
            "failed_parts": failed_parts, "failed_streams": failed_streams, "seconds": elapsed,
            "finished": finished, "first_error": first_error,
        })),
        Format::Text => {
            println!(
                "flood: {sent} requests of {} bytes on {} streams over {} connections; {answered} answered, {failed_parts} failed parts, {failed_streams} failed streams in {elapsed:.2} s{}",
                request.len(),
                args.streams,
                args.connections,
                if finished { "" } else { " (cut at --max-secs)" }
            );
            if let Some(e) = &first_error {
                println!("first error: {e}");
            }
        }
    }
    Ok(())
}

/// One connection with `streams` streams, each sending `requests` copies of `request`.
async fn connection(address: String, streams: usize, requests: usize, request: Bytes, tally: Arc<Tally>) {
    let fail = |e: String| {
        tally.failed_streams.fetch_add(streams as u64, Ordering::Relaxed);
        tally.error(e);
    };
    let tcp = match tokio::net::TcpStream::connect(&address).await {
        Ok(tcp) => tcp,
        Err(e) => return fail(format!("connect to {address}: {e}")),
    };
    let _ = tcp.set_nodelay(true);
    let (client, driver) = match h2::client::handshake(tcp).await {
        Ok(pair) => pair,
        Err(e) => return fail(format!("HTTP/2 handshake with {address}: {e}")),
    };
    let driver = tokio::spawn(async move {
        let _ = driver.await;
    });
    let mut tasks = Vec::with_capacity(streams);
    for _ in 0..streams {
        let tally = Arc::clone(&tally);
        let (client, address, request) = (client.clone(), address.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = stream(client, &address, requests, request, &tally).await {
                tally.failed_streams.fetch_add(1, Ordering::Relaxed);
                tally.error(e);
            }
        }));
    }
    futures::future::join_all(tasks).await;
    driver.abort();
}

async fn stream(
    client: h2::client::SendRequest<Bytes>,
    address: &str,
    requests: usize,
    request: Bytes,
    tally: &Tally,
) -> Result<(), String> {
    let mut client = client.ready().await.map_err(|e| format!("open a stream: {e}"))?;
    let head = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}/conveyor.v1.Produce/ProduceStream"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut body) = client.send_request(head, false).map_err(|e| format!("send: {e}"))?;
    // Slices of the shared buffer: h2 keeps what flow control holds back without copying it.
    for i in 0..requests {
        body.send_data(request.clone(), i + 1 == requests)
            .map_err(|e| format!("send: {e}"))?;
        tally.sent.fetch_add(1, Ordering::Relaxed);
    }
    let response = response.await.map_err(|e| format!("response: {e}"))?;
    let mut incoming = response.into_body();
    let mut buffer = BytesMut::new();
    while let Some(chunk) = incoming.data().await {
        let chunk = chunk.map_err(|e| format!("response body: {e}"))?;
        let _ = incoming.flow_control().release_capacity(chunk.len());
        buffer.extend_from_slice(&chunk);
        while buffer.len() >= 5 {
            let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
            if buffer.len() < 5 + len {
                break;
            }
            buffer.advance(5);
            let message = buffer.split_to(len);
            let answer = ProduceResponse::decode(message.freeze()).map_err(|e| format!("decode: {e}"))?;
            tally.answered.fetch_add(1, Ordering::Relaxed);
            for part in answer.partitions {
                if let Some(error) = part.error {
                    tally.failed_parts.fetch_add(1, Ordering::Relaxed);
                    tally.error(error.message);
                }
            }
        }
    }
    let trailers = incoming.trailers().await.map_err(|e| format!("trailers: {e}"))?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(status) if status.as_bytes() != b"0" => {
            let message = trailers
                .as_ref()
                .and_then(|t| t.get("grpc-message"))
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            Err(format!("grpc-status {status:?}: {message}"))
        }
        _ => Ok(()),
    }
}
