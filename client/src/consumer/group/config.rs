//! A group member's settings and what it subscribes to.

use std::time::Duration;

use conveyor_proto::v1::Subscription;

use crate::StartAt;
use crate::error::{ClientError, Result};

/// Where a member starts a partition assigned to it that the group has no committed offset
/// for, like Kafka's `auto.offset.reset`. Also where it restarts a partition whose position
/// left the log (retention deleted it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// The first record still in the log.
    Earliest,
    /// The high watermark: only records produced from now on (the default, as in Kafka).
    #[default]
    Latest,
    /// Start nothing: the stream yields [`ClientError::NoCommittedOffset`] naming the
    /// partition, which stays assigned and idle until [`seek`](super::GroupConsumer::seek)
    /// gives it a position.
    None,
}

impl OffsetReset {
    pub(crate) fn start_at(self) -> Option<StartAt> {
        match self {
            OffsetReset::Earliest => Some(StartAt::Earliest),
            OffsetReset::Latest => Some(StartAt::Latest),
            OffsetReset::None => None,
        }
    }
}

/// Settings of a consumer group member; fetch settings come from the
/// [`ConsumerConfig`](crate::ConsumerConfig) of the consumer that subscribes.
///
/// ```
/// use std::time::Duration;
/// use conveyor_client::{GroupConfig, OffsetReset};
/// let config = GroupConfig::default()
///     .instance_id("billing-7")
///     .session_timeout(Duration::from_secs(30))
///     .reset(OffsetReset::Earliest);
/// assert!(config.validate().is_ok());
/// assert_eq!(config.auto_commit, Some(Duration::from_secs(5)));
/// ```
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// Static membership (Kafka's `group.instance.id`): a member that comes back with the
    /// same id within the session timeout takes its partitions back with no rebalance, and
    /// [`close`](super::GroupConsumer::close) leaves only for now. Unique within the group.
    pub instance_id: Option<String>,
    /// The partition assignor to ask for: range, round-robin, sticky (the broker's default),
    /// co-partitioned, lag-aware, or one registered in the broker.
    pub assignor: Option<String>,
    /// How long the coordinator keeps the member without a heartbeat (`None`: the broker's
    /// default). Heartbeats come from a background task, so slow processing does not count.
    pub session_timeout: Option<Duration>,
    /// How long the member may take to give up a revoked partition, which it does the next
    /// time the stream is polled (`None`: the broker's default). Past it, the coordinator
    /// removes the member and its partitions are lost.
    pub rebalance_timeout: Option<Duration>,
    /// Commit the finished positions this often (`None`: only when asked). Default 5 s.
    pub auto_commit: Option<Duration>,
    /// Where to start a partition with no committed offset. Default latest.
    pub reset: OffsetReset,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            instance_id: None,
            assignor: None,
            session_timeout: None,
            rebalance_timeout: None,
            auto_commit: Some(Duration::from_secs(5)),
            reset: OffsetReset::Latest,
        }
    }
}

impl GroupConfig {
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }
    pub fn assignor(mut self, name: impl Into<String>) -> Self {
        self.assignor = Some(name.into());
        self
    }
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }
    pub fn rebalance_timeout(mut self, timeout: Duration) -> Self {
        self.rebalance_timeout = Some(timeout);
        self
    }
    pub fn auto_commit(mut self, every: Option<Duration>) -> Self {
        self.auto_commit = every;
        self
    }
    pub fn reset(mut self, reset: OffsetReset) -> Self {
        self.reset = reset;
        self
    }

    /// Checks the settings fit the protocol: ids not empty, timeouts within a `u32` of
    /// milliseconds and not zero, an auto-commit interval not zero.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what: String| Err(ClientError::InvalidArgument(what));
        if self.instance_id.as_deref().is_some_and(str::is_empty) {
            return invalid("instance_id must not be empty (leave it unset for a dynamic member)".into());
        }
        if self.assignor.as_deref().is_some_and(str::is_empty) {
            return invalid("assignor must not be empty (leave it unset for the broker's default)".into());
        }
        for (name, timeout) in [
            ("session_timeout", self.session_timeout),
            ("rebalance_timeout", self.rebalance_timeout),
        ] {
            if let Some(t) = timeout
                && (t.as_millis() == 0 || t.as_millis() > u128::from(u32::MAX))
            {
                return invalid(format!("{name} {t:?} is outside 1 ms ..= {} ms", u32::MAX));
            }
        }
        if self.auto_commit.is_some_and(|d| d.is_zero()) {
            return invalid("auto_commit must be longer than zero (None turns it off)".into());
        }
        Ok(())
    }

    pub(crate) fn session_timeout_ms(&self) -> u32 {
        millis(self.session_timeout)
    }

    pub(crate) fn rebalance_timeout_ms(&self) -> u32 {
        millis(self.rebalance_timeout)
    }
}

/// 0 (the broker's default) when unset; `validate` keeps a set one within range.
fn millis(d: Option<Duration>) -> u32 {
    d.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
}

/// What a member subscribes to, as sent when joining.
pub(crate) fn subscription(topics: &[&str], regex: Option<&str>, config: &GroupConfig) -> Result<Subscription> {
    match (topics.is_empty(), regex) {
        (true, None) => {
            return Err(ClientError::InvalidArgument("subscribe to at least one topic".into()));
        }
        (_, Some("")) => return Err(ClientError::InvalidArgument("the topic pattern is empty".into())),
        _ => {}
    }
    if let Some(empty) = topics.iter().position(|t| t.is_empty()) {
        return Err(ClientError::InvalidArgument(format!(
            "topic {} of the subscription is an empty name",
            empty + 1
        )));
    }
    Ok(Subscription {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        regex: regex.unwrap_or_default().to_string(),
        assignor: config.assignor.clone().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_commit_every_five_seconds_and_start_new_partitions_at_the_latest_offset() {
        let c = GroupConfig::default();
        assert_eq!(c.auto_commit, Some(Duration::from_secs(5)));
        assert_eq!(c.reset, OffsetReset::Latest);
        assert_eq!(
            (c.session_timeout_ms(), c.rebalance_timeout_ms()),
            (0, 0),
            "the broker's defaults"
        );
        assert!(c.validate().is_ok());
    }

    #[test]
    fn settings_the_protocol_cannot_carry_are_refused_saying_which() {
        let e = GroupConfig::default().instance_id("").validate().expect_err("empty id");
        assert!(e.to_string().contains("instance_id"), "{e}");
        let e = GroupConfig::default()
            .session_timeout(Duration::from_secs(u64::from(u32::MAX)))
            .validate()
            .expect_err("too long");
        assert!(e.to_string().contains("session_timeout"), "{e}");
        let e = GroupConfig::default()
            .auto_commit(Some(Duration::ZERO))
            .validate()
            .expect_err("zero interval");
        assert!(e.to_string().contains("auto_commit"), "{e}");
        assert!(subscription(&[], None, &GroupConfig::default()).is_err());
        assert!(subscription(&["a", ""], None, &GroupConfig::default()).is_err());
        let s = subscription(&[], Some("orders-.*"), &GroupConfig::default().assignor("range")).expect("regex");
        assert_eq!((s.regex.as_str(), s.assignor.as_str()), ("orders-.*", "range"));
    }
}
