//! Internal topics: `__consumer_offsets`, `__share_state` (and later `__transactions`), and
//! share groups' dead-letter topics, which coordinators also create on demand.
//! They are created on first use by the controller, compacted, with a partition count and
//! replication factor from the broker config, and hidden from producers.

use std::collections::BTreeMap;

use crate::controller::Registry;
use crate::error::{BrokerError, Result};

/// Consumer group records: group metadata, members, committed offsets.
pub const CONSUMER_OFFSETS: &str = "__consumer_offsets";

/// Whether `name` is an internal topic (clients may read it, never write or delete it).
pub fn is_internal(name: &str) -> bool {
    name.starts_with("__")
}

/// The partition of an internal topic with `partitions` partitions that holds `id`. A
/// stable hash (CRC-32, IEEE, of the id's bytes): it must never change between versions, or
/// groups would lose their state.
pub fn partition_for(id: &str, partitions: u32) -> i32 {
    let hash = crc32fast::hash(id.as_bytes());
    (hash % partitions.max(1)) as i32
}

/// The configs an internal topic is created with: compacted, never deleted by time or size.
pub fn internal_configs() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cleanup.policy".to_string(), "compact".to_string()),
        // The cleaner leaves the active segment alone, and a new coordinator replays it
        // whole: small segments keep that replay short.
        ("segment.bytes".to_string(), (64u64 << 20).to_string()),
    ])
}

/// The replication factor for a new internal topic: `wanted`, or min(3, brokers) when 0.
pub fn replication_for(wanted: u32, brokers: usize) -> i32 {
    let brokers = brokers.max(1) as u32;
    let rf = if wanted == 0 {
        brokers.min(3)
    } else {
        wanted.min(brokers)
    };
    rf as i32
}

/// Refuses a client's write or deletion of an internal topic.
pub fn refuse_client_write(name: &str, what: &str) -> Result<()> {
    if is_internal(name) {
        return Err(BrokerError::InvalidRequest(format!(
            "topic '{name}' is internal: only the broker's coordinators {what} it"
        )));
    }
    Ok(())
}

impl Registry {
    /// Creates internal topic `name` if it does not exist (controller only; elsewhere
    /// [`BrokerError::NotController`] names the controller). `lock` is the metadata change
    /// lock.
    pub async fn ensure_internal_topic(
        &self,
        lock: &tokio::sync::Mutex<()>,
        name: &str,
        partitions: u32,
        replication_factor: u32,
        kind: TopicKind,
    ) -> Result<()> {
        match kind {
            TopicKind::Internal if !is_internal(name) => {
                return Err(BrokerError::InvalidRequest(format!(
                    "'{name}' is not an internal topic"
                )));
            }
            TopicKind::DeadLetter => crate::controller::validate_topic_name(name)?,
            TopicKind::Internal => {}
        }
        match self.metadata_partition().ensure_leader() {
            Ok(()) => {}
            Err(BrokerError::NotLeader { leader, address, .. }) => {
                return Err(BrokerError::NotController {
                    controller: leader,
                    address,
                });
            }
            Err(_) => return Err(BrokerError::NoController),
        }
        let _guard = crate::controller::admin_ops::lock_changes(lock).await?;
        if self.get(name).is_ok() {
            return Ok(());
        }
        let rf = replication_for(replication_factor, self.placeable_brokers().len());
        let partitions = i32::try_from(partitions)
            .map_err(|_| BrokerError::InvalidConfig(format!("{partitions} partitions for {name}")))?;
        let configs = match kind {
            TopicKind::Internal => internal_configs(),
            TopicKind::DeadLetter => BTreeMap::new(),
        };
        match self.create_topic_unchecked(name, partitions, rf, configs).await {
            Ok(_) | Err(BrokerError::TopicExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// What a coordinator creates on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// `__`-named, compacted, hidden from producers.
    Internal,
    /// A share group's dead-letter topic: an ordinary topic with the default configs.
    DeadLetter,
}

/// How long a coordinator waits for an internal topic to be created and reach this broker.
const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Makes sure internal topic `name` exists and this broker has applied it: asks the
/// controller (itself, or over the Raft service) and waits for the record to arrive here.
pub async fn ensure_exists(
    registry: &Registry,
    admin_lock: &tokio::sync::Mutex<()>,
    name: &str,
    partitions: u32,
    replication_factor: u32,
    kind: TopicKind,
) -> Result<std::sync::Arc<crate::controller::Topic>> {
    let deadline = tokio::time::Instant::now() + CREATE_WAIT;
    let me = registry.transport().node_id();
    let mut last_error: Option<BrokerError> = None;
    loop {
        if let Ok(topic) = registry.get(name) {
            return Ok(topic);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(last_error.unwrap_or_else(|| BrokerError::TimedOut {
                what: format!("creating internal topic '{name}'"),
                after: CREATE_WAIT,
                state: "it has not reached this broker yet; retry shortly".into(),
            }));
        }
        let asked = async {
            let controller = registry.controller().await?;
            if controller == me {
                registry
                    .ensure_internal_topic(admin_lock, name, partitions, replication_factor, kind)
                    .await
            } else {
                ask(registry, controller, name, partitions, replication_factor, kind).await
            }
        };
        match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(())) | Err(_) => {}
            Ok(Err(e)) if e.detail().retriable => last_error = Some(e),
            Ok(Err(e)) => return Err(e),
        }
        tokio::time::sleep(RETRY_AFTER).await;
    }
}

async fn ask(
    registry: &Registry,
    controller: u32,
    name: &str,
    partitions: u32,
    replication_factor: u32,
    kind: TopicKind,
) -> Result<()> {
    use conveyor_proto::internal::v1::InternalTopicRequest;
    use conveyor_proto::internal::v1::raft_client::RaftClient;
    let address = registry.transport().raft_address(controller);
    let channel = crate::peer::connect(controller, address, crate::api::forward::CONNECT_TIMEOUT).await?;
    let answer = RaftClient::new(channel)
        .ensure_internal_topic(InternalTopicRequest {
            name: name.to_string(),
            partitions,
            replication_factor,
            dead_letter: kind == TopicKind::DeadLetter,
        })
        .await;
    match answer {
        Ok(_) => Ok(()),
        Err(status) => {
            use prost::Message as _;
            let detail = conveyor_proto::v1::ErrorDetail::decode(status.details()).unwrap_or_default();
            let retriable = detail.retriable
                || matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                );
            let reason = format!("the controller (broker {controller}) answered: {}", status.message());
            if retriable {
                Err(BrokerError::LeaderNotAvailable {
                    topic: name.to_string(),
                    partition: 0,
                })
                .inspect_err(|_| tracing::debug!(%reason, "internal topic not created yet"))
            } else {
                Err(BrokerError::Internal(reason))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_hash_to_a_partition_in_range_and_stably() {
        for n in [1, 2, 16, 50] {
            for id in ["", "a", "orders-workers", &"g".repeat(255)] {
                let p = partition_for(id, n);
                assert!((0..n as i32).contains(&p));
                assert_eq!(p, partition_for(id, n));
            }
        }
        // Fixed forever: a change would move every group to another partition.
        assert_eq!(
            partition_for("orders-workers", 16),
            (crc32fast::hash(b"orders-workers") % 16) as i32
        );
        assert_eq!(partition_for("anything", 0), 0);
    }

    #[test]
    fn replication_defaults_to_three_or_the_broker_count() {
        assert_eq!(replication_for(0, 1), 1);
        assert_eq!(replication_for(0, 2), 2);
        assert_eq!(replication_for(0, 5), 3);
        assert_eq!(replication_for(2, 5), 2);
        assert_eq!(replication_for(5, 3), 3);
    }

    #[test]
    fn clients_cannot_write_internal_topics() {
        assert!(refuse_client_write("__consumer_offsets", "write").is_err());
        assert!(refuse_client_write("orders", "write").is_ok());
    }
}
