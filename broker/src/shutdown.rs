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
//! A transfer raft-rs gave up (it does after an election timeout) is started again.
//!
//! Then the drain waits for the former leaders to answer the appends they still hold:
//! entries proposed before the transfer are committed by the new leader, and the old one
//! learns that from the new leader's next message. Stopping the server before then would cut
//! the Raft traffic that tells it, and those producers would wait out
//! `MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN` (2 s) for an answer. The whole drain is bounded by `[broker] drain_timeout`; a partition with no in-sync voter (a
//! single node, say) keeps its leadership until the broker stops, as without a drain.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::controller::Registry;
use crate::replica::partition::Partition;
use crate::replica::transport::Transport;

/// How long one transfer may take before it is asked for again: raft-rs aborts a transfer
/// that has not completed within an election timeout (at most 20 ticks of 50 ms).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often the drain asks a former leader whether it still holds appends.
const POLL: Duration = Duration::from_millis(5);

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

/// Waits until none of `partitions` holds an unanswered append, or `deadline`; returns how
/// many are still held.
async fn answer_held_appends(partitions: &[Arc<Partition>], deadline: Instant) -> usize {
    let mut held = 0;
    for p in partitions.iter().filter(|p| !p.is_leader()) {
        loop {
            let now = p.unanswered_appends().await;
            if now == 0 || Instant::now() >= deadline {
                held += now;
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    held
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
    let moved_from = remaining.clone();
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
    let unanswered = answer_held_appends(&moved_from, deadline).await;
    let elapsed = started.elapsed().as_millis();
    if still > 0 {
        tracing::warn!("controlled shutdown: timed out after {elapsed} ms with {still} partitions still led here");
    } else if unanswered > 0 {
        tracing::warn!("controlled shutdown: timed out after {elapsed} ms with {unanswered} appends unanswered");
    } else if no_successor > 0 {
        tracing::info!(
            "controlled shutdown: drained in {elapsed} ms; {no_successor} partitions had no in-sync replica and stay led here until the broker stops"
        );
    } else {
        tracing::info!("controlled shutdown: drained in {elapsed} ms");
    }
    Drained {
        led,
        moved: led.saturating_sub(still + no_successor),
        no_successor,
    }
}
