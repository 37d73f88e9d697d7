//! The Conveyor broker.
//!
//! # Layout
//! - `main.rs`: command line, config loading, signals.
//! - [`config`]: `BrokerConfig`, one struct per TOML section, `validate()`.
//! - [`units`]: sizes and durations with units in config files.
//! - [`topic_config`]: per-topic keys over the broker defaults.
//! - [`server`]: binding, serving, maintenance, graceful shutdown.
//! - [`shutdown`]: controlled shutdown: handing leadership over before stopping.
//! - [`api`]: one gRPC service per file (admin, produce, fetch); `api::forward` asks another
//!   broker's admin service (forwarded requests, a broker's own view of a topic).
//! - [`peer`]: the one way to open a connection to another broker.
//! - [`producer_ids`]: issuing producer ids from blocks the controller allocates.
//! - [`blocking`]: running blocking work off the reactor.
//! - [`byte_budget`]: pools of memory in bytes that requests reserve before they hold it.
//! - [`controller`]: the controller group and what it decides: the topic registry and
//!   metadata applier, bootstrap, replica placement, admin jobs and the change lock, cluster
//!   membership operations and the rebalance planner.
//! - [`replica`]: one Raft group per partition: the partition handle, proposals and status,
//!   the owner task, the Raft log over the segmented log, Ready processing, supervision and
//!   recovery, membership steps, and the transport between brokers.
//! - [`coordinator`]: (empty) the group, share and transaction coordinators to come.
//! - [`metrics`]: metrics in the OpenMetrics text format (`prometheus-client`), served over
//!   HTTP/1 by hyper; the partition health gauges.
//! - [`scrub`]: the background scrub of sealed segments.
//! - [`cleaner`]: the log cleaner threads that compact topics with `cleanup.policy=compact`.
//! - [`error`]: `BrokerError` and its mapping to gRPC status codes.
//!
//! # Invariants
//! - Batches travel as opaque bytes: validated, stamped and stored, never re-encoded.
//! - All disk I/O runs off the async reactor; every queue is bounded.

pub mod api;
pub mod blocking;
pub mod byte_budget;
pub mod cleaner;
pub mod config;
pub mod controller;
pub mod coordinator;
pub mod error;
pub mod metrics;
pub mod metrics_endpoint;
pub mod peer;
pub mod process_metrics;
pub mod producer_ids;
pub mod replica;
pub mod scrub;
pub mod server;
pub mod shutdown;
#[cfg(test)]
mod test_batches;
pub mod topic_config;
pub mod units;

pub use config::BrokerConfig;
pub use server::{Plugins, run, run_until, run_until_with};
