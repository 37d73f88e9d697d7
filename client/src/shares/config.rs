//! [`ShareConfig`]: a share consumer's settings. Two kinds live here: the group's settings
//! (ordering, lock duration, delivery limit, in-flight bound, where a new group starts, the
//! dead-letter topic), sent when joining and fixed when the group is created, and the
//! member's own (fetch sizes, the prefetch bound, automatic lock renewal, ack batching).

use std::time::Duration;

use conveyor_proto::v1::ShareGroupSettings;

use crate::error::{ClientError, Result};

/// Most records one fetch may ask for (the broker's bound).
const MAX_RECORDS_PER_FETCH: u32 = 10_000;
/// Longest a fetch may wait on the broker (the broker's bound).
const MAX_WAIT: Duration = Duration::from_secs(30);

/// How a share group orders deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareOrdering {
    /// Records go to any member in any order (the broker's default).
    None,
    /// Records with the same key are never in flight together and are delivered in offset
    /// order.
    Key,
}

impl ShareOrdering {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareOrdering::None => "none",
            ShareOrdering::Key => "key",
        }
    }
}

/// Where a new share group starts in each partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareOffsetReset {
    /// The first record still in the log.
    Earliest,
    /// Only records produced from now on (the broker's default).
    Latest,
}

impl ShareOffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            ShareOffsetReset::Earliest => "earliest",
            ShareOffsetReset::Latest => "latest",
        }
    }
}

/// Settings of a [`ShareConsumer`](super::ShareConsumer).
///
/// The group settings (`ordering` to `dead_letter_topic`) are fixed when the group is
/// created; a member joining an existing group leaves them unset (taking the group's) or
/// sets them to the group's values: a different value is refused with INVALID_ARGUMENT
/// naming both. Unset means the group's value, or the broker's default for a new group.
///
/// ```
/// use std::time::Duration;
/// use conveyor_client::{ShareConfig, ShareOrdering, ShareOffsetReset};
/// let config = ShareConfig::default()
///     .ordering(ShareOrdering::Key)
///     .lock_duration(Duration::from_secs(60))
///     .auto_offset_reset(ShareOffsetReset::Earliest)
///     .auto_renew(Some(Duration::from_secs(600)));
/// assert!(config.validate().is_ok());
/// assert!(ShareConfig::default().max_records(0).validate().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct ShareConfig {
    pub ordering: Option<ShareOrdering>,
    /// How long an acquired record stays locked to its member (1 s to 1 h; default 30 s).
    pub lock_duration: Option<Duration>,
    /// Deliveries before a record is dead-lettered (1 to 100; default 5).
    pub max_delivery_count: Option<u32>,
    /// Most records per partition in flight in the group (10 to 10,000; default 2,000).
    pub max_inflight_records: Option<u32>,
    pub auto_offset_reset: Option<ShareOffsetReset>,
    /// Default `<topic>.<group>.dlq`.
    pub dead_letter_topic: Option<String>,
    /// Most records one fetch acquires (1 to 10,000; default 500). Whole batches are
    /// acquired where they fit, so an answer may hold up to one batch more.
    pub max_records: u32,
    /// Most bytes of batches in one fetch's answer (0: the broker's 4 MiB).
    pub max_bytes: u32,
    /// Most deliveries fetched and not yet handed out (default 1,000): a fetch is made only
    /// once room for half of them (or a whole `max_records`, if less) is free. Buffered deliveries are locked to this member too, so a
    /// large buffer in front of a slow application holds records other members could take.
    pub prefetch: usize,
    /// How long a fetch waits on the broker when nothing is available (default 500 ms, at
    /// most 30 s).
    pub max_wait: Duration,
    /// When set, a delivery held (fetched and not yet acknowledged) has its lock renewed
    /// before it runs out (when a third of the lock is left), until this long after it was
    /// fetched. Unset (the default): locks run out after the group's lock duration and the
    /// records go to another member.
    pub auto_renew: Option<Duration>,
    /// How long an acknowledgement waits to be sent with others (default 1 ms); at most 4
    /// calls are in flight, and acknowledgements made meanwhile go out together.
    pub ack_linger: Duration,
    /// Most acknowledgements queued and not yet sent (default 10,000): past it,
    /// [`Delivery::accept`](super::Delivery::accept) and the others wait.
    pub ack_queue: usize,
}

impl Default for ShareConfig {
    fn default() -> Self {
        ShareConfig {
            ordering: None,
            lock_duration: None,
            max_delivery_count: None,
            max_inflight_records: None,
            auto_offset_reset: None,
            dead_letter_topic: None,
            max_records: 500,
            max_bytes: 0,
            prefetch: 1000,
            max_wait: Duration::from_millis(500),
            auto_renew: None,
            ack_linger: Duration::from_millis(1),
            ack_queue: 10_000,
        }
    }
}

impl ShareConfig {
    pub fn ordering(mut self, ordering: ShareOrdering) -> Self {
        self.ordering = Some(ordering);
        self
    }
    pub fn lock_duration(mut self, lock: Duration) -> Self {
        self.lock_duration = Some(lock);
        self
    }
    pub fn max_delivery_count(mut self, count: u32) -> Self {
        self.max_delivery_count = Some(count);
        self
    }
    pub fn max_inflight_records(mut self, records: u32) -> Self {
        self.max_inflight_records = Some(records);
        self
    }
    pub fn auto_offset_reset(mut self, reset: ShareOffsetReset) -> Self {
        self.auto_offset_reset = Some(reset);
        self
    }
    pub fn dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }
    pub fn max_records(mut self, records: u32) -> Self {
        self.max_records = records;
        self
    }
    pub fn max_bytes(mut self, bytes: u32) -> Self {
        self.max_bytes = bytes;
        self
    }
    pub fn prefetch(mut self, deliveries: usize) -> Self {
        self.prefetch = deliveries;
        self
    }
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }
    pub fn auto_renew(mut self, up_to: Option<Duration>) -> Self {
        self.auto_renew = up_to;
        self
    }
    pub fn ack_linger(mut self, linger: Duration) -> Self {
        self.ack_linger = linger;
        self
    }
    pub fn ack_queue(mut self, acks: usize) -> Self {
        self.ack_queue = acks;
        self
    }

    /// Checks the member's own settings (the broker checks the group's, naming its bounds).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ClientError::InvalidArgument(m));
        if !(1..=MAX_RECORDS_PER_FETCH).contains(&self.max_records) {
            return bad(format!(
                "max_records is {}: it must be 1 to {MAX_RECORDS_PER_FETCH}",
                self.max_records
            ));
        }
        if self.prefetch == 0 {
            return bad("prefetch must be at least 1 delivery".into());
        }
        if self.ack_queue == 0 {
            return bad("ack_queue must hold at least 1 acknowledgement".into());
        }
        if self.max_wait > MAX_WAIT {
            return bad(format!(
                "max_wait is {:?}: it must be at most {MAX_WAIT:?}",
                self.max_wait
            ));
        }
        if self.lock_duration.is_some_and(|d| d.as_millis() > u128::from(u32::MAX)) {
            return bad(format!("lock_duration {:?} is too long", self.lock_duration));
        }
        if self.dead_letter_topic.as_deref() == Some("") {
            return bad("dead_letter_topic must not be empty (leave it unset for the default)".into());
        }
        Ok(())
    }

    /// The group settings as the join request carries them.
    pub(crate) fn settings(&self) -> ShareGroupSettings {
        ShareGroupSettings {
            ordering: self.ordering.map(|o| o.as_str().to_string()),
            lock_duration_ms: self.lock_duration.map(|d| d.as_millis() as u32),
            max_delivery_count: self.max_delivery_count,
            max_inflight_records: self.max_inflight_records,
            auto_offset_reset: self.auto_offset_reset.map(|r| r.as_str().to_string()),
            dead_letter_topic: self.dead_letter_topic.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_group_settings_stay_unset_on_the_wire_and_set_ones_travel_in_the_brokers_units() {
        assert_eq!(ShareConfig::default().settings(), ShareGroupSettings::default());
        let s = ShareConfig::default()
            .ordering(ShareOrdering::Key)
            .lock_duration(Duration::from_secs(2))
            .auto_offset_reset(ShareOffsetReset::Earliest)
            .dead_letter_topic("dlq")
            .settings();
        assert_eq!(s.ordering.as_deref(), Some("key"));
        assert_eq!(s.lock_duration_ms, Some(2000));
        assert_eq!(s.auto_offset_reset.as_deref(), Some("earliest"));
        assert_eq!(s.dead_letter_topic.as_deref(), Some("dlq"));
        assert_eq!(s.max_delivery_count, None);
    }

    #[test]
    fn member_settings_out_of_bounds_are_refused_naming_the_setting() {
        for (config, names) in [
            (ShareConfig::default().max_records(10_001), "max_records"),
            (ShareConfig::default().prefetch(0), "prefetch"),
            (ShareConfig::default().max_wait(Duration::from_secs(31)), "max_wait"),
            (ShareConfig::default().dead_letter_topic(""), "dead_letter_topic"),
        ] {
            let e = config.validate().expect_err(names);
            assert!(e.to_string().contains(names), "{e}");
        }
    }
}
