//! Per-topic configuration: Kafka-style keys (`retention.ms`, `segment.bytes`, ...) over the
//! broker's `[log]` defaults, validated as a whole before anything is stored.

use std::collections::BTreeMap;
use std::time::Duration;

use conveyor_storage::{CompactionPolicy, FlushPolicy, LogConfig};
use serde::Deserialize;

use crate::config::LogSection;

/// The flush policy as written in config files and topic configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushSetting {
    Always,
    Interval,
    Os,
}

impl std::str::FromStr for FlushSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FlushSetting::Always),
            "interval" => Ok(FlushSetting::Interval),
            "os" => Ok(FlushSetting::Os),
            other => Err(format!("'{other}' is not a flush policy (always, interval, os)")),
        }
    }
}

impl FlushSetting {
    fn as_str(self) -> &'static str {
        match self {
            FlushSetting::Always => "always",
            FlushSetting::Interval => "interval",
            FlushSetting::Os => "os",
        }
    }
}

/// What happens to old data: deleted by retention, compacted to the latest record per key,
/// or both (`cleanup.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CleanupPolicy {
    #[serde(rename = "delete")]
    Delete,
    #[serde(rename = "compact")]
    Compact,
    #[serde(rename = "compact,delete", alias = "delete,compact")]
    CompactDelete,
}

impl std::str::FromStr for CleanupPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts: Vec<&str> = s.split(',').map(str::trim).collect();
        parts.sort_unstable();
        parts.dedup();
        match parts.as_slice() {
            ["delete"] => Ok(CleanupPolicy::Delete),
            ["compact"] => Ok(CleanupPolicy::Compact),
            ["compact", "delete"] => Ok(CleanupPolicy::CompactDelete),
            _ => Err(format!(
                "'{s}' is not a cleanup policy (delete, compact, or compact,delete)"
            )),
        }
    }
}

impl CleanupPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }

    pub fn compacts(self) -> bool {
        self != CleanupPolicy::Delete
    }

    pub fn deletes(self) -> bool {
        self != CleanupPolicy::Compact
    }
}

/// Every topic config key the broker understands, with a one-line meaning.
pub const KEYS: &[(&str, &str)] = &[
    (
        "retention.ms",
        "delete segments whose newest record is older than this; -1 keeps forever",
    ),
    (
        "retention.bytes",
        "delete oldest segments while the partition is larger; -1 for no limit",
    ),
    ("segment.bytes", "roll the active segment at this size"),
    ("segment.ms", "roll the active segment at this age"),
    ("flush.policy", "always (fsync before ack), interval, or os"),
    ("flush.ms", "fsync interval for flush.policy=interval"),
    ("max.message.bytes", "largest record batch accepted"),
    ("index.interval.bytes", "bytes between sparse index entries"),
    (
        "cleanup.policy",
        "delete (retention), compact (latest record per key), or compact,delete",
    ),
    (
        "min.cleanable.dirty.ratio",
        "compact once uncompacted bytes are this share of the log (0 to 1)",
    ),
    ("min.compaction.lag.ms", "a record stays uncompacted at least this long"),
    (
        "max.compaction.lag.ms",
        "compact a record at the latest this long after it was written, whatever the dirty ratio; -1 for no limit",
    ),
    (
        "delete.retention.ms",
        "how long a tombstone (null value) stays after compaction first reached it",
    ),
];

/// The effective settings of a topic: defaults with its overrides applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicDefaults {
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub segment_ms: u64,
    pub flush: FlushSetting,
    pub flush_ms: u64,
    pub max_message_bytes: u64,
    pub index_interval_bytes: u64,
    pub cleanup_policy: CleanupPolicy,
    pub min_cleanable_dirty_ratio: f64,
    pub min_compaction_lag_ms: u64,
    pub max_compaction_lag_ms: Option<u64>,
    pub delete_retention_ms: u64,
    /// `[limits] max_uncompressed_batch_bytes`: the most a new `max.message.bytes` override
    /// may be (see [`TopicDefaults::accept_overrides`]). `None`: no such check.
    pub uncompressed_limit: Option<u64>,
}

impl TopicDefaults {
    pub fn from_section(log: &LogSection) -> TopicDefaults {
        TopicDefaults {
            retention_ms: log.retention_ms.map(|m| m.0.as_millis() as u64),
            retention_bytes: log.retention_bytes.map(|b| b.0),
            segment_bytes: log.segment_bytes.0,
            segment_ms: log.segment_ms.0.as_millis() as u64,
            flush: log.flush,
            flush_ms: log.flush_interval.0.as_millis() as u64,
            max_message_bytes: log.max_message_bytes.0,
            index_interval_bytes: log.index_interval_bytes.0,
            cleanup_policy: log.cleanup_policy,
            min_cleanable_dirty_ratio: log.min_cleanable_dirty_ratio,
            min_compaction_lag_ms: log.min_compaction_lag.0.as_millis() as u64,
            max_compaction_lag_ms: log.max_compaction_lag.map(|m| m.0.as_millis() as u64),
            delete_retention_ms: log.delete_retention.0.as_millis() as u64,
            uncompressed_limit: None,
        }
    }

    /// These defaults with new overrides refused above `limit` (see [`Self::accept_overrides`]).
    pub fn with_uncompressed_limit(mut self, limit: u64) -> TopicDefaults {
        self.uncompressed_limit = Some(limit);
        self
    }

    /// Checks overrides a client asks for (topic create and alter): [`Self::with_overrides`],
    /// and a `max.message.bytes` no larger than the broker's uncompressed batch limit, since a
    /// stored batch above it can be neither accepted compressed nor decoded for a fetch.
    /// Committed overrides are applied with `with_overrides` alone, so topics created before
    /// this check still open.
    pub fn accept_overrides(&self, overrides: &BTreeMap<String, String>) -> Result<TopicDefaults, String> {
        let out = self.with_overrides(overrides)?;
        if let (Some(limit), Some(value)) = (self.uncompressed_limit, overrides.get("max.message.bytes"))
            && out.max_message_bytes > limit
        {
            return Err(format!(
                "max.message.bytes={value}: above this broker's [limits] max_uncompressed_batch_bytes ({limit} bytes); a larger batch could not be decoded for fetches"
            ));
        }
        Ok(out)
    }

    /// Applies `overrides`; errors name the key and say what is accepted.
    pub fn with_overrides(&self, overrides: &BTreeMap<String, String>) -> Result<TopicDefaults, String> {
        let mut out = self.clone();
        for (key, value) in overrides {
            let int = || -> Result<i64, String> {
                value
                    .trim()
                    .parse::<i64>()
                    .map_err(|_| format!("{key}={value}: expected an integer"))
            };
            let positive = || -> Result<u64, String> {
                match int()? {
                    n if n > 0 => Ok(n as u64),
                    _ => Err(format!("{key}={value}: must be positive")),
                }
            };
            let non_negative = || -> Result<u64, String> {
                match int()? {
                    n if n >= 0 => Ok(n as u64),
                    _ => Err(format!("{key}={value}: must not be negative")),
                }
            };
            let optional = || -> Result<Option<u64>, String> {
                match int()? {
                    -1 => Ok(None),
                    n if n > 0 => Ok(Some(n as u64)),
                    _ => Err(format!("{key}={value}: must be positive, or -1 for no limit")),
                }
            };
            match key.as_str() {
                "retention.ms" => out.retention_ms = optional()?,
                "retention.bytes" => out.retention_bytes = optional()?,
                "segment.bytes" => out.segment_bytes = positive()?,
                "segment.ms" => out.segment_ms = positive()?,
                "flush.policy" => out.flush = value.parse().map_err(|e| format!("flush.policy: {e}"))?,
                "flush.ms" => out.flush_ms = positive()?,
                "max.message.bytes" => out.max_message_bytes = positive()?,
                "index.interval.bytes" => out.index_interval_bytes = positive()?,
                "cleanup.policy" => {
                    out.cleanup_policy = value.parse().map_err(|e| format!("cleanup.policy: {e}"))?;
                }
                "min.cleanable.dirty.ratio" => {
                    out.min_cleanable_dirty_ratio = value
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|r| (0.0..=1.0).contains(r))
                        .ok_or_else(|| format!("{key}={value}: expected a number from 0 to 1"))?;
                }
                "min.compaction.lag.ms" => out.min_compaction_lag_ms = non_negative()?,
                "max.compaction.lag.ms" => out.max_compaction_lag_ms = optional()?,
                "delete.retention.ms" => out.delete_retention_ms = non_negative()?,
                other => {
                    let known: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                    return Err(format!(
                        "unknown topic config key '{other}' (known: {})",
                        known.join(", ")
                    ));
                }
            }
        }
        out.validate()?;
        Ok(out)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.min_cleanable_dirty_ratio) {
            return Err(format!(
                "min_cleanable_dirty_ratio must be from 0 to 1, got {}",
                self.min_cleanable_dirty_ratio
            ));
        }
        if self.max_compaction_lag_ms == Some(0) {
            return Err("max_compaction_lag must be positive, or absent for no limit".into());
        }
        if let Some(max) = self.max_compaction_lag_ms
            && max < self.min_compaction_lag_ms
        {
            return Err(format!(
                "max.compaction.lag.ms ({max}) is below min.compaction.lag.ms ({})",
                self.min_compaction_lag_ms
            ));
        }
        self.log_config().validate().map_err(|e| e.to_string())
    }

    /// The compaction settings of a topic that compacts; `None` for `cleanup.policy=delete`.
    pub fn compaction_policy(&self) -> Option<CompactionPolicy> {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.cleanup_policy.compacts().then(|| CompactionPolicy {
            min_cleanable_dirty_ratio: self.min_cleanable_dirty_ratio,
            min_compaction_lag_ms: ms(self.min_compaction_lag_ms),
            max_compaction_lag_ms: self.max_compaction_lag_ms.map(ms),
            delete_retention_ms: ms(self.delete_retention_ms),
        })
    }

    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: Duration::from_millis(self.segment_ms),
            index_interval_bytes: self.index_interval_bytes,
            // A compact-only topic keeps what compaction leaves, however old or large.
            retention_ms: self
                .retention_ms
                .filter(|_| self.cleanup_policy.deletes())
                .map(Duration::from_millis),
            retention_bytes: self.retention_bytes.filter(|_| self.cleanup_policy.deletes()),
            max_batch_bytes: self.max_message_bytes as usize,
            flush: match self.flush {
                FlushSetting::Always => FlushPolicy::Always,
                FlushSetting::Interval => FlushPolicy::Interval(Duration::from_millis(self.flush_ms)),
                FlushSetting::Os => FlushPolicy::Os,
            },
            ..LogConfig::default()
        }
    }

    /// Every key with its effective value, for describe.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let opt = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        [
            ("retention.ms", opt(self.retention_ms)),
            ("retention.bytes", opt(self.retention_bytes)),
            ("segment.bytes", self.segment_bytes.to_string()),
            ("segment.ms", self.segment_ms.to_string()),
            ("flush.policy", self.flush.as_str().to_string()),
            ("flush.ms", self.flush_ms.to_string()),
            ("max.message.bytes", self.max_message_bytes.to_string()),
            ("index.interval.bytes", self.index_interval_bytes.to_string()),
            ("cleanup.policy", self.cleanup_policy.as_str().to_string()),
            ("min.cleanable.dirty.ratio", self.min_cleanable_dirty_ratio.to_string()),
            ("min.compaction.lag.ms", self.min_compaction_lag_ms.to_string()),
            ("max.compaction.lag.ms", opt(self.max_compaction_lag_ms)),
            ("delete.retention.ms", self.delete_retention_ms.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TopicDefaults {
        TopicDefaults::from_section(&LogSection::default())
    }

    #[test]
    fn a_max_message_bytes_override_above_the_uncompressed_limit_is_refused() {
        let limited = defaults().with_uncompressed_limit(32 << 20);
        let big = BTreeMap::from([("max.message.bytes".to_string(), (33u64 << 20).to_string())]);
        let err = limited.accept_overrides(&big).expect_err("above the limit");
        assert!(
            err.contains("max.message.bytes") && err.contains("max_uncompressed_batch_bytes"),
            "{err}"
        );
        limited
            .with_overrides(&big)
            .expect("a committed override still applies");
        let fits = BTreeMap::from([("max.message.bytes".to_string(), (32u64 << 20).to_string())]);
        limited.accept_overrides(&fits).expect("at the limit");
    }

    #[test]
    fn overrides_apply_and_bad_ones_name_the_key() {
        let mut o = BTreeMap::new();
        o.insert("retention.ms".to_string(), "-1".to_string());
        o.insert("flush.policy".to_string(), "os".to_string());
        let t = defaults().with_overrides(&o).expect("valid");
        assert_eq!(t.retention_ms, None);
        assert_eq!(t.log_config().flush, FlushPolicy::Os);
        assert!(t.compaction_policy().is_none(), "delete is the default policy");

        let compact = BTreeMap::from([
            ("cleanup.policy".to_string(), "compact".to_string()),
            ("min.cleanable.dirty.ratio".to_string(), "0.25".to_string()),
            ("delete.retention.ms".to_string(), "1000".to_string()),
        ]);
        let t = defaults().with_overrides(&compact).expect("valid");
        let policy = t.compaction_policy().expect("compacts");
        assert_eq!(
            (policy.min_cleanable_dirty_ratio, policy.delete_retention_ms),
            (0.25, 1000)
        );
        assert_eq!(
            t.log_config().retention_ms,
            None,
            "a compact-only topic is not deleted by age"
        );
        let both = BTreeMap::from([("cleanup.policy".to_string(), "delete,compact".to_string())]);
        let t = defaults().with_overrides(&both).expect("valid");
        assert_eq!(t.cleanup_policy, CleanupPolicy::CompactDelete);
        assert!(t.log_config().retention_ms.is_some());
        assert_eq!(t.to_map()["cleanup.policy"], "compact,delete");

        for (k, v, needle) in [
            ("retention.msec", "1", "unknown topic config key 'retention.msec'"),
            ("segment.bytes", "abc", "segment.bytes=abc"),
            ("segment.bytes", "10", "segment_bytes"),
            ("cleanup.policy", "shred", "cleanup.policy"),
            ("min.cleanable.dirty.ratio", "1.5", "from 0 to 1"),
            ("min.cleanable.dirty.ratio", "-0.1", "from 0 to 1"),
            ("min.compaction.lag.ms", "-5", "must not be negative"),
            ("delete.retention.ms", "-1", "must not be negative"),
            ("max.compaction.lag.ms", "0", "must be positive"),
            ("flush.policy", "sometimes", "flush.policy"),
        ] {
            let mut o = BTreeMap::new();
            o.insert(k.to_string(), v.to_string());
            let err = defaults().with_overrides(&o).expect_err(k);
            assert!(err.contains(needle), "{err}");
        }
    }
}
