//! The Conveyor broker.
//!
//! # Layout
//! - `main.rs`: command line, config loading, signals.
//! - [`config`]: `BrokerConfig`, one struct per TOML section, `validate()`.
//! - [`units`]: sizes and durations with units in config files.
//! - [`topic_config`]: per-topic keys over the broker defaults.
//! - [`server`]: binding, serving, maintenance, graceful shutdown.
//! - [`drain`]: controlled shutdown: handing leadership over before stopping.
//! - [`api`]: one gRPC service per file (admin, produce, fetch).
//! - [`peer_admin`]: asking another broker's admin service (forwarded requests).
//! - [`blocking`]: running blocking work off the reactor.
//! - [`admin_ops`]: long admin operations as background jobs with progress; the metadata
//!   change lock.
//! - [`topics`]: the topic registry, the controller group and replica placement.
//! - [`partition`]: a partition's handle: opening its replica, mailbox, high watermark,
//!   status.
//! - [`replica`]: the owner task, the Raft log over the segmented log, Ready processing,
//!   supervision and recovery of a replica.
//! - [`transport`]: Raft messages between brokers, batched per peer, bounded queues.
//! - [`metrics`]: metrics in the OpenMetrics text format (`prometheus-client`), served over
//!   HTTP/1 by hyper; the partition health gauges.
//! - [`scrub`]: the background scrub of sealed segments.
//! - [`error`]: `BrokerError` and its mapping to gRPC status codes.
//!
//! # Invariants
//! - Batches travel as opaque bytes: validated, stamped and stored, never re-encoded.
//! - All disk I/O runs off the async reactor; every queue is bounded.

pub mod api;
pub mod blocking;
pub mod config;
pub mod controller;
pub mod error;
pub mod metrics;
pub mod peer;
pub mod replica;
pub mod scrub;
pub mod server;
pub mod shutdown;
#[cfg(test)]
mod test_batches;
pub mod topic_config;
pub mod units;

pub use config::BrokerConfig;
pub use server::run;
