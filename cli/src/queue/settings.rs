//! The group settings `queue create` and `queue consume` take: fixed when the group is
//! created, checked against the group's when it exists.

use std::time::Duration;

use clap::{Args, ValueEnum};
use conveyor_client::{ShareConfig, ShareOffsetReset, ShareOrdering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OrderingArg {
    /// Records with the same key are never in flight together, and go in offset order.
    Key,
    /// Any record to any member, in any order.
    None,
}

impl From<OrderingArg> for ShareOrdering {
    fn from(o: OrderingArg) -> ShareOrdering {
        match o {
            OrderingArg::Key => ShareOrdering::Key,
            OrderingArg::None => ShareOrdering::None,
        }
    }
}

impl OrderingArg {
    /// The name the command line takes.
    pub fn name(self) -> &'static str {
        match self {
            OrderingArg::Key => "key",
            OrderingArg::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FromArg {
    Earliest,
    Latest,
}

#[derive(Debug, Clone, Args)]
pub struct GroupSettingsArgs {
    /// New group: key (same-key records one at a time, in order) or none (the default).
    #[arg(long, value_enum)]
    pub ordering: Option<OrderingArg>,
    /// New group: how long a delivered record stays locked to its member (1s to 1h;
    /// default 30s).
    #[arg(long, value_name = "DURATION", value_parser = crate::time::parse_secs)]
    pub lock_duration: Option<Duration>,
    /// New group: deliveries before a record is dead-lettered (1 to 100; default 5).
    #[arg(long, value_name = "N")]
    pub max_delivery_count: Option<u32>,
    /// New group: most records per partition read and not yet done: available, acquired
    /// or being dead-lettered (10 to 10,000; default 2,000).
    #[arg(long, value_name = "N")]
    pub max_inflight: Option<u32>,
    /// New group: where it starts in each partition (default latest: only new records).
    #[arg(long, value_enum)]
    pub from: Option<FromArg>,
    /// New group: where dead letters go (default TOPIC.GROUP.dlq).
    #[arg(long, value_name = "TOPIC")]
    pub dead_letter_topic: Option<String>,
}

impl GroupSettingsArgs {
    /// `config` with these group settings.
    pub fn apply(&self, config: ShareConfig) -> ShareConfig {
        ShareConfig {
            ordering: self.ordering.map(Into::into),
            lock_duration: self.lock_duration,
            max_delivery_count: self.max_delivery_count,
            max_inflight_records: self.max_inflight,
            auto_offset_reset: self.from.map(|f| match f {
                FromArg::Earliest => ShareOffsetReset::Earliest,
                FromArg::Latest => ShareOffsetReset::Latest,
            }),
            dead_letter_topic: self.dead_letter_topic.clone(),
            ..config
        }
    }
}
