//! Metrics in the OpenMetrics text format, served on `metrics_listen` at `/metrics`
//! ([`crate::metrics_endpoint`]).
//!
//! The Prometheus project's own client (`prometheus-client`) keeps and encodes them; hyper
//! (already in the tree through tonic) serves them. Counters and histograms are updated on
//! the hot path: counters are atomics, and per-topic counters are handles a partition takes
//! once when it opens, so a request never looks a topic up to count. Per-partition gauges
//! (offsets, sizes, replication state) are read from the topic registry when scraped.
//!
//! Counter names are registered without `_total`: OpenMetrics adds that suffix to the sample
//! (`conveyor_produce_requests` is scraped as `conveyor_produce_requests_total`).

use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::{ErrorCode, ErrorDetail};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prost::Message as _;

use crate::controller::Registry;

/// A monotonic counter (an atomic; cloning shares it).
#[derive(Debug, Clone, Default)]
pub struct Counter(prometheus_client::metrics::counter::Counter);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.inc_by(n);
    }
    pub fn get(&self) -> u64 {
        self.0.get()
    }
    pub(crate) fn inner(&self) -> &prometheus_client::metrics::counter::Counter {
        &self.0
    }
}

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// A latency histogram in seconds.
#[derive(Debug, Clone)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(BUCKETS))
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

type TopicLabel = [(&'static str, String); 1];
type CodeLabel = [(&'static str, &'static str); 1];

/// The byte counters of one topic, taken once by each of its partitions.
#[derive(Debug, Clone, Default)]
pub struct TopicTraffic {
    /// Record batch bytes appended by the leader.
    pub bytes_in: Counter,
    /// Record batch bytes served by fetches.
    pub bytes_out: Counter,
}

/// The broker's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub produce_requests: Counter,
    pub fetch_requests: Counter,
    /// Share groups' fetches (`Shares/Fetch`) and acknowledgements (`Shares/Acknowledge`).
    pub share_fetch_requests: Counter,
    pub share_acknowledge_requests: Counter,
    pub admin_requests: Counter,
    /// Failed requests by their `ErrorCode`.
    request_errors: Family<CodeLabel, prometheus_client::metrics::counter::Counter>,
    bytes_in: Family<TopicLabel, prometheus_client::metrics::counter::Counter>,
    bytes_out: Family<TopicLabel, prometheus_client::metrics::counter::Counter>,
    pub records_in: Counter,
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    /// One fsync round of a partition log's segment files (see `conveyor_storage::SyncObserver`).
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
    /// Fetch rounds read from the page cache on the reactor (no blocking-pool hop).
    pub fetch_reads_in_place: Counter,
    /// Raft Readies handled on their partition's task (page-cache writes only).
    pub readies_in_memory: Counter,
    /// Of those, the ones slower than `owner::in_memory::SLOW` (the disk made them wait).
    pub readies_in_memory_slow: Counter,
    /// Ready jobs handed to the blocking pool (fsyncs, rolls, snapshots, elections); a job
    /// handles every Ready its node has by then.
    pub readies_blocking: Counter,
    /// Idempotent producers whose state partition replicas on this broker keep.
    pub producer_ids_active: prometheus_client::metrics::gauge::Gauge,
    /// Idempotent batches answered as duplicates of batches written before.
    pub producer_duplicates: Counter,
    /// Idempotent batches refused for a sequence gap.
    pub producer_out_of_order: Counter,
    /// Idempotent batches refused because a newer epoch of their producer wrote.
    pub producer_fenced: Counter,
    /// The log cleaner's counters.
    pub cleaner: crate::cleaner::CleanerMetrics,
    /// The consumer group coordinator, set when the server starts.
    pub groups: std::sync::OnceLock<Arc<crate::coordinator::groups::GroupCoordinator>>,
    pub shares: std::sync::OnceLock<Arc<crate::coordinator::shares::ShareCoordinator>>,
    /// The broker's queued-produce-bytes budget, set when the server starts.
    pub produce_queue: std::sync::OnceLock<Arc<crate::byte_budget::ByteBudget>>,
}

impl Metrics {
    /// The byte counters of `topic`: a partition takes them once, when it opens.
    pub fn topic_traffic(&self, topic: &str) -> TopicTraffic {
        let label = [("topic", topic.to_string())];
        TopicTraffic {
            bytes_in: Counter(self.bytes_in.get_or_create_owned(&label)),
            bytes_out: Counter(self.bytes_out.get_or_create_owned(&label)),
        }
    }

    /// Drops a deleted topic's series (its partitions' handles count on, unseen).
    pub fn forget_topic(&self, topic: &str) {
        let label = [("topic", topic.to_string())];
        self.bytes_in.remove(&label);
        self.bytes_out.remove(&label);
    }

    /// Counts a failed request under its error code.
    pub fn request_failed(&self, code: ErrorCode) {
        self.request_errors.get_or_create(&[("code", code.as_str_name())]).inc();
    }

    /// Counts a failed request from the status sent for it: the code of its
    /// `conveyor.v1.ErrorDetail`, or `ERROR_CODE_UNSPECIFIED` without one.
    pub fn request_failed_status(&self, status: &tonic::Status) {
        let code = ErrorDetail::decode(status.details())
            .ok()
            .and_then(|d| ErrorCode::try_from(d.code).ok())
            .unwrap_or(ErrorCode::Unspecified);
        self.request_failed(code);
    }

    /// Failed requests counted under `code` so far.
    pub fn request_errors(&self, code: ErrorCode) -> u64 {
        self.request_errors
            .get(&[("code", code.as_str_name())])
            .map_or(0, |c| c.get())
    }

    /// Everything to encode on a scrape: these metrics and `registry`'s view.
    pub(crate) fn registry(self: &Arc<Self>, registry: Arc<Registry>) -> prometheus_client::registry::Registry {
        let mut r = prometheus_client::registry::Registry::default();
        let counters = [
            (
                "conveyor_produce_requests",
                "Produce requests received",
                &self.produce_requests,
            ),
            (
                "conveyor_fetch_requests",
                "Fetch requests received",
                &self.fetch_requests,
            ),
            (
                "conveyor_share_fetch_requests",
                "Share-group fetch requests received",
                &self.share_fetch_requests,
            ),
            (
                "conveyor_share_acknowledge_requests",
                "Share-group acknowledge requests received",
                &self.share_acknowledge_requests,
            ),
            (
                "conveyor_admin_requests",
                "Admin requests received",
                &self.admin_requests,
            ),
            ("conveyor_records_in", "Records appended", &self.records_in),
            (
                "conveyor_raft_leader_changes",
                "Raft leadership changes over all partitions",
                &self.leader_changes,
            ),
            (
                "conveyor_raft_messages_dropped",
                "Raft messages dropped because a peer's send queue was full",
                &self.raft_messages_dropped,
            ),
            (
                "conveyor_partition_failures",
                "Partition replicas stopped by a storage failure or a panic (each is reopened from its log)",
                &self.partition_failures,
            ),
            (
                "conveyor_raft_messages_dropped_inbound",
                "Raft messages from peers dropped because their group was busy or not open here",
                &registry.transport().dropped_inbound,
            ),
            (
                "conveyor_fetch_reads_in_place",
                "Fetch rounds whose tail reads came from the page cache without a blocking-pool hop",
                &self.fetch_reads_in_place,
            ),
            (
                "conveyor_raft_readies_in_memory",
                "Raft Readies handled on their partition's task: writes to the page cache only",
                &self.readies_in_memory,
            ),
            (
                "conveyor_raft_readies_in_memory_slow",
                "Raft Readies handled on their partition's task that waited on the disk (each sends all Readies to the blocking pool for 10 s)",
                &self.readies_in_memory_slow,
            ),
            (
                "conveyor_raft_ready_jobs_blocking",
                "Raft Ready jobs handed to the blocking pool (fsyncs, segment rolls, snapshots, elections); each handles every Ready its partition has by then",
                &self.readies_blocking,
            ),
            (
                "conveyor_scrub_bytes",
                "Bytes of sealed segments verified by the background scrub",
                &self.scrub_bytes,
            ),
            (
                "conveyor_corrupt_batches",
                "Corrupt batches found at rest by the background scrub",
                &self.corrupt_batches,
            ),
            (
                "conveyor_metadata_apply_failures",
                "Attempts to apply a committed cluster metadata record that failed (each is retried)",
                &self.metadata_apply_failures,
            ),
            (
                "conveyor_producer_duplicates",
                "Idempotent batches answered as duplicates of batches written before (nothing written)",
                &self.producer_duplicates,
            ),
            (
                "conveyor_producer_out_of_order",
                "Idempotent batches refused with OUT_OF_ORDER_SEQUENCE",
                &self.producer_out_of_order,
            ),
            (
                "conveyor_producer_fenced",
                "Idempotent batches refused with PRODUCER_FENCED",
                &self.producer_fenced,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.0.clone());
        }
        r.register(
            "conveyor_producer_ids_active",
            "Idempotent producers whose state this broker's partition replicas keep (one per producer and partition)",
            self.producer_ids_active.clone(),
        );
        r.register(
            "conveyor_request_errors",
            "Requests that failed, by the ErrorCode sent",
            self.request_errors.clone(),
        );
        r.register(
            "conveyor_bytes_in",
            "Record batch bytes appended, by topic (counted by the leader)",
            self.bytes_in.clone(),
        );
        r.register(
            "conveyor_bytes_out",
            "Record batch bytes served by fetches, by topic",
            self.bytes_out.clone(),
        );
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
                "Time of one fsync round of a partition log's segment files (the fsync calls only)",
                &self.fsync_latency,
            ),
        ];
        for (name, help, h) in histograms {
            r.register(name, help, h.0.clone());
        }
        self.cleaner.register(&mut r);
        if let Some(groups) = self.groups.get() {
            crate::coordinator::groups::gauges::register(groups, &mut r);
        }
        if let Some(shares) = self.shares.get() {
            crate::coordinator::shares::gauges::register(shares, &mut r);
        }
        r.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        r.register_collector(Box::new(RegistryView {
            registry,
            produce_queue: self.produce_queue.get().cloned(),
        }));
        r
    }
}

/// The gauges read from the topic registry on each scrape.
#[derive(Debug)]
struct RegistryView {
    registry: Arc<Registry>,
    /// The broker's queued-produce-bytes budget (set before the endpoint serves).
    produce_queue: Option<Arc<crate::byte_budget::ByteBudget>>,
}

type Labels = Vec<(&'static str, String)>;

fn partition_labels(topic: &str, index: i32) -> Labels {
    vec![("topic", topic.to_string()), ("partition", index.to_string())]
}

/// One metric with a series per label set.
fn family<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One metric with a single unlabelled series.
fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: V,
) -> std::fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for RegistryView {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let registry = &self.registry;
        let e = &mut encoder;
        let partitions = registry.all_partitions();
        let per_partition = |read: &dyn Fn(&crate::replica::partition::Partition) -> u64| -> Vec<(Labels, u64)> {
            partitions
                .iter()
                .map(|p| (partition_labels(&p.topic, p.index), read(p)))
                .collect()
        };
        family(
            e,
            "conveyor_log_start_offset",
            "First offset in the partition log",
            per_partition(&|p| p.log().log_start_offset()),
        )?;
        family(
            e,
            "conveyor_log_end_offset",
            "Offset the next append gets",
            per_partition(&|p| p.log().log_end_offset()),
        )?;
        family(
            e,
            "conveyor_high_watermark",
            "Offset below which records are visible to consumers",
            per_partition(&|p| p.high_watermark()),
        )?;
        family(
            e,
            "conveyor_log_size_bytes",
            "Bytes on disk for the partition",
            per_partition(&|p| p.log().size_bytes()),
        )?;
        family(
            e,
            "conveyor_cleaner_dirty_ratio",
            "Share of a compacted partition's cleanable bytes not compacted yet, as the cleaner last saw it",
            partitions.iter().filter_map(|p| {
                let stats = p.log().last_dirty_stats()?;
                Some((partition_labels(&p.topic, p.index), stats.dirty_ratio()))
            }),
        )?;
        let statuses: Vec<_> = partitions.iter().map(|p| (p, p.status())).collect();
        family(
            e,
            "conveyor_replication_lag_offsets",
            "Offsets a follower's log is behind its leader's (reported by the leader)",
            statuses.iter().flat_map(|(p, s)| {
                s.followers.iter().map(|f| {
                    let mut labels = partition_labels(&p.topic, p.index);
                    labels.push(("follower", f.id.to_string()));
                    (labels, f.lag)
                })
            }),
        )?;
        let health = PartitionHealth::of(registry);
        gauge(
            e,
            "conveyor_under_replicated_partitions",
            "Partitions this broker leads whose in-sync replicas are fewer than their replica set (reported by leaders: sum over brokers)",
            health.under_replicated,
        )?;
        gauge(
            e,
            "conveyor_offline_partitions",
            "Partitions with no leader, as the controller sees them (0 on other brokers)",
            health.offline,
        )?;
        gauge(
            e,
            "conveyor_controller",
            "1 on the broker that leads the cluster metadata group (the controller)",
            u8::from(health.is_controller) as u64,
        )?;
        let unopened: usize = registry.list().iter().map(|t| t.unopened.len()).sum();
        let stopped = statuses.iter().filter(|(_, s)| s.failure.is_some()).count() + unopened;
        if let Some(budget) = &self.produce_queue {
            gauge(
                e,
                "conveyor_produce_queued_bytes",
                "Bytes of produce requests the broker holds: admitted from their length prefix, not answered yet",
                budget.held() as u64,
            )?;
        }
        gauge(
            e,
            "conveyor_partitions_stopped",
            "Partition replicas on this broker stopped after a failure and waiting to be reopened",
            stopped as u64,
        )?;
        gauge(
            e,
            "conveyor_replicas_recovering",
            "Partition replicas on this broker recovering entries they lost: they vote only for a log that holds them",
            partitions.iter().filter(|p| p.is_recovering()).count() as u64,
        )?;
        let me = registry.transport().node_id();
        let peers = registry.transport().peer_states();
        let others = || peers.iter().filter(|s| s.id != me);
        family(
            e,
            "conveyor_raft_send_queue_depth",
            "Raft messages waiting to be sent to a peer",
            others().map(|s| (vec![("peer", s.id.to_string())], s.queue_depth as u64)),
        )?;
        let mut dropped = e.encode_descriptor(
            "conveyor_raft_messages_dropped_to_peer",
            "Raft messages to a peer dropped because its send queue was full",
            None,
            MetricType::Counter,
        )?;
        for s in others() {
            let labels: Labels = vec![("peer", s.id.to_string())];
            ConstCounter::new(s.dropped).encode(dropped.encode_family(&labels)?)?;
        }
        gauge(
            e,
            "conveyor_metadata_apply_failing",
            "1 while this broker cannot apply a committed cluster metadata record (it retries)",
            u64::from(registry.apply_failure().is_some()),
        )?;
        gauge(
            e,
            "conveyor_metadata_applied_offset",
            "Offset after the last cluster metadata record this broker applied",
            registry.applied_offset(),
        )?;
        family(
            e,
            "conveyor_broker_alive",
            "1 while this broker hears from the peer",
            peers
                .iter()
                .map(|s| (vec![("broker", s.id.to_string())], u64::from(s.alive))),
        )
    }
}

/// The partition health gauges of one scrape.
#[derive(Debug, Default, PartialEq, Eq)]
struct PartitionHealth {
    under_replicated: u64,
    offline: u64,
    is_controller: bool,
}

impl PartitionHealth {
    /// Under-replicated partitions are counted by their leader, which alone knows which
    /// followers are in sync. Offline ones are counted by the controller alone, so one
    /// broker gives the cluster's figure: from its own replica's view where it holds one,
    /// else from liveness (no leader can be elected or kept without a majority of live
    /// replicas).
    fn of(registry: &Registry) -> Self {
        let transport = registry.transport();
        let me = transport.node_id();
        let alive: std::collections::HashSet<u32> = transport
            .peer_states()
            .iter()
            .filter(|s| s.alive)
            .map(|s| s.id)
            .chain([me])
            .collect();
        let is_controller = registry.metadata_partition().is_leader();
        let mut health = PartitionHealth {
            is_controller,
            ..PartitionHealth::default()
        };
        for topic in registry.list() {
            for (index, replicas) in topic.assignments.iter().enumerate() {
                let status = i32::try_from(index)
                    .ok()
                    .and_then(|i| topic.local.get(&i))
                    .map(|p| p.status());
                if status.as_ref().is_some_and(|s| under_replicated(s, me, replicas.len())) {
                    health.under_replicated += 1;
                }
                let live = replicas.iter().filter(|r| alive.contains(r)).count();
                if is_controller && offline(status.as_ref(), replicas.len(), live) {
                    health.offline += 1;
                }
            }
        }
        health
    }
}

/// Whether this broker (`me`) leads the partition and sees fewer replicas in sync than its
/// replica set holds.
fn under_replicated(status: &crate::replica::status::GroupStatus, me: u32, replicas: usize) -> bool {
    status.leader == me && status.in_sync().len() < replicas
}

/// Whether a partition has no leader: its replica here knows none, or, without a replica
/// here, fewer than a majority of its replicas are alive.
fn offline(local: Option<&crate::replica::status::GroupStatus>, replicas: usize, live: usize) -> bool {
    match local {
        Some(status) => status.leader == 0,
        None => live < replicas / 2 + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_failed_are_counted_by_their_error_code() {
        let metrics = Metrics::default();
        metrics.request_failed(ErrorCode::NotLeader);
        let status: tonic::Status = crate::error::BrokerError::UnknownTopic("t".into()).into();
        metrics.request_failed_status(&status);
        metrics.request_failed_status(&tonic::Status::internal("no detail"));
        assert_eq!(metrics.request_errors(ErrorCode::NotLeader), 1);
        assert_eq!(metrics.request_errors(ErrorCode::UnknownTopic), 1);
        assert_eq!(metrics.request_errors(ErrorCode::Unspecified), 1);
        assert_eq!(metrics.request_errors(ErrorCode::Storage), 0);
    }

    #[test]
    fn a_leader_missing_an_in_sync_follower_is_under_replicated() {
        use crate::replica::status::{FollowerState, GroupStatus};
        let follower = |id, in_sync| FollowerState {
            id,
            lag: 0,
            reached: 0,
            in_sync,
        };
        let status = GroupStatus {
            leader: 1,
            followers: vec![follower(2, true), follower(3, false)],
            ..GroupStatus::default()
        };
        assert!(under_replicated(&status, 1, 3), "one of three replicas is behind");
        assert!(!under_replicated(&status, 2, 3), "only the leader reports it");
        let all_in_sync = GroupStatus {
            followers: vec![follower(2, true), follower(3, true)],
            ..status
        };
        assert!(!under_replicated(&all_in_sync, 1, 3));
    }

    #[test]
    fn a_partition_without_a_known_leader_or_a_live_majority_is_offline() {
        use crate::replica::status::GroupStatus;
        let led = GroupStatus {
            leader: 2,
            ..GroupStatus::default()
        };
        assert!(!offline(Some(&led), 3, 3));
        assert!(offline(Some(&GroupStatus::default()), 3, 3), "no leader known here");
        assert!(!offline(None, 3, 2), "two of three replicas alive can keep a leader");
        assert!(offline(None, 3, 1), "one of three cannot");
        assert!(offline(None, 1, 0));
    }

    #[test]
    fn a_topic_takes_the_same_counters_each_time_until_it_is_forgotten() {
        let metrics = Metrics::default();
        metrics.topic_traffic("t").bytes_in.add(5);
        assert_eq!(metrics.topic_traffic("t").bytes_in.get(), 5);
        metrics.forget_topic("t");
        assert_eq!(
            metrics.topic_traffic("t").bytes_in.get(),
            0,
            "a recreated topic starts again"
        );
    }
}
