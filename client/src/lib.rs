//! Async Rust client for the Conveyor event broker.
//!
//! # Layout
//! - [`Client`]: a connection to a broker, shared by everything below.
//! - [`admin`]: topics, offsets and cluster calls.
//! - [`producer`]: batching producer with a murmur2 key partitioner, linger, compression,
//!   bounded in-flight bytes (backpressure), retries, and idempotence (on by default).
//! - [`consumer`]: manually assigned consumer yielding records as a `futures::Stream`, with
//!   pipelined fetches; [`consumer::group`]: the consumer group member built on it
//!   (coordinator-assigned partitions, background heartbeats, committed offsets).
//! - [`groups`]: consumer group administration, and finding and following a group's
//!   coordinator (a consumer group's or a share group's).
//! - [`shares`]: share groups (queues on the log): [`ShareConsumer`], a member that gets
//!   records one by one, each locked to it until acknowledged, and [`ShareGroups`], their
//!   administration.
//! - [`error`]: the [`ClientError`] type.
//!
//! Records travel in Conveyor's batch format: the producer encodes batches, the broker stores
//! them as they are, the consumer decodes them.
//!
//! ```no_run
//! use conveyor_client::{Client, ProducerConfig, ProducerRecord};
//! # async fn run() -> Result<(), conveyor_client::ClientError> {
//! let client = Client::connect("127.0.0.1:9292").await?;
//! client.admin().create_topic("orders", 3, &[]).await?;
//! let producer = client.producer(ProducerConfig::default())?;
//! let delivery = producer.send(ProducerRecord::new("orders", "drone 7 dispatched").key("drone-7")).await?;
//! let written = delivery.await?;
//! println!("partition {} offset {:?}", written.partition, written.offset);
//! # Ok(()) }
//! ```

pub mod admin;
mod cluster;
mod connection;
pub mod consumer;
pub mod error;
pub mod groups;
pub mod producer;
pub mod shares;

use std::sync::Arc;

pub use admin::{ActiveProducer, Admin, OffsetSpec};
pub use consumer::group::{AssignmentEvent, CommitHandle, GroupConfig, GroupConsumer, OffsetReset};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, StartAt};
pub use conveyor_proto::v1 as proto;
pub use conveyor_storage::batch::{Compression, Header};
pub use error::{ClientError, Result};
pub use groups::{GroupCoordinator, GroupListing, Groups, OffsetAndMetadata, TopicPartition};
pub use producer::{Acks, DeliveryFuture, Producer, ProducerConfig, ProducerIdentity, ProducerRecord, RecordMetadata};
pub use shares::{
    Delivery, ShareConfig, ShareConsumer, ShareGroupListing, ShareGroups, ShareOffsetReset, ShareOrdering,
};

/// Largest gRPC message the client sends or accepts.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// How long a topic unknown to the broker asked is looked for again, in a cluster: creation
/// reaches every broker within moments of being acknowledged.
pub(crate) const UNKNOWN_TOPIC_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
const UNKNOWN_TOPIC_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// How long one broker is given to issue a producer id before the next is asked. Longer
/// than a broker takes to give up on its controller (its `ISSUE_TIMEOUT`, 15 s), so a
/// broker fetching a new block of ids answers rather than being abandoned.
const INIT_PRODUCER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A connection to a Conveyor cluster. Cheap to clone; clones share the connections.
///
/// Produce and fetch requests go to each partition's leader; the client learns leaders from
/// metadata and from the broker's "not leader" answers, and retries there. Admin calls go to
/// any broker and fail over along the bootstrap list and the brokers learned since.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    address: String,
    cluster: cluster::Cluster,
    coordinators: groups::coordinator::Coordinators,
}

impl Client {
    /// Connects to the first broker in `bootstrap` (comma-separated `HOST:PORT`) that answers;
    /// the others are used when it fails.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), conveyor_client::ClientError> {
    /// let client = conveyor_client::Client::connect("127.0.0.1:9292,127.0.0.1:9392").await?;
    /// println!("connected to {}", client.address());
    /// # Ok(()) }
    /// ```
    pub async fn connect(bootstrap: &str) -> Result<Client> {
        let (channel, address) = connection::connect(bootstrap).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                cluster: cluster::Cluster::new(connection::addresses(bootstrap), address.clone(), channel),
                address,
                coordinators: groups::coordinator::Coordinators::default(),
            }),
        })
    }

    /// The address of the broker this client first connected to.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    pub(crate) fn cluster(&self) -> &cluster::Cluster {
        &self.inner.cluster
    }

    /// Each consumer group's coordinator, as learned so far.
    pub(crate) fn coordinators(&self) -> &groups::coordinator::Coordinators {
        &self.inner.coordinators
    }

    /// Topic and cluster administration.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// Consumer group administration: list, describe, committed offsets, reset, delete.
    pub fn groups(&self) -> Groups {
        Groups::new(self.clone())
    }

    /// Share group administration: create, list, describe, purge or redrive dead letters,
    /// delete.
    pub fn share_groups(&self) -> ShareGroups {
        ShareGroups::new(self.clone())
    }

    /// Joins share group `group` (creating it, on `topic`, when it does not exist) as a new
    /// member, and returns it once the coordinator accepted it: a refusal (settings that
    /// differ from the group's, an unknown topic, a group of another topic) is this call's
    /// error. See [`shares`] for an example.
    pub async fn share_consumer(&self, group: &str, topic: &str, config: ShareConfig) -> Result<ShareConsumer> {
        ShareConsumer::start(self, group, topic, config).await
    }

    /// A producer; see [`ProducerConfig`] for batching, acks, retries and idempotence.
    /// Fails when the settings do not fit together ([`ProducerConfig::validate`]), e.g.
    /// idempotence with acks other than all.
    pub fn producer(&self, config: ProducerConfig) -> Result<Producer> {
        Producer::new(self.clone(), config)
    }

    /// Asks the cluster (any broker) for a new producer id, epoch 0, for idempotent or
    /// transactional produce. No id is issued twice. Idempotent producers call it themselves.
    ///
    /// ```no_run
    /// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
    /// let identity = client.init_producer().await?;
    /// println!("producer id {} epoch {}", identity.producer_id, identity.producer_epoch);
    /// # Ok(()) }
    /// ```
    pub async fn init_producer(&self) -> Result<ProducerIdentity> {
        let response = self
            .inner
            .cluster
            .any(|channel| async move {
                let mut grpc = proto::produce_client::ProduceClient::new(channel);
                let call = grpc.init_producer(proto::InitProducerRequest {});
                // A stopped broker keeps its connection open: without a deadline the call
                // would wait for the keep-alive to give up. One that dies mid-call is
                // unreachable, not a refusal that would stop an idempotent producer for good.
                cluster::answer_within(INIT_PRODUCER_TIMEOUT, "InitProducer", call).await
            })
            .await?;
        ProducerIdentity::try_from(response)
    }

    /// A consumer with manual partition assignment.
    pub fn consumer(&self, config: ConsumerConfig) -> Consumer {
        Consumer::new(self.clone(), config)
    }

    /// Whether there is more than one broker (asked once if no metadata told yet).
    async fn is_cluster(&self) -> bool {
        if self.inner.cluster.broker_count() <= 1
            && let Ok(c) = self.admin().describe_cluster().await
        {
            self.inner.cluster.learn_brokers(c.brokers);
        }
        self.inner.cluster.broker_count() > 1
    }

    /// The number of partitions of `topic`, cached after the first call.
    ///
    /// In a cluster, a topic just created through one broker reaches the others a moment
    /// later: an unknown topic is asked for again for up to `UNKNOWN_TOPIC_WAIT` before the
    /// error stands. A single broker's answer stands at once.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.inner.cluster.cached_partition_count(topic) {
            return Ok(n);
        }
        let started = std::time::Instant::now();
        loop {
            match self.inner.cluster.refresh(topic).await {
                Err(e) if e.code() == Some(proto::ErrorCode::UnknownTopic) => {
                    if started.elapsed() >= UNKNOWN_TOPIC_WAIT || !self.is_cluster().await {
                        return Err(e);
                    }
                    tokio::time::sleep(UNKNOWN_TOPIC_RETRY).await;
                }
                other => break other?,
            }
        }
        self.inner
            .cluster
            .cached_partition_count(topic)
            .ok_or_else(|| ClientError::InvalidArgument(format!("the broker did not describe topic '{topic}'")))
    }
}
