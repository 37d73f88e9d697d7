//! What the client knows of the cluster: broker addresses, partition leaders, and one
//! channel per broker.
//!
//! Leaders are learned from `Metadata` and from the leader hints in `NOT_LEADER` errors; a
//! retriable failure forgets the partition's leader, so the next request looks it up again.
//! Calls that any broker can answer fail over along the bootstrap list and every broker
//! learned since.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use conveyor_proto::v1::admin_client::AdminClient;
use conveyor_proto::v1::{BrokerInfo, ErrorCode, MetadataRequest};
use tonic::transport::Channel;

use crate::connection::{self, endpoint};

/// How long a metadata lookup waits for one broker before asking the next.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
use crate::error::{ClientError, Result};

/// Attempts a leader-routed call makes (refreshing the leader in between) before failing.
pub(crate) const LEADER_ATTEMPTS: u32 = 40;
pub(crate) const LEADER_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct State {
    /// The broker `any` calls go to.
    current: (String, Channel),
    /// Every address known: bootstrap first, then brokers learned from metadata.
    addresses: Vec<String>,
    channels: HashMap<String, Channel>,
    brokers: HashMap<i32, String>,
    /// Topic → partition → leader id; looked up by `&str`, so routing a batch allocates
    /// nothing.
    leaders: HashMap<String, HashMap<i32, i32>>,
    replicas: HashMap<String, HashMap<i32, Vec<i32>>>,
    partition_counts: HashMap<String, u32>,
    /// Leaders set by `assume_leader` stay whatever errors say: a test's fake broker has
    /// no metadata service to learn them again from.
    #[cfg(test)]
    pinned: bool,
}

#[derive(Debug)]
pub(crate) struct Cluster {
    state: Mutex<State>,
}

/// A partition's leader as the client believes it.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub address: String,
    pub channel: Channel,
}

impl Cluster {
    pub(crate) fn new(bootstrap: Vec<String>, address: String, channel: Channel) -> Cluster {
        let state = State {
            current: (address.clone(), channel.clone()),
            addresses: bootstrap,
            channels: HashMap::from([(address, channel)]),
            brokers: HashMap::new(),
            leaders: HashMap::new(),
            replicas: HashMap::new(),
            partition_counts: HashMap::new(),
            #[cfg(test)]
            pinned: false,
        };
        Cluster {
            state: Mutex::new(state),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn current(&self) -> (String, Channel) {
        self.state().current.clone()
    }

    pub(crate) fn channel_to(&self, address: &str) -> Channel {
        let mut state = self.state();
        // Looked up on every route: the key is only allocated for a new address.
        if let Some(channel) = state.channels.get(address) {
            return channel.clone();
        }
        let channel = lazy_channel(address);
        state.channels.insert(address.to_string(), channel.clone());
        channel
    }

    /// Runs `call` against the current broker; if it cannot be reached (or was removed from
    /// the cluster), against the next reachable one, until every known address was tried.
    pub(crate) async fn any<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let (address, channel) = self.current();
        let mut last = match call(channel).await {
            Err(e) if ask_another(&e) => e.at(&address),
            other => return other,
        };
        self.forget_if_removed(&address, &last);
        let candidates: Vec<String> = self
            .state()
            .addresses
            .iter()
            .filter(|a| **a != address)
            .cloned()
            .collect();
        for candidate in candidates {
            let channel = match connection::connect(&candidate).await {
                Ok((channel, _)) => channel,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            self.state().channels.insert(candidate.clone(), channel.clone());
            match call(channel.clone()).await {
                Err(e) if ask_another(&e) => {
                    self.forget_if_removed(&candidate, &e);
                    last = e.at(&candidate);
                }
                other => {
                    // The broker that answered is the one to ask first from now on.
                    self.state().current = (candidate, channel);
                    return other;
                }
            }
        }
        Err(last)
    }

    /// A broker removed from the cluster stays out of the addresses tried, as long as
    /// another one is left to try.
    fn forget_if_removed(&self, address: &str, error: &ClientError) {
        if error.code() != Some(ErrorCode::BrokerRemoved) {
            return;
        }
        let mut state = self.state();
        if state.addresses.len() > 1 {
            state.addresses.retain(|a| a != address);
        }
    }

    /// Tells the cluster view that `address` leads every partition of a `partitions`-partition
    /// topic, so a test needs no metadata service.
    #[cfg(test)]
    pub(crate) fn assume_leader(&self, topic: &str, partitions: u32, address: &str) {
        let mut state = self.state();
        state.pinned = true;
        state.brokers.insert(1, address.to_string());
        state.partition_counts.insert(topic.to_string(), partitions);
        let leaders = state.leaders.entry(topic.to_string()).or_default();
        for p in 0..partitions as i32 {
            leaders.insert(p, 1);
        }
    }

    /// Refreshes brokers and the leaders of `topic`'s partitions.
    pub(crate) async fn refresh(&self, topic: &str) -> Result<()> {
        let request = MetadataRequest {
            topics: vec![topic.to_string()],
        };
        let response = self
            .any(|channel| {
                let request = request.clone();
                // A broker that is stopped (SIGSTOP, a frozen VM) keeps its connection open:
                // without a deadline the lookup would wait for the keep-alive to give up. One
                // that dies mid-call (SIGKILL) is unreachable: the next broker is asked, and
                // a producer routing a batch retries it instead of failing it.
                async move {
                    let mut grpc = AdminClient::new(channel);
                    answer_within(METADATA_TIMEOUT, "a metadata request", grpc.metadata(request)).await
                }
            })
            .await?;
        self.learn_brokers(response.brokers);
        let mut guard = self.state();
        let state = &mut *guard;
        for t in response.topics {
            state.partition_counts.insert(t.name.clone(), t.partitions.len() as u32);
            let leaders = state.leaders.entry(t.name.clone()).or_default();
            let replicas = state.replicas.entry(t.name.clone()).or_default();
            for p in t.partitions {
                if p.leader > 0 {
                    leaders.insert(p.partition, p.leader);
                } else {
                    leaders.remove(&p.partition);
                }
                replicas.insert(p.partition, p.replicas);
            }
        }
        Ok(())
    }

    /// Brokers of the cluster known so far (from metadata), at least one.
    pub(crate) fn broker_count(&self) -> usize {
        self.state().brokers.len().max(1)
    }

    /// Records the members of the cluster and where they are.
    pub(crate) fn learn_brokers(&self, brokers: Vec<BrokerInfo>) {
        let mut state = self.state();
        for b in brokers {
            if !state.addresses.contains(&b.address) {
                state.addresses.push(b.address.clone());
            }
            state.brokers.insert(b.id, b.address);
        }
    }

    pub(crate) fn cached_partition_count(&self, topic: &str) -> Option<u32> {
        self.state().partition_counts.get(topic).copied()
    }

    /// The leader of a partition, looked up if not known. When no broker knows the leader
    /// (an election is under way) the preferred replica is the best guess: it answers with
    /// a hint or a retriable error.
    pub(crate) async fn route(&self, topic: &str, partition: i32) -> Result<Route> {
        if let Some(route) = self.cached_route(topic, partition) {
            return Ok(route);
        }
        self.refresh(topic).await?;
        if let Some(route) = self.cached_route(topic, partition) {
            return Ok(route);
        }
        let guess = {
            let state = self.state();
            let count = state.partition_counts.get(topic).copied();
            if count.is_some_and(|n| partition < 0 || partition as u32 >= n) {
                return Err(ClientError::InvalidArgument(format!(
                    "topic '{topic}' has no partition {partition}"
                )));
            }
            state
                .replicas
                .get(topic)
                .and_then(|t| t.get(&partition))
                .and_then(|r| r.first())
                .and_then(|id| state.brokers.get(id).cloned())
        };
        match guess {
            Some(address) => Ok(Route {
                channel: self.channel_to(&address),
                address,
            }),
            None => {
                let (address, channel) = self.current();
                Ok(Route { address, channel })
            }
        }
    }

    /// The address of a partition's leader, if known, without looking it up.
    fn cached_address(&self, topic: &str, partition: i32) -> Option<String> {
        let state = self.state();
        let broker = state.leaders.get(topic)?.get(&partition)?;
        state.brokers.get(broker).cloned()
    }

    fn cached_route(&self, topic: &str, partition: i32) -> Option<Route> {
        let address = self.cached_address(topic, partition)?;
        Some(Route {
            channel: self.channel_to(&address),
            address,
        })
    }

    /// Runs `call` against a partition's leader, following leader changes: a retriable
    /// failure updates the route and tries again, up to [`LEADER_ATTEMPTS`] times.
    pub(crate) async fn with_leader<T, F, Fut>(&self, topic: &str, partition: i32, call: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = match self.route(topic, partition).await {
                Ok(route) => call(route.channel).await,
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retriable() && attempt < LEADER_ATTEMPTS => {
                    self.on_error(topic, partition, &e);
                    tokio::time::sleep(LEADER_BACKOFF).await;
                }
                other => return other,
            }
        }
    }

    /// Learns from a failed partition request: a leader hint moves the route there; any
    /// other retriable failure forgets the route, except `BUSY`: a leader short of memory
    /// still leads, and the retry after the backoff goes to it again.
    pub(crate) fn on_error(&self, topic: &str, partition: i32, error: &ClientError) {
        let mut state = self.state();
        #[cfg(test)]
        if state.pinned {
            return;
        }
        if let ClientError::Broker { detail: Some(d), .. } = error
            && ErrorCode::try_from(d.code) == Ok(ErrorCode::NotLeader)
            && d.leader_id > 0
            && !d.leader_address.is_empty()
        {
            state.brokers.insert(d.leader_id, d.leader_address.clone());
            if !state.addresses.contains(&d.leader_address) {
                state.addresses.push(d.leader_address.clone());
            }
            state
                .leaders
                .entry(topic.to_string())
                .or_default()
                .insert(partition, d.leader_id);
            return;
        }
        if error.is_retriable()
            && error.code() != Some(ErrorCode::Busy)
            && let Some(leaders) = state.leaders.get_mut(topic)
        {
            leaders.remove(&partition);
        }
    }
}

/// The answer to `call` (to one broker, through [`Cluster::any`]), `what` naming it. No answer
/// within `limit`, or a connection broken mid-call, is [`ClientError::Unreachable`]: another
/// broker to ask, not a refusal.
pub(crate) async fn answer_within<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Ok(answer) => answer
            .map(tonic::Response::into_inner)
            .map_err(|status| ClientError::from_call(status, "")),
        Err(_) => Err(ClientError::Unreachable {
            address: String::new(),
            reason: format!("no answer to {what} within {limit:?}"),
        }),
    }
}

/// Whether a call that failed this way is worth making again on another broker.
fn ask_another(e: &ClientError) -> bool {
    matches!(e, ClientError::Unreachable { .. }) || e.code() == Some(ErrorCode::BrokerRemoved)
}

fn lazy_channel(address: &str) -> Channel {
    match endpoint(address) {
        Ok(e) => e.connect_lazy(),
        // A malformed address from a broker: a channel whose every call fails as unreachable.
        Err(_) => tonic::transport::Endpoint::from_static("http://0.0.0.0:1").connect_lazy(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorDetail;

    fn error(code: ErrorCode) -> ClientError {
        ClientError::from_detail(ErrorDetail {
            code: code as i32,
            retriable: true,
            ..ErrorDetail::default()
        })
    }

    #[tokio::test]
    async fn a_busy_leader_keeps_its_route_while_other_retriable_errors_forget_it() {
        let address = "127.0.0.1:1".to_string();
        let cluster = Cluster::new(vec![address.clone()], address.clone(), lazy_channel(&address));
        let leads = |cluster: &Cluster| cluster.state().leaders.get("t").and_then(|l| l.get(&0)).copied();
        cluster.state().leaders.entry("t".into()).or_default().insert(0, 1);
        cluster.on_error("t", 0, &error(ErrorCode::Busy));
        assert_eq!(leads(&cluster), Some(1), "a busy leader still leads");
        cluster.on_error("t", 0, &error(ErrorCode::LeaderNotAvailable));
        assert_eq!(leads(&cluster), None, "a lost leader is looked up again");
    }
    /// A broker that accepts connections and drops them at once, as a SIGKILLed one whose
    /// socket is still being torn down does.
    async fn dropping_broker() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        address
    }

    #[tokio::test]
    async fn a_metadata_lookup_cut_off_by_a_dying_broker_fails_retriably() {
        let address = dropping_broker().await;
        let cluster = Cluster::new(vec![address.clone()], address.clone(), lazy_channel(&address));
        let error = cluster.refresh("t").await.expect_err("no broker answers");
        assert!(error.is_retriable(), "{error:?}");
    }
}
