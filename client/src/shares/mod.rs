//! Share groups: queues on the log. A share group consumes one topic; its coordinator
//! hands each record to one member at a time, locked to it for the group's lock duration,
//! and the member acknowledges records one by one: accept (done), release (again, maybe
//! after a delay), reject (dead-lettered), or renew (keep the lock). A record not
//! acknowledged in time goes to another member; one delivered `max_delivery_count` times
//! is dead-lettered. Delivery is at least once.
//!
//! # Layout
//! - `config.rs`: [`ShareConfig`], the group's and the member's settings.
//! - `consumer.rs`: [`ShareConsumer`], a member as a `futures::Stream` of deliveries.
//! - `delivery.rs`: [`Delivery`], a record with its lock, and its acknowledgement.
//! - `session.rs`: the `Join` stream that holds the member's session, rejoined when lost.
//! - `driver.rs`: the background task: fetches, batched acknowledgements, lock renewal.
//! - `fetch.rs`: a fetch answer into deliveries (only the acquired records).
//! - `ack_queue.rs`: the bounded queue of acknowledgements from deliveries to the driver.
//! - `acks.rs`: acknowledgements coalesced into ranges, and their results matched back.
//! - `admin.rs`: [`ShareGroups`]: list, describe, purge or redrive dead letters, delete.
//!
//! The share coordinator is found and followed like a consumer group's
//! (`groups/coordinator.rs`, [`GroupKind::Share`](crate::groups::coordinator)).
//!
//! ```no_run
//! use std::time::Duration;
//! use futures::StreamExt;
//! use conveyor_client::{Client, ShareConfig, ShareOffsetReset, ShareOrdering};
//! # async fn run() -> Result<(), conveyor_client::ClientError> {
//! let client = Client::connect("127.0.0.1:9292").await?;
//! let config = ShareConfig::default()
//!     .ordering(ShareOrdering::Key)
//!     .auto_offset_reset(ShareOffsetReset::Earliest);
//! let mut workers = client.share_consumer("workers", "orders", config).await?;
//! while let Some(delivery) = workers.next().await {
//!     let delivery = delivery?;
//!     let value = delivery.record().value.clone().unwrap_or_default();
//!     if value.is_empty() {
//!         delivery.reject("empty order").await?;
//!     } else if delivery.delivery_count() < 3 && value.starts_with(b"retry") {
//!         delivery.release(Duration::from_secs(10)).await?;
//!     } else {
//!         println!("order {:?}", value);
//!         delivery.accept().await?;
//!     }
//! }
//! workers.close().await?;
//! # Ok(()) }
//! ```
//!
//! Awaiting each acknowledgement in turn costs a round trip per record (batched with other
//! tasks' acknowledgements, if any). To go faster, acknowledge from spawned tasks or
//! collect the acknowledgement futures and await them together: they go out batched.

mod ack_queue;
mod acks;
mod admin;
mod config;
mod consumer;
mod delivery;
mod driver;
mod fetch;
mod session;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod fake_broker_tests;

pub use admin::{ShareGroupListing, ShareGroups};
pub use config::{ShareConfig, ShareOffsetReset, ShareOrdering};
pub use consumer::ShareConsumer;
pub use delivery::Delivery;

/// A `Shares` client for `channel`, taking answers as large as the broker may send (a share
/// fetch holds up to 16 MiB of batches, past tonic's 4 MiB default).
pub(crate) fn grpc(
    channel: tonic::transport::Channel,
) -> conveyor_proto::v1::shares_client::SharesClient<tonic::transport::Channel> {
    conveyor_proto::v1::shares_client::SharesClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(crate::MAX_MESSAGE_BYTES)
}
