//! Async Rust client for the Conveyor event broker.
//!
//! # Layout
//! - [`Client`]: a connection to a broker, shared by everything below.
//! - [`admin`]: topics, offsets and cluster calls.
//! - [`producer`]: batching producer with a murmur2 key partitioner, linger, compression,
//!   bounded in-flight bytes (backpressure) and retries.
//! - [`consumer`]: manually assigned consumer yielding records as a `futures::Stream`, with
//!   pipelined fetches.
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
//! let producer = client.producer(ProducerConfig::default());
//! let delivery = producer.send(ProducerRecord::new("orders", "drone 7 dispatched").key("drone-7")).await?;
//! let written = delivery.await?;
//! println!("partition {} offset {:?}", written.partition, written.offset);
//! # Ok(()) }
//! ```

pub mod admin;
mod connection;
pub mod consumer;
pub mod error;
pub mod producer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use admin::{Admin, OffsetSpec};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, StartAt};
pub use conveyor_proto::v1 as proto;
pub use conveyor_storage::batch::Compression;
pub use error::{ClientError, Result};
pub use producer::{Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata};

use tonic::transport::Channel;

/// Largest gRPC message the client sends or accepts.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A connection to a Conveyor broker. Cheap to clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channel: Channel,
    address: String,
    partition_counts: Mutex<HashMap<String, u32>>,
}

impl Client {
    /// Connects to the first broker in `bootstrap` (comma-separated `HOST:PORT`) that answers.
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
                channel,
                address,
                partition_counts: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The address of the broker this client talks to.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    pub(crate) fn channel(&self) -> Channel {
        self.inner.channel.clone()
    }

    /// Topic and cluster administration.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }

    /// A producer; see [`ProducerConfig`] for batching, acks and retries.
    pub fn producer(&self, config: ProducerConfig) -> Producer {
        Producer::new(self.clone(), config)
    }

    /// A consumer with manual partition assignment.
    pub fn consumer(&self, config: ConsumerConfig) -> Consumer {
        Consumer::new(self.clone(), config)
    }

    /// The number of partitions of `topic`, cached after the first call.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(n) = self.cached_count(topic) {
            return Ok(n);
        }
        let description = self.admin().describe_topic(topic).await?;
        let n = description.partitions.len() as u32;
        self.inner
            .partition_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(topic.to_string(), n);
        Ok(n)
    }

    fn cached_count(&self, topic: &str) -> Option<u32> {
        self.inner
            .partition_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(topic)
            .copied()
    }
}
