//! gRPC services, one module each: [`admin`], [`produce`], [`fetch`]. They validate requests,
//! route them to partitions and map errors; they hold no state of their own. [`forward`]
//! asks another broker's admin service (forwarded requests); [`inflate_budget`] bounds the
//! memory that decompressing batches may take; [`admission`] bounds the bytes of produce
//! requests before tonic reads them.

pub mod admin;
pub mod admission;
pub mod fetch;
pub mod forward;
pub mod groups;
pub mod inflate_budget;
pub mod produce;
pub mod shares;

use std::sync::Arc;

pub use crate::blocking::blocking;

use crate::controller::Registry;
use crate::metrics::Metrics;

/// What every service needs.
#[derive(Debug)]
pub struct Context {
    pub registry: Arc<Registry>,
    /// The log cleaner, which `topic compact` asks for a pass now.
    pub cleaner: Arc<crate::cleaner::Cleaner>,
    pub metrics: Arc<Metrics>,
    pub node_id: u32,
    pub max_fetch_wait_ms: u64,
    /// `[limits] max_uncompressed_batch_bytes`: what one batch may decompress to.
    pub max_uncompressed_batch_bytes: usize,
    /// Serialises metadata changes (shared with the Raft service, which allocates producer
    /// id blocks under it).
    pub admin_lock: Arc<tokio::sync::Mutex<()>>,
    /// Issues producer ids (`Produce.InitProducer`).
    pub producer_ids: crate::producer_ids::ProducerIds,
    /// Turns true when the broker starts shutting down: streams stop taking requests.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Connections to other brokers' client services, by id and address, kept for the calls
    /// a broker makes often (metadata lookups); they reconnect on their own.
    pub peer_channels: std::sync::Mutex<std::collections::HashMap<(u32, String), tonic::transport::Channel>>,
}
