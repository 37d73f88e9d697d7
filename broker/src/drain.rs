//! Controlled shutdown: before a broker in a cluster stops, it hands leadership of every
//! partition it leads (the controller group's included) to an in-sync replica, as Kafka's
//! controlled shutdown does, so clients move to the new leaders within a round trip instead
//! of waiting out an election timeout.
//!
//! # Order
//! The broker first marks itself draining ([`Transport::begin_draining`]): from then on its
//! replicas neither campaign nor accept leadership handed to them. Then each partition it
//! leads picks an in-sync voter and starts a Raft leader transfer; the gRPC server (and with
//! it the Raft service) keeps running meanwhile, so the transfers can complete, and produce
//! requests for partitions that moved are refused with `NOT_LEADER` naming the new leader.
//! A transfer raft-rs gave up (it does after an election timeout) is started again. The
//! whole drain is bounded by `[broker] drain_timeout`; a partition with no in-sync voter (a
//! single node, say) keeps its leadership until the broker stops, as without a drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::partition::Partition;
use crate::topics::Registry;
use crate::transport::Transport;

/// How long one transfer may take before it is asked for again: raft-rs aborts a transfer
/// that has not completed within an election timeout (at most 20 ticks of 50 ms).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What a drain achieved, for the log and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Partitions this broker led when the drain began.
    pub led: usize,
    /// Of those, the ones no longer led here when it ended.
    pub moved: usize,
    /// Of those still led, the ones that had no in-sync voter to move to.
    pub no_successor: usize,
}

/// Hands over leadership of every partition this broker leads, waiting at most `timeout`.
/// Does nothing on a broker with no peers, or when `timeout` is zero.
pub async fn drain_leadership(registry: &Registry, transport: &Transport, timeout: Duration) -> Drained {
    if timeout.is_zero() || transport.broker_ids().iter().all(|&id| id == transport.node_id()) {
        return Drained::default();
    }
    transport.begin_draining();
    let started = Instant::now();
    let deadline = started + timeout;
    let mut remaining: Vec<Arc<Partition>> = registry
        .all_partitions()
        .into_iter()
        .filter(|p| p.is_leader())
        .collect();
    let led = remaining.len();
    tracing::info!("controlled shutdown: draining {led} partition leaders");
    let mut no_successor = 0;
    loop {
        remaining.retain(|p| p.is_leader());
        if remaining.is_empty() || Instant::now() >= deadline {
            break;
        }
        let mut asked = Vec::with_capacity(remaining.len());
        for p in remaining.drain(..) {
            if p.hand_over_leadership().await.is_some() {
                asked.push(p);
            } else if p.is_leader() {
                no_successor += 1;
                tracing::info!(topic = %p.topic, partition = p.index, "controlled shutdown: no in-sync replica to take over; leading until the broker stops");
            }
        }
        remaining = asked;
        let round_end = (Instant::now() + RETRY_AFTER).min(deadline);
        let me = transport.node_id();
        for p in &remaining {
            let mut status = p.watch_status();
            let _ = tokio::time::timeout_at(round_end, status.wait_for(|s| s.leader != me)).await;
        }
    }
    let still = remaining.iter().filter(|p| p.is_leader()).count();
    let elapsed = started.elapsed().as_millis();
    if still == 0 {
        tracing::info!(
            "controlled shutdown: drained in {elapsed} ms ({no_successor} partitions had no in-sync replica)"
        );
    } else {
        tracing::warn!("controlled shutdown: timed out after {elapsed} ms with {still} partitions still led here");
    }
    Drained {
        led,
        moved: led.saturating_sub(still + no_successor),
        no_successor,
    }
}
