//! Prometheus text metrics, served on `metrics_listen` at `/metrics`.
//!
//! Counters and histograms are plain atomics, updated on the hot path without locks.
//! Per-partition gauges (log end offset, high watermark, size) are read from the topic
//! registry when scraped.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::topics::Registry;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The broker's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub produce_requests: Counter,
    pub fetch_requests: Counter,
    pub admin_requests: Counter,
    pub request_errors: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub records_in: Counter,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    pub fsync_latency: Histogram,
    /// Times a partition's Raft node became or stopped being leader.
    pub leader_changes: Counter,
    /// From proposing a request's entries to their commit.
    pub commit_latency: Histogram,
    /// Raft messages dropped because a peer's send queue was full.
    pub raft_messages_dropped: Counter,
    /// Bytes of sealed segments the background scrub verified.
    pub scrub_bytes: Counter,
    /// Corrupt batches the background scrub found.
    pub corrupt_batches: Counter,
    /// Partition replicas stopped by a failure or a panic (each is reopened from its log).
    pub partition_failures: Counter,
    /// Attempts to apply a committed metadata record that failed.
    pub metadata_apply_failures: Counter,
    /// The broker's queued-produce-bytes budget, set when the server starts.
    pub produce_queue: std::sync::OnceLock<Arc<crate::byte_budget::ByteBudget>>,
}

impl Metrics {
    pub fn render(&self, registry: &Registry) -> String {
        let mut out = String::new();
        let counters = [
            (
                "conveyor_produce_requests_total",
                "Produce requests received",
                &self.produce_requests,
            ),
            (
                "conveyor_fetch_requests_total",
                "Fetch requests received",
                &self.fetch_requests,
            ),
            (
                "conveyor_admin_requests_total",
                "Admin requests received",
                &self.admin_requests,
            ),
            (
                "conveyor_request_errors_total",
                "Requests that failed",
                &self.request_errors,
            ),
            ("conveyor_bytes_in_total", "Record batch bytes appended", &self.bytes_in),
            (
                "conveyor_bytes_out_total",
                "Record batch bytes served by fetches",
                &self.bytes_out,
            ),
            ("conveyor_records_in_total", "Records appended", &self.records_in),
            (
                "conveyor_raft_leader_changes_total",
                "Raft leadership changes over all partitions",
                &self.leader_changes,
            ),
            (
                "conveyor_raft_messages_dropped_total",
                "Raft messages dropped because a peer's send queue was full",
                &self.raft_messages_dropped,
            ),
            (
                "conveyor_partition_failures_total",
                "Partition replicas stopped by a storage failure or a panic (each is reopened from its log)",
                &self.partition_failures,
            ),
            (
                "conveyor_raft_messages_dropped_inbound_total",
                "Raft messages from peers dropped because their group was busy or not open here",
                &registry.transport().dropped_inbound,
            ),
            (
                "conveyor_scrub_bytes_total",
                "Bytes of sealed segments verified by the background scrub",
                &self.scrub_bytes,
            ),
            (
                "conveyor_corrupt_batches_total",
                "Corrupt batches found at rest by the background scrub",
                &self.corrupt_batches,
            ),
            (
                "conveyor_metadata_apply_failures_total",
                "Attempts to apply a committed cluster metadata record that failed (each is retried)",
                &self.metadata_apply_failures,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", c.get());
        }
        let histograms = [
            (
                "conveyor_produce_latency_seconds",
                "Produce request latency",
                &self.produce_latency,
            ),
            (
                "conveyor_fetch_latency_seconds",
                "Fetch request latency (long-poll wait included)",
                &self.fetch_latency,
            ),
            (
                "conveyor_raft_commit_latency_seconds",
                "Time from proposing an acks=all append to its Raft commit",
                &self.commit_latency,
            ),
            (
                "conveyor_fsync_latency_seconds",
                "Time to write, flush and commit one append round (Raft Ready processing)",
                &self.fsync_latency,
            ),
        ];
        for (name, help, h) in histograms {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            h.render(&mut out, name);
        }
        let gauges = [
            ("conveyor_log_start_offset", "First offset in the partition log"),
            ("conveyor_log_end_offset", "Offset the next append gets"),
            (
                "conveyor_high_watermark",
                "Offset below which records are visible to consumers",
            ),
            ("conveyor_log_size_bytes", "Bytes on disk for the partition"),
        ];
        let partitions = registry.all_partitions();
        for (i, (name, help)) in gauges.iter().enumerate() {
            gauge_header(&mut out, name, help);
            for p in &partitions {
                let value = match i {
                    0 => p.log().log_start_offset(),
                    1 => p.log().log_end_offset(),
                    2 => p.high_watermark(),
                    _ => p.log().size_bytes(),
                };
                let _ = writeln!(out, "{name}{{topic=\"{}\",partition=\"{}\"}} {value}", p.topic, p.index);
            }
        }
        let name = "conveyor_replication_lag_offsets";
        gauge_header(
            &mut out,
            name,
            "Offsets a follower's log is behind its leader's (reported by the leader)",
        );
        for p in &partitions {
            for f in p.status().followers {
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",partition=\"{}\",follower=\"{}\"}} {}",
                    p.topic, p.index, f.id, f.lag
                );
            }
        }
        if let Some(budget) = self.produce_queue.get() {
            let name = "conveyor_produce_queued_bytes";
            gauge_header(
                &mut out,
                name,
                "Bytes of produce requests the broker holds: admitted from their length prefix, not answered yet",
            );
            let _ = writeln!(out, "{name} {}", budget.held());
        }
        let name = "conveyor_partitions_stopped";
        gauge_header(
            &mut out,
            name,
            "Partition replicas on this broker stopped after a failure and waiting to be reopened",
        );
        let unopened: usize = registry.list().iter().map(|t| t.unopened.len()).sum();
        let stopped = partitions.iter().filter(|p| p.status().failure.is_some()).count() + unopened;
        let _ = writeln!(out, "{name} {stopped}");
        let name = "conveyor_replicas_recovering";
        gauge_header(
            &mut out,
            name,
            "Partition replicas on this broker recovering entries they lost: they vote only for a log that holds them",
        );
        let recovering = partitions.iter().filter(|p| p.is_recovering()).count();
        let _ = writeln!(out, "{name} {recovering}");
        let name = "conveyor_raft_send_queue_depth";
        gauge_header(&mut out, name, "Raft messages waiting to be sent to a peer");
        let peers = registry.transport().peer_states();
        for peer in peers.iter().filter(|s| s.id != registry.transport().node_id()) {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", peer.id, peer.queue_depth);
        }
        let name = "conveyor_raft_messages_dropped_to_peer_total";
        let _ = writeln!(
            out,
            "# HELP {name} Raft messages to a peer dropped because its send queue was full\n# TYPE {name} counter"
        );
        for peer in peers.iter().filter(|s| s.id != registry.transport().node_id()) {
            let _ = writeln!(out, "{name}{{peer=\"{}\"}} {}", peer.id, peer.dropped);
        }
        let name = "conveyor_metadata_apply_failing";
        gauge_header(
            &mut out,
            name,
            "1 while this broker cannot apply a committed cluster metadata record (it retries)",
        );
        let _ = writeln!(out, "{name} {}", u8::from(registry.apply_failure().is_some()));
        let name = "conveyor_metadata_applied_offset";
        gauge_header(
            &mut out,
            name,
            "Offset after the last cluster metadata record this broker applied",
        );
        let _ = writeln!(out, "{name} {}", registry.applied_offset());
        let name = "conveyor_broker_alive";
        gauge_header(&mut out, name, "1 while this broker hears from the peer");
        for peer in &peers {
            let _ = writeln!(out, "{name}{{broker=\"{}\"}} {}", peer.id, u8::from(peer.alive));
        }
        out
    }
}

fn gauge_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// Serves `GET /metrics` until `shutdown` resolves. A deliberately small HTTP/1.0 responder:
/// one request per connection, which is all a Prometheus scrape needs.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (metrics, registry) = (Arc::clone(&metrics), Arc::clone(&registry));
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /metrics") {
                ("200 OK", metrics.render(&registry))
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let response = format!(
                "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
