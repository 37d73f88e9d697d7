//! Raft membership steps of one group (add a learner, promote it, remove a member), made on
//! whichever replica leads the group: locally, or by asking that broker over
//! `conveyor.internal.v1.Raft/ChangeMembership`. A step already in effect succeeds at once.
//! The controller sequences these steps into cluster operations
//! ([`crate::controller::membership`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use conveyor_proto::internal::v1::raft_client::RaftClient;
use conveyor_proto::internal::v1::{MembershipChange, MembershipChangeKind};
use conveyor_proto::v1::ErrorDetail;
use prost::Message as _;
use tonic::transport::Channel;

use crate::controller::Registry;
use crate::error::{BrokerError, Result};
use crate::replica::partition::Partition;
use crate::replica::proposal::MemberChange;
use crate::replica::transport::CONTROLLER_TOPIC;

/// Pause between attempts of a step that is not possible yet (an election, a learner
/// catching up): a retry backoff, not a synchronisation.
pub(crate) const RETRY_EVERY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

fn to_member_change(change: &MembershipChange) -> Result<MemberChange> {
    let id = u64::from(change.node_id);
    match MembershipChangeKind::try_from(change.kind) {
        Ok(MembershipChangeKind::AddLearner) => Ok(MemberChange::AddLearner(id)),
        Ok(MembershipChangeKind::Promote) => Ok(MemberChange::Promote(id)),
        Ok(MembershipChangeKind::Remove) => Ok(MemberChange::Remove(id)),
        _ => Err(BrokerError::InvalidRequest(format!(
            "unknown membership change kind {}",
            change.kind
        ))),
    }
}

fn to_request(topic: &str, partition: i32, change: MemberChange) -> MembershipChange {
    let (kind, id) = match change {
        MemberChange::AddLearner(id) => (MembershipChangeKind::AddLearner, id),
        MemberChange::Promote(id) => (MembershipChangeKind::Promote, id),
        MemberChange::Remove(id) => (MembershipChangeKind::Remove, id),
    };
    MembershipChange {
        topic: topic.to_string(),
        partition,
        kind: kind as i32,
        node_id: u32::try_from(id).unwrap_or(0),
    }
}

/// This broker's replica of a group: the controller group or a topic partition.
fn local_group(registry: &Registry, topic: &str, partition: i32) -> Result<std::sync::Arc<Partition>> {
    if topic == CONTROLLER_TOPIC && partition == 0 {
        return Ok(std::sync::Arc::clone(registry.metadata_partition()));
    }
    let t = registry.get(topic)?;
    registry.replica(&t, partition)
}

/// Serves a membership change on this broker's replica, which must lead its group.
pub async fn change_local(registry: &Registry, change: &MembershipChange) -> Result<()> {
    let step = to_member_change(change)?;
    local_group(registry, &change.topic, change.partition)?
        .change_membership(step)
        .await
}

/// What one attempt at a step on some broker came to.
enum Attempt {
    Done,
    /// Not possible yet; `leader` is where to ask next, when the answer said.
    Retry {
        leader: Option<u32>,
        why: String,
    },
    Failed(BrokerError),
}

/// What an error's detail says to do: retry (where its leader hint points, if any) when it
/// is retriable, else give up.
fn classify(detail: &ErrorDetail, error: impl FnOnce() -> BrokerError) -> Attempt {
    if detail.retriable {
        let leader = u32::try_from(detail.leader_id).ok().filter(|&l| l != 0);
        Attempt::Retry {
            leader,
            why: detail.message.clone(),
        }
    } else {
        Attempt::Failed(error())
    }
}

fn classify_local(result: Result<()>) -> Attempt {
    match result {
        Ok(()) => Attempt::Done,
        Err(e) => classify(&e.detail(), || e),
    }
}

fn classify_status(broker: u32, status: &tonic::Status) -> Attempt {
    let mut detail = ErrorDetail::decode(status.details()).unwrap_or_default();
    // Without the broker's own detail (a dropped connection, a timeout) the code decides.
    detail.retriable |= matches!(status.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded);
    detail.message = format!("broker {broker}: {}", status.message());
    let message = detail.message.clone();
    classify(&detail, || BrokerError::InvalidRequest(message))
}

/// A client for broker `broker`'s internal service, connected once per step and reused
/// across its attempts.
async fn connect(registry: &Registry, broker: u32) -> Result<RaftClient<Channel>, Attempt> {
    let Some(address) = registry.transport().raft_address(broker) else {
        return Err(Attempt::Retry {
            leader: None,
            why: format!("no address known for broker {broker}"),
        });
    };
    let endpoint = crate::peer::endpoint(&address, CONNECT_TIMEOUT)
        .map_err(|e| Attempt::Failed(BrokerError::Internal(format!("broker {broker} address: {e}"))))?;
    let channel = endpoint.connect().await.map_err(|e| Attempt::Retry {
        leader: None,
        why: format!("cannot reach broker {broker} at {address}: {e}"),
    })?;
    Ok(RaftClient::new(channel))
}

async fn change_remote(
    registry: &Registry,
    clients: &mut HashMap<u32, RaftClient<Channel>>,
    broker: u32,
    request: MembershipChange,
) -> Attempt {
    let client = match clients.entry(broker) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => match connect(registry, broker).await {
            Ok(client) => e.insert(client),
            Err(attempt) => return attempt,
        },
    };
    match client.change_membership(request).await {
        Ok(_) => Attempt::Done,
        Err(status) => {
            // A broken connection is made again on the next attempt.
            if status.details().is_empty() {
                clients.remove(&broker);
            }
            classify_status(broker, &status)
        }
    }
}

/// Makes one membership change step in a group, on whichever replica leads it, retrying
/// until it is done or `timeout` passes.
pub(crate) async fn change_group(
    registry: &Registry,
    topic: &str,
    partition: i32,
    replicas: &[u32],
    step: MemberChange,
    timeout: Duration,
) -> Result<()> {
    let me = registry.transport().node_id();
    let deadline = Instant::now() + timeout;
    let known_leader = local_group(registry, topic, partition)
        .ok()
        .map(|p| p.leader())
        .filter(|&l| l != 0);
    let mut target = known_leader.or_else(|| replicas.first().copied()).unwrap_or(me);
    let mut guess = 0usize;
    let mut clients = HashMap::new();
    loop {
        let attempt = if target == me {
            match local_group(registry, topic, partition) {
                Ok(p) => classify_local(p.change_membership(step).await),
                Err(e) => classify_local(Err(e)),
            }
        } else {
            change_remote(registry, &mut clients, target, to_request(topic, partition, step)).await
        };
        match attempt {
            Attempt::Done => return Ok(()),
            Attempt::Failed(e) => return Err(e),
            Attempt::Retry { leader, why } => {
                if Instant::now() >= deadline {
                    return Err(BrokerError::MembershipChanging {
                        topic: topic.to_string(),
                        partition,
                        reason: format!("{step:?} did not complete within {timeout:?}: {why}"),
                    });
                }
                tracing::debug!(topic, partition, ?step, %why, "membership step not done yet");
                target = match leader {
                    Some(l) => l,
                    None if !replicas.is_empty() => {
                        // Nobody named a leader: ask each replica in turn.
                        guess += 1;
                        replicas[guess % replicas.len()]
                    }
                    None => target,
                };
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}
