//! Broker configuration: one struct per TOML section, defaults for a single local node, and
//! `validate()` at boot. `config/broker.toml` is the commented example.
//!
//! Precedence: command-line flag, then `CONVEYOR_*` environment variable, then the config
//! file, then the defaults here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::topic_config::{FlushSetting, TopicDefaults};
use crate::units::{ByteSize, Millis};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    pub broker: NodeSection,
    pub log: LogSection,
    pub limits: LimitsSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_timeout: Millis,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9292)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9293)),
            shutdown_timeout: Millis(Duration::from_secs(30)),
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Append requests waiting for one partition; when full, producers wait.
    pub partition_queue_depth: usize,
    /// Largest gRPC message accepted.
    pub max_request_bytes: ByteSize,
    pub max_partitions_per_topic: u32,
    /// Longest `max_wait_ms` a fetch may ask for.
    pub max_fetch_wait: Millis,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            partition_queue_depth: 1024,
            max_request_bytes: ByteSize(64 << 20),
            max_partitions_per_topic: 10_000,
            max_fetch_wait: Millis(Duration::from_secs(30)),
        }
    }
}

impl BrokerConfig {
    /// Reads and validates a TOML file; unknown keys are errors that name the key.
    pub fn load(path: &Path) -> anyhow::Result<BrokerConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<BrokerConfig> {
        let config: BrokerConfig = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        self.topic_defaults()
            .validate()
            .map_err(|e| anyhow::anyhow!("[log] {e}"))?;
        anyhow::ensure!(
            self.log.default_partitions > 0,
            "[log] default_partitions must be positive"
        );
        anyhow::ensure!(
            self.limits.partition_queue_depth > 0,
            "[limits] partition_queue_depth must be positive"
        );
        anyhow::ensure!(
            self.limits.max_request_bytes.0 > self.log.max_message_bytes.0,
            "[limits] max_request_bytes must exceed [log] max_message_bytes"
        );
        anyhow::ensure!(
            self.broker.listen != self.broker.metrics_listen || self.broker.listen.port() == 0,
            "[broker] listen and metrics_listen must differ"
        );
        Ok(())
    }

    pub fn topic_defaults(&self) -> TopicDefaults {
        TopicDefaults::from_section(&self.log)
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
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = BrokerConfig::parse("[broker]\nlisten_adress = \"127.0.0.1:1\"\n").expect_err("typo");
        assert!(err.to_string().contains("listen_adress"), "{err}");
        let err = BrokerConfig::parse("[log]\nsegment_bytes = \"lots\"\n").expect_err("bad size");
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
