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
//! The leaders are looked up again every round, so a group that won an election already
//! running when the drain began, or one opened during it, is handed over too. A transfer
//! raft-rs gave up (it does after an election timeout) is started again, to another voter:
//! one that did not take over is likely draining too. A partition with no in-sync voter yet
//! is asked again on the next round.
//!
//! Then the drain waits for the former leaders to answer the appends they still hold:
//! entries proposed before the transfer are committed by the new leader, and the old one
//! learns that from the new leader's next message. Stopping the server before then would cut
//! the Raft traffic that tells it, and those producers would wait out
//! `MAX_WAIT_FOR_COMMIT_AFTER_STEP_DOWN` (2 s) for an answer. The whole drain is bounded by `[broker] drain_timeout`, every wait in it included; a
//! partition with no voter left to ask (a single voter, or every other voter draining as
//! well) keeps its leadership until the broker stops, as without a drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio::time::{Instant, timeout_at};

use crate::controller::Registry;
use crate::replica::partition::Partition;
use crate::replica::proposal::HandOver;
use crate::replica::transport::Transport;

/// How long one transfer may take before it is asked for again: raft-rs aborts a transfer
/// that has not completed within an election timeout (10 ticks of 50 ms).
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How soon a partition with no in-sync voter is asked again: a follower counts as in sync
/// again as soon as its next heartbeat response arrives.
const RETRY_SOON: Duration = Duration::from_millis(100);

/// How often the drain asks a former leader whether it still holds appends.
const POLL: Duration = Duration::from_millis(5);

/// Waits until none of `partitions` holds an unanswered append, or `deadline`; returns how
/// many are still held (a replica that did not answer in time counts as one).
async fn answer_held_appends(partitions: impl Iterator<Item = &Arc<Partition>>, deadline: Instant) -> usize {
    let waits = partitions.filter(|p| !p.is_leader()).map(|p| async move {
        loop {
            let Ok(now) = timeout_at(deadline, p.unanswered_appends()).await else {
                return 1;
            };
            if now == 0 || Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(POLL).await;
        }
    });
    join_all(waits).await.into_iter().sum()
}

/// Hands over leadership of every partition this broker leads, waiting at most `timeout`.
/// Does nothing on a broker with no peers, or when `timeout` is zero.
pub async fn drain_leadership(registry: &Registry, transport: &Transport, timeout: Duration) {
    if timeout.is_zero() || transport.broker_ids().iter().all(|&id| id == transport.node_id()) {
        return;
    }
    transport.begin_draining();
    let started = Instant::now();
    let deadline = started + timeout;
    let me = transport.node_id();
    let key = |p: &Partition| (p.topic.clone(), p.index);
    // Every partition led here during the drain, to wait for its held appends after.
    let mut led_here: HashMap<(String, i32), Arc<Partition>> = HashMap::new();
    // Led partitions with no voter left to ask.
    let mut stuck: HashMap<(String, i32), Arc<Partition>> = HashMap::new();
    let leading = |stuck: &HashMap<(String, i32), Arc<Partition>>| -> Vec<Arc<Partition>> {
        registry
            .all_partitions()
            .into_iter()
            .filter(|p| p.is_leader() && !stuck.contains_key(&key(p)))
            .collect()
    };
    let mut leaders = leading(&stuck);
    tracing::info!("controlled shutdown: draining {} partition leaders", leaders.len());
    while !leaders.is_empty() && Instant::now() < deadline {
        for p in &leaders {
            led_here.entry(key(p)).or_insert_with(|| Arc::clone(p));
        }
        // All at once: with thousands of partitions, one round trip each would use the budget.
        let asked = leaders.iter().map(|p| timeout_at(deadline, p.hand_over_leadership()));
        let answers = join_all(asked).await;
        let mut moving = Vec::new();
        let mut ask_soon = false;
        for (p, answer) in leaders.iter().zip(answers) {
            match answer {
                Ok(HandOver::Started(_)) => moving.push(Arc::clone(p)),
                Ok(HandOver::NotNow) | Err(_) => ask_soon = true,
                Ok(HandOver::Never) if p.is_leader() => {
                    tracing::info!(topic = %p.topic, partition = p.index, "controlled shutdown: no in-sync replica to take over; leading until the broker stops");
                    stuck.insert(key(p), Arc::clone(p));
                }
                Ok(HandOver::Never) => {}
            }
        }
        let round_end = (Instant::now() + if ask_soon { RETRY_SOON } else { RETRY_AFTER }).min(deadline);
        let transfers = moving.iter().map(|p| {
            let mut status = p.watch_status();
            async move {
                let _ = timeout_at(round_end, status.wait_for(|s| s.leader != me)).await;
            }
        });
        join_all(transfers).await;
        if ask_soon {
            tokio::time::sleep_until(round_end).await;
        }
        leaders = leading(&stuck);
    }
    let still = leaders.len();
    let unanswered = answer_held_appends(led_here.values(), deadline).await;
    let elapsed = started.elapsed().as_millis();
    let no_successor = stuck.values().filter(|p| p.is_leader()).count();
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
}
