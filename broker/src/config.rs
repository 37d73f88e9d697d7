//! Broker configuration: one struct per TOML section, defaults for a single local node, and
//! `validate()` at boot. `config/broker.toml` is the commented example.
//!
//! Precedence: command-line flag, then `CONVEYOR_*` environment variable, then the config
//! file, then the defaults here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::topic_config::{CleanupPolicy, FlushSetting, TopicDefaults};
use crate::units::{ByteSize, Millis};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub broker: NodeSection,
    pub cluster: ClusterSection,
    pub log: LogSection,
    pub limits: LimitsSection,
    pub cleaner: CleanerSection,
    pub groups: GroupsSection,
    pub shares: SharesSection,
}

/// The share group coordinator (see `docs/queues.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharesSection {
    /// Partitions of `__share_state`, used when it is created (first use).
    pub state_topic_partitions: u32,
    /// Its replication factor; 0 for min(3, brokers).
    pub state_topic_replication_factor: u32,
}

impl Default for SharesSection {
    fn default() -> Self {
        SharesSection {
            state_topic_partitions: 16,
            state_topic_replication_factor: 0,
        }
    }
}

/// The consumer group coordinator (see `docs/consumer-groups.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsSection {
    /// Partitions of `__consumer_offsets`, used when it is created (first use).
    pub offsets_topic_partitions: u32,
    /// Its replication factor; 0 for min(3, brokers).
    pub offsets_topic_replication_factor: u32,
    /// How often members heartbeat (shorter when a member's session timeout is short: at
    /// most a third of it).
    pub heartbeat_interval: Millis,
    /// A member not heard from for this long leaves the group; members may ask for another
    /// value within the bounds below.
    pub session_timeout: Millis,
    pub min_session_timeout: Millis,
    pub max_session_timeout: Millis,
    /// How long a member may take to give up revoked partitions before it is removed, when
    /// it asks for no other value.
    pub rebalance_timeout: Millis,
}

impl Default for GroupsSection {
    fn default() -> Self {
        GroupsSection {
            offsets_topic_partitions: 16,
            offsets_topic_replication_factor: 0,
            heartbeat_interval: Millis(Duration::from_secs(3)),
            session_timeout: Millis(Duration::from_secs(45)),
            min_session_timeout: Millis(Duration::from_secs(1)),
            max_session_timeout: Millis(Duration::from_secs(30 * 60)),
            rebalance_timeout: Millis(Duration::from_secs(5 * 60)),
        }
    }
}

impl GroupsSection {
    /// The coordinator's settings.
    pub fn coordinator_config(&self) -> crate::coordinator::groups::GroupsConfig {
        crate::coordinator::groups::GroupsConfig {
            settings: crate::coordinator::groups::membership::Settings {
                heartbeat_interval: self.heartbeat_interval.0,
                session_timeout: self.session_timeout.0,
                min_session_timeout: self.min_session_timeout.0,
                max_session_timeout: self.max_session_timeout.0,
                rebalance_timeout: self.rebalance_timeout.0,
            },
            partitions: self.offsets_topic_partitions,
            replication_factor: self.offsets_topic_replication_factor,
        }
    }
}

/// The log cleaner, which compacts topics with `cleanup.policy` `compact` (see
/// `docs/compaction.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CleanerSection {
    /// Threads cleaning partitions at once; 0 turns the cleaner off.
    pub threads: usize,
    /// Memory of the key map each cleaner thread builds; a partition with more keys in its
    /// uncompacted part than fit is compacted in several passes.
    pub key_map_bytes: ByteSize,
    /// Bytes per second the cleaner threads read and write together; 0 for no limit.
    pub io_bytes_per_second: ByteSize,
    /// How often the cleaner looks for a partition to compact when it found none.
    pub check_interval: Millis,
}

impl Default for CleanerSection {
    fn default() -> Self {
        CleanerSection {
            threads: 1,
            key_map_bytes: ByteSize(128 << 20),
            io_bytes_per_second: ByteSize(DEFAULT_CLEANER_IO_BYTES_PER_SECOND),
            check_interval: Millis(Duration::from_secs(15)),
        }
    }
}

/// The cleaner's default I/O budget, reads and writes together: about a fifth of a core of
/// cleaning on the machine it was measured on, so that producers at full load keep at least
/// 0.8 of their throughput while it runs (docs/compaction.md).
const DEFAULT_CLEANER_IO_BYTES_PER_SECOND: u64 = 128 << 20;
/// Most cleaner threads.
const MAX_CLEANER_THREADS: usize = 64;
/// The smallest key map: a few thousand keys.
const MIN_KEY_MAP_BYTES: u64 = 64 << 10;

/// The brokers of the cluster. Empty `peers`: a cluster of this node alone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Every broker as `ID=HOST:PORT`, this one included; the address is where the broker's
    /// gRPC port is reached from the other brokers.
    pub peers: Vec<String>,
    /// Where clients reach this broker; defaults to the bound listen address.
    pub advertised_address: Option<String>,
    /// Raft messages queued per peer; when full, more are dropped (Raft resends).
    pub raft_queue_depth: usize,
    /// Join a running cluster instead of founding one: `peers` names brokers already in
    /// it, and this broker waits until `conveyor cluster add-node` adds it. Only read on the
    /// first start; afterwards the broker knows its cluster from its own data.
    pub join: bool,
    /// A snapshot of the controller state is written every this many metadata records
    /// applied, or this many bytes of metadata log, whichever comes first; a start replays
    /// only the log after the newest one.
    pub metadata_snapshot_records: u64,
    pub metadata_snapshot_bytes: ByteSize,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            peers: Vec::new(),
            advertised_address: None,
            raft_queue_depth: 8192,
            join: false,
            metadata_snapshot_records: crate::controller::DEFAULT_SNAPSHOT_EVERY_RECORDS,
            metadata_snapshot_bytes: ByteSize(crate::controller::DEFAULT_SNAPSHOT_EVERY_BYTES),
        }
    }
}

/// Whether `address` looks like `HOST:PORT`.
pub fn is_host_port(address: &str) -> bool {
    address
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// Parses `ID=HOST:PORT` entries (also comma-separated within one entry).
pub fn parse_peers(entries: &[String]) -> anyhow::Result<BTreeMap<u32, String>> {
    let mut peers = BTreeMap::new();
    for item in entries
        .iter()
        .flat_map(|e| e.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (id, address) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("peer '{item}' must look like ID=HOST:PORT"))?;
        let id: u32 = id
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("peer '{item}': '{id}' is not a broker id"))?;
        anyhow::ensure!(id > 0, "peer '{item}': broker ids start at 1");
        let address = address.trim();
        anyhow::ensure!(is_host_port(address), "peer '{item}': '{address}' is not HOST:PORT");
        anyhow::ensure!(
            peers.insert(id, address.to_string()).is_none(),
            "peer id {id} appears twice"
        );
    }
    Ok(peers)
}

/// Most threads the async runtime may be given.
pub const MAX_WORKER_THREADS: usize = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Millis,
    /// How long a broker in a cluster may take, on SIGTERM, to hand leadership of its
    /// partitions to in-sync replicas before it stops; 0 stops without handing over.
    pub drain_timeout: Millis,
    /// Threads of the async runtime (network, partition tasks); 0: one per core, or
    /// `TOKIO_WORKER_THREADS` when that is set.
    pub worker_threads: usize,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9292)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9293)),
            shutdown_timeout: Millis(Duration::from_secs(30)),
            drain_timeout: Millis(Duration::from_secs(10)),
            worker_threads: 0,
        }
    }
}

/// Defaults for topics that do not override them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    pub segment_bytes: ByteSize,
    pub segment_ms: Millis,
    /// Absent: keep forever.
    pub retention_ms: Option<Millis>,
    /// Absent: no size limit.
    pub retention_bytes: Option<ByteSize>,
    /// `always` (fsync before acknowledging, group-committed), `interval` or `os`.
    pub flush: FlushSetting,
    pub flush_interval: Millis,
    pub max_message_bytes: ByteSize,
    pub index_interval_bytes: ByteSize,
    /// How often retention runs.
    pub retention_check_interval: Millis,
    pub default_partitions: u32,
    /// Read rate of the background scrub of sealed segments, per second; 0 disables it.
    pub scrub_bytes_per_second: ByteSize,
    /// Rest between two scrub passes over every local partition.
    pub scrub_interval: Millis,
    /// Topic defaults for compaction (`cleanup.policy`, `min.cleanable.dirty.ratio`,
    /// `min.compaction.lag.ms`, `max.compaction.lag.ms`, `delete.retention.ms`).
    pub cleanup_policy: CleanupPolicy,
    pub min_cleanable_dirty_ratio: f64,
    pub min_compaction_lag: Millis,
    /// Absent: no limit.
    pub max_compaction_lag: Option<Millis>,
    pub delete_retention: Millis,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            segment_bytes: ByteSize(1 << 30),
            segment_ms: Millis(Duration::from_secs(7 * 86_400)),
            retention_ms: Some(Millis(Duration::from_secs(7 * 86_400))),
            retention_bytes: None,
            flush: FlushSetting::Always,
            flush_interval: Millis(Duration::from_secs(1)),
            max_message_bytes: ByteSize(1 << 20),
            index_interval_bytes: ByteSize(4096),
            retention_check_interval: Millis(Duration::from_secs(60)),
            default_partitions: 1,
            scrub_bytes_per_second: ByteSize(16 << 20),
            scrub_interval: Millis(Duration::from_secs(60)),
            cleanup_policy: CleanupPolicy::Delete,
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag: Millis(Duration::ZERO),
            max_compaction_lag: None,
            delete_retention: Millis(Duration::from_secs(86_400)),
        }
    }
}

/// The shortest rest between two scrub passes.
const MIN_SCRUB_INTERVAL: Duration = Duration::from_millis(100);

/// 32 MiB: 32 times the default `max.message.bytes`, room for well-compressed text, and
/// small enough that a batch decoded for a fetch fits in one response.
const DEFAULT_MAX_UNCOMPRESSED_BATCH_BYTES: u64 = 32 << 20;
/// The largest a decoded batch may be and still fit in one fetch response with its framing.
const MAX_UNCOMPRESSED_BATCH_BYTES: u64 = 40 << 20;

/// Queued produce bytes per partition: a hundred and more default-sized producer batches,
/// far more than one owner round needs to keep the disk busy.
const DEFAULT_PARTITION_QUEUE_BYTES: u64 = 32 << 20;
/// Queued produce bytes per broker: one largest request (`max_request_bytes`). With the
/// HTTP/2 windows (see docs/broker.md) it kept the broker under 512 MiB in a flood of 1,000
/// streams of 16 MiB requests; 128 MiB did not (526 and 548 MiB).
const DEFAULT_PRODUCE_QUEUE_BYTES: u64 = 64 << 20;
/// The smallest queued-bytes bound: the budgets count whole KiB.
const MIN_QUEUE_BYTES: u64 = 1 << 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Append requests waiting for one partition; when full, producers wait.
    pub partition_queue_depth: usize,
    /// Bytes of produce requests queued for one partition (validated, waiting to be appended
    /// or answered); when full, a stream waits and a unary request is answered `BUSY`.
    pub partition_queue_bytes: ByteSize,
    /// Bytes of produce requests the broker holds at once, from the moment a message's
    /// length prefix is read until its appends are answered; when full, a stream waits
    /// (HTTP/2 flow control holds its client) and a unary request is answered `BUSY`.
    pub produce_queue_bytes: ByteSize,
    /// Once a produce message holds its share of `produce_queue_bytes`, its body must keep
    /// arriving: the rest within this time plus the rest of its length at
    /// `produce_body_min_rate`, from the admission and from each piece that arrives; otherwise
    /// the request is failed and the share returned, so a client that sends a prefix and then stalls (or
    /// whose host died) cannot hold the budget.
    pub produce_body_timeout: Millis,
    /// The slowest rate, in bytes per second, at which an admitted message's body may arrive
    /// (see `produce_body_timeout`).
    pub produce_body_min_rate: ByteSize,
    /// Largest gRPC message accepted.
    pub max_request_bytes: ByteSize,
    pub max_partitions_per_topic: u32,
    /// Longest `max_wait_ms` a fetch may ask for.
    pub max_fetch_wait: Millis,
    /// Most bytes a compressed batch's records may decompress to. Produce refuses a batch
    /// above it, and a fetch with `decode_records` never decompresses more than it for one
    /// batch; it must fit in one fetch response.
    pub max_uncompressed_batch_bytes: ByteSize,
    /// How long an idempotent producer may stay idle (no write to a partition) before the
    /// partition drops its state; its next batch there is then refused with
    /// UNKNOWN_PRODUCER_ID unless it starts a new producer. Bounds the state's memory.
    pub producer_id_expiration: Millis,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            partition_queue_depth: 1024,
            partition_queue_bytes: ByteSize(DEFAULT_PARTITION_QUEUE_BYTES),
            produce_queue_bytes: ByteSize(DEFAULT_PRODUCE_QUEUE_BYTES),
            produce_body_timeout: Millis(Duration::from_secs(10)),
            produce_body_min_rate: ByteSize(1 << 20),
            max_request_bytes: ByteSize(64 << 20),
            max_partitions_per_topic: 10_000,
            max_fetch_wait: Millis(Duration::from_secs(30)),
            producer_id_expiration: Millis(Duration::from_secs(86_400)),
            max_uncompressed_batch_bytes: ByteSize(DEFAULT_MAX_UNCOMPRESSED_BATCH_BYTES),
        }
    }
}

impl BrokerConfig {
    /// Reads a TOML file; unknown keys are errors that name the key. Not validated yet:
    /// command-line flags and `CONVEYOR_*` variables may still override it, so call
    /// [`validate`](Self::validate) once they are applied.
    pub fn load(path: &Path) -> anyhow::Result<BrokerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Parses and validates a complete configuration.
    pub fn parse(text: &str) -> anyhow::Result<BrokerConfig> {
        let config: BrokerConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.broker.worker_threads <= MAX_WORKER_THREADS,
            "[broker] worker_threads must be at most {MAX_WORKER_THREADS} (0: one per core), got {}",
            self.broker.worker_threads
        );
        self.topic_defaults()
            .validate()
            .map_err(|e| anyhow::anyhow!("[log] {e}"))?;
        anyhow::ensure!(
            self.log.scrub_bytes_per_second.0 == 0 || self.log.scrub_interval.0 >= MIN_SCRUB_INTERVAL,
            "[log] scrub_interval must be at least {} ms while the scrub runs (a pass over partitions with nothing sealed would start again at once, without end); set scrub_bytes_per_second = 0 to disable the scrub",
            MIN_SCRUB_INTERVAL.as_millis()
        );
        anyhow::ensure!(
            self.cleaner.threads <= MAX_CLEANER_THREADS,
            "[cleaner] threads must be at most {MAX_CLEANER_THREADS} (0 turns the cleaner off), got {}",
            self.cleaner.threads
        );
        anyhow::ensure!(
            self.cleaner.key_map_bytes.0 >= MIN_KEY_MAP_BYTES,
            "[cleaner] key_map_bytes must be at least 64KiB, got {}",
            self.cleaner.key_map_bytes.0
        );
        anyhow::ensure!(
            !self.cleaner.check_interval.0.is_zero(),
            "[cleaner] check_interval must be positive"
        );
        let g = &self.groups;
        anyhow::ensure!(
            g.offsets_topic_partitions > 0 && g.offsets_topic_partitions <= self.limits.max_partitions_per_topic,
            "[groups] offsets_topic_partitions must be between 1 and [limits] max_partitions_per_topic, got {}",
            g.offsets_topic_partitions
        );
        anyhow::ensure!(
            !g.heartbeat_interval.0.is_zero()
                && !g.min_session_timeout.0.is_zero()
                && g.min_session_timeout.0 <= g.session_timeout.0
                && g.session_timeout.0 <= g.max_session_timeout.0
                && !g.rebalance_timeout.0.is_zero(),
            "[groups] needs a positive heartbeat_interval and rebalance_timeout, and 0 < min_session_timeout <= session_timeout <= max_session_timeout"
        );
        anyhow::ensure!(
            self.shares.state_topic_partitions > 0
                && self.shares.state_topic_partitions <= self.limits.max_partitions_per_topic,
            "[shares] state_topic_partitions must be between 1 and [limits] max_partitions_per_topic, got {}",
            self.shares.state_topic_partitions
        );
        anyhow::ensure!(
            self.log.default_partitions > 0,
            "[log] default_partitions must be positive"
        );
        anyhow::ensure!(
            self.limits.partition_queue_depth > 0,
            "[limits] partition_queue_depth must be positive"
        );
        anyhow::ensure!(
            self.limits.partition_queue_bytes.0 >= MIN_QUEUE_BYTES
                && self.limits.produce_queue_bytes.0 >= MIN_QUEUE_BYTES,
            "[limits] partition_queue_bytes and produce_queue_bytes must be at least 1KiB"
        );
        anyhow::ensure!(
            self.limits.produce_body_min_rate.0 > 0 && !self.limits.produce_body_timeout.0.is_zero(),
            "[limits] produce_body_timeout and produce_body_min_rate must be positive"
        );
        anyhow::ensure!(
            self.limits.max_request_bytes.0 > self.log.max_message_bytes.0,
            "[limits] max_request_bytes must exceed [log] max_message_bytes"
        );
        // The lower bound is capped at the default so that a config written before this limit
        // existed, with a `max_message_bytes` above what a fetch response can hold decoded,
        // still boots: its large batches are stored and fetched raw (see config/broker.toml).
        let inflated = self.limits.max_uncompressed_batch_bytes.0;
        let at_least = self.log.max_message_bytes.0.min(DEFAULT_MAX_UNCOMPRESSED_BATCH_BYTES);
        anyhow::ensure!(
            inflated >= at_least && inflated <= MAX_UNCOMPRESSED_BATCH_BYTES,
            "[limits] max_uncompressed_batch_bytes must be at least [log] max_message_bytes or {} MiB, whichever is smaller, and at most {} MiB (a decoded batch must fit in one fetch response)",
            DEFAULT_MAX_UNCOMPRESSED_BATCH_BYTES >> 20,
            MAX_UNCOMPRESSED_BATCH_BYTES >> 20
        );
        anyhow::ensure!(
            self.broker.listen != self.broker.metrics_listen || self.broker.listen.port() == 0,
            "[broker] listen and metrics_listen must differ"
        );
        anyhow::ensure!(self.broker.node_id > 0, "[broker] node_id must be at least 1");
        anyhow::ensure!(
            self.cluster.raft_queue_depth > 0,
            "[cluster] raft_queue_depth must be positive"
        );
        let peers = self.peers().map_err(|e| anyhow::anyhow!("[cluster] peers: {e}"))?;
        anyhow::ensure!(
            peers.is_empty() || peers.contains_key(&self.broker.node_id),
            "[cluster] peers must include this broker (node_id {})",
            self.broker.node_id
        );
        Ok(())
    }

    /// Every broker of the cluster by id; empty for a single node.
    pub fn peers(&self) -> anyhow::Result<BTreeMap<u32, String>> {
        parse_peers(&self.cluster.peers)
    }

    pub fn topic_defaults(&self) -> TopicDefaults {
        TopicDefaults::from_section(&self.log).with_uncompressed_limit(self.limits.max_uncompressed_batch_bytes.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_matches_the_defaults() {
        let text = include_str!("../../config/broker.toml");
        let parsed = BrokerConfig::parse(text).expect("config/broker.toml is valid");
        let defaults = BrokerConfig::default();
        assert_eq!(parsed.broker.listen, defaults.broker.listen);
        assert_eq!(parsed.broker.data_dir, defaults.broker.data_dir);
        assert_eq!(parsed.log.segment_bytes, defaults.log.segment_bytes);
        assert_eq!(parsed.log.flush, defaults.log.flush);
        assert_eq!(parsed.log.scrub_bytes_per_second, defaults.log.scrub_bytes_per_second);
        assert_eq!(parsed.log.scrub_interval, defaults.log.scrub_interval);
        assert_eq!(
            parsed.limits.partition_queue_bytes,
            defaults.limits.partition_queue_bytes
        );
        assert_eq!(parsed.limits.produce_queue_bytes, defaults.limits.produce_queue_bytes);
        assert_eq!(parsed.limits.produce_body_timeout, defaults.limits.produce_body_timeout);
        assert_eq!(
            parsed.limits.produce_body_min_rate,
            defaults.limits.produce_body_min_rate
        );
    }

    #[test]
    fn queued_produce_bytes_are_bounded_by_default_and_a_zero_bound_is_refused() {
        let parsed = BrokerConfig::parse("").expect("defaults");
        assert_eq!(parsed.limits.partition_queue_bytes.0, 32 << 20);
        assert_eq!(parsed.limits.produce_queue_bytes.0, 64 << 20);
        for key in ["partition_queue_bytes", "produce_queue_bytes"] {
            let err = BrokerConfig::parse(&format!("[limits]\n{key} = \"0B\"\n")).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
    }

    #[test]
    fn the_cluster_example_parses() {
        let text = include_str!("../../config/cluster-3.toml");
        let parsed = BrokerConfig::parse(text).expect("config/cluster-3.toml is valid");
        let peers = parsed.peers().expect("peers");
        assert_eq!(peers.len(), 3);
        assert!(peers.contains_key(&parsed.broker.node_id));
    }

    #[test]
    fn peers_are_checked() {
        let ok = parse_peers(&["1=127.0.0.1:9292,2=localhost:9392".into(), "3=h:1".into()]).expect("valid");
        assert_eq!(ok.len(), 3);
        for bad in ["1", "x=h:1", "0=h:1", "1=h", "1=h:1,1=h:2"] {
            assert!(parse_peers(&[bad.into()]).is_err(), "{bad}");
        }
        let err =
            BrokerConfig::parse("[broker]\nnode_id = 4\n[cluster]\npeers = [\"1=h:1\"]\n").expect_err("self missing");
        assert!(err.to_string().contains("node_id 4"), "{err}");
    }

    #[test]
    fn the_uncompressed_batch_limit_is_bounded() {
        let parsed = BrokerConfig::parse("").expect("defaults");
        assert_eq!(parsed.limits.max_uncompressed_batch_bytes.0, 32 << 20);
        for bad in ["\"100MiB\"", "\"512KiB\""] {
            let err = BrokerConfig::parse(&format!("[limits]\nmax_uncompressed_batch_bytes = {bad}\n")).expect_err(bad);
            assert!(err.to_string().contains("max_uncompressed_batch_bytes"), "{err}");
        }
    }

    #[test]
    fn a_max_message_bytes_above_the_uncompressed_ceiling_still_boots() {
        let parsed =
            BrokerConfig::parse("[log]\nmax_message_bytes = \"50MiB\"\n[limits]\nmax_request_bytes = \"128MiB\"\n")
                .expect("a config written before the uncompressed limit existed boots");
        assert_eq!(parsed.limits.max_uncompressed_batch_bytes.0, 32 << 20);
        let err = BrokerConfig::parse(
            "[log]\nmax_message_bytes = \"2MiB\"\n[limits]\nmax_uncompressed_batch_bytes = \"1MiB\"\n",
        )
        .expect_err("below max_message_bytes and below the default");
        assert!(err.to_string().contains("whichever is smaller"), "{err}");
    }

    #[test]
    fn a_scrub_interval_too_short_to_rest_is_refused_while_the_scrub_runs() {
        for bad in ["0s", "0ms", "50ms"] {
            let err = BrokerConfig::parse(&format!("[log]\nscrub_interval = \"{bad}\"\n")).expect_err(bad);
            assert!(err.to_string().contains("scrub_interval"), "{err}");
        }
        BrokerConfig::parse("[log]\nscrub_interval = \"200ms\"\n").expect("at the minimum or above");
        BrokerConfig::parse("[log]\nscrub_interval = \"0s\"\nscrub_bytes_per_second = 0\n")
            .expect("no rest is needed when the scrub is disabled");
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = BrokerConfig::parse("[broker]\nlisten_adress = \"127.0.0.1:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("listen_adress"), "{err}");
        let err = BrokerConfig::parse("[log]\nsegment_bytes = \"lots\"\n").expect_err("bad size");
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
