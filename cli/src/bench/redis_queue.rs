//! `conveyor bench redis-queue`: the same work as `bench queue`, on Redis Streams, for a
//! side-by-side figure. It speaks RESP itself (no Redis crate): XADD the records in
//! pipelined batches, create a consumer group, then W workers, each on its own connection,
//! loop XREADGROUP (COUNT records, `>`) and XACK every id read, the acknowledgement sent in
//! the same write as the next read (pipelined, as a tuned Redis worker would). The time from
//! before the workers connect until the XACK that acknowledged the Nth record was answered
//! is the measure.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::output::{self, Format};

#[derive(Debug, Clone, Args)]
pub struct RedisQueueArgs {
    /// The Redis server.
    #[arg(long, default_value = "127.0.0.1:6379")]
    pub redis: String,
    #[arg(long, default_value_t = 8)]
    pub workers: u32,
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Bytes per record value.
    #[arg(long, default_value_t = 100)]
    pub record_size: usize,
    /// Records per XREADGROUP.
    #[arg(long, default_value_t = 500)]
    pub count: u32,
    /// Give up after this long: a duration such as 90s or 10m; a bare number counts seconds.
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::time::parse_secs)]
    pub timeout: Duration,
}

/// A RESP reply.
#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

struct Conn {
    read: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

impl Conn {
    async fn open(addr: &str) -> anyhow::Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach Redis at {addr}: {e} (start redis-server, or pass --redis)"))?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Conn {
            read: BufReader::with_capacity(1 << 20, r),
            write: w,
        })
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.write.write_all(bytes).await?;
        Ok(())
    }

    fn reply(&mut self) -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Reply>> + Send + '_>> {
        Box::pin(async move {
            let mut line = Vec::new();
            self.read.read_until(b'\n', &mut line).await?;
            anyhow::ensure!(line.len() >= 3, "Redis closed the connection");
            let body = String::from_utf8_lossy(&line[1..line.len() - 2]).to_string();
            Ok(match line[0] {
                b'+' => Reply::Simple(body),
                b'-' => Reply::Error(body),
                b':' => Reply::Int(body.parse()?),
                b'$' => {
                    let n: i64 = body.parse()?;
                    if n < 0 {
                        Reply::Bulk(None)
                    } else {
                        let mut buf = vec![0; n as usize + 2];
                        self.read.read_exact(&mut buf).await?;
                        buf.truncate(n as usize);
                        Reply::Bulk(Some(buf))
                    }
                }
                b'*' => {
                    let n: i64 = body.parse()?;
                    if n < 0 {
                        Reply::Array(None)
                    } else {
                        let mut items = Vec::with_capacity(n as usize);
                        for _ in 0..n {
                            items.push(self.reply().await?);
                        }
                        Reply::Array(Some(items))
                    }
                }
                other => anyhow::bail!("unexpected RESP type byte {other}"),
            })
        })
    }
}

/// The entry ids of an XREADGROUP reply.
fn ids_of(reply: Reply) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut ids = Vec::new();
    match reply {
        Reply::Array(None) | Reply::Bulk(None) => {}
        Reply::Array(Some(streams)) => {
            for stream in streams {
                let Reply::Array(Some(mut parts)) = stream else {
                    continue;
                };
                if parts.len() < 2 {
                    continue;
                }
                if let Reply::Array(Some(entries)) = parts.remove(1) {
                    for e in entries {
                        if let Reply::Array(Some(mut fields)) = e
                            && !fields.is_empty()
                            && let Reply::Bulk(Some(id)) = fields.remove(0)
                        {
                            ids.push(id);
                        }
                    }
                }
            }
        }
        Reply::Error(e) => anyhow::bail!("Redis: {e}"),
        other => anyhow::bail!("unexpected XREADGROUP reply {other:?}"),
    }
    Ok(ids)
}

pub async fn run(args: RedisQueueArgs, format: Format) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.workers > 0 && args.records > 0,
        "--workers and --records must be positive"
    );
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let stream = format!("bench-queue-{stamp}");
    let group = "bench";
    let mut c = Conn::open(&args.redis).await?;
    let value = vec![b'x'; args.record_size];
    let mut sent = 0u64;
    while sent < args.records {
        let n = (args.records - sent).min(1000);
        let mut out = Vec::new();
        for _ in 0..n {
            command(&mut out, &[b"XADD", stream.as_bytes(), b"*", b"v", &value]);
        }
        c.send(&out).await?;
        for _ in 0..n {
            if let Reply::Error(e) = c.reply().await? {
                anyhow::bail!("XADD: {e}");
            }
        }
        sent += n;
    }
    let mut out = Vec::new();
    command(
        &mut out,
        &[b"XGROUP", b"CREATE", stream.as_bytes(), group.as_bytes(), b"0"],
    );
    c.send(&out).await?;
    match c.reply().await? {
        Reply::Simple(ok) if ok == "OK" => {}
        other => anyhow::bail!("XGROUP CREATE: {other:?}"),
    }
    let acked = Arc::new(AtomicU64::new(0));
    // When the last XACK needed was answered: the end of the measure, not the workers'
    // end, which may wait out one more XREADGROUP BLOCK on the emptied stream.
    let finished: Arc<std::sync::OnceLock<Instant>> = Arc::new(std::sync::OnceLock::new());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.workers {
        let finished = Arc::clone(&finished);
        let (addr, stream, acked, target, count) = (
            args.redis.clone(),
            stream.clone(),
            Arc::clone(&acked),
            args.records,
            args.count,
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await?;
            let consumer = format!("w{w}");
            let count = count.to_string();
            let mut pending: Vec<Vec<u8>> = Vec::new();
            let mut mine = 0u64;
            // Counts `n` acknowledged, the clock stopping at the one that reaches the target.
            let mut acknowledged = |n: i64| {
                let n = n as u64;
                mine += n;
                if acked.fetch_add(n, Ordering::Relaxed) + n >= target {
                    let _ = finished.set(Instant::now());
                }
            };
            while acked.load(Ordering::Relaxed) < target {
                let mut out = Vec::new();
                let acking = !pending.is_empty();
                if acking {
                    let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), group.as_bytes()];
                    args.extend(pending.iter().map(Vec::as_slice));
                    command(&mut out, &args);
                }
                command(
                    &mut out,
                    &[
                        b"XREADGROUP",
                        b"GROUP",
                        group.as_bytes(),
                        consumer.as_bytes(),
                        b"COUNT",
                        count.as_bytes(),
                        b"BLOCK",
                        b"100",
                        b"STREAMS",
                        stream.as_bytes(),
                        b">",
                    ],
                );
                c.send(&out).await?;
                if acking {
                    match c.reply().await? {
                        Reply::Int(n) => acknowledged(n),
                        other => anyhow::bail!("XACK: {other:?}"),
                    }
                    pending.clear();
                }
                pending = ids_of(c.reply().await?)?;
            }
            if !pending.is_empty() {
                let mut out = Vec::new();
                let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), group.as_bytes()];
                args.extend(pending.iter().map(Vec::as_slice));
                command(&mut out, &args);
                c.send(&out).await?;
                if let Reply::Int(n) = c.reply().await? {
                    acknowledged(n);
                }
            }
            anyhow::Ok(mine)
        }));
    }
    let joined = tokio::time::timeout(args.timeout, futures::future::join_all(tasks))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the workers did not acknowledge {} records within {:?}",
                args.records,
                args.timeout
            )
        })?;
    let elapsed = finished
        .get()
        .map_or_else(|| start.elapsed(), |at| at.duration_since(start));
    let mut per_worker = Vec::new();
    for j in joined {
        per_worker.push(j??);
    }
    let mut out = Vec::new();
    command(&mut out, &[b"DEL", stream.as_bytes()]);
    c.send(&out).await?;
    let _ = c.reply().await?;
    let total: u64 = per_worker.iter().sum();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = total as f64 / secs;
    match format {
        Format::Json => output::json(&json!({
            "mode": "redis-queue", "workers": args.workers, "records": args.records, "acked": total,
            "seconds": secs, "records_per_sec": rate, "per_worker": per_worker,
        })),
        Format::Text => {
            println!(
                "redis-queue: {total} records acknowledged in {secs:.2} s: {rate:.0} records/s by {} workers (XREADGROUP COUNT {} + XACK, pipelined)",
                args.workers, args.count
            );
            let counts: Vec<String> = per_worker.iter().map(u64::to_string).collect();
            println!("per worker: {}", counts.join(" "));
        }
    }
    Ok(())
}
