//! Raft messages between brokers, over `conveyor.internal.v1.Raft`.
//!
//! # Design
//! Every peer has one bounded queue and one sender task. Groups hand messages to
//! [`Transport::send`], which never waits: when a peer's queue is full the message is dropped
//! and counted, which Raft tolerates (heartbeats and appends are retried on its own
//! schedule), and which keeps a slow or dead peer from stalling the groups that talk to it.
//! The sender task drains whatever has queued up into one `Send` call, so messages for many
//! groups travel to a peer in one batch, one call in flight per peer (keeping each group's
//! messages in order).
//!
//! On the receiving side every group registers a bounded inbox in the router; a message for
//! a group that is full or not (yet) open here is dropped the same way.
//!
//! # Reports back to the groups
//! Raft tolerates lost messages except one: a leader that sent a snapshot keeps that
//! follower paused until told how it went. So when a `MsgSnapshot` is dropped (its peer's
//! queue full, or the call that carried it failed), the sending group is told through its
//! own inbox, and told too that the peer was unreachable when a call fails (see
//! [`crate::replica::inbound`]). A report that finds the inbox full is dropped like any
//! message: the group then learns at its next leader change, as before.
//!
//! # Liveness
//! A peer is alive while this broker has heard from it (any `Send` it made here) within
//! [`ALIVE_WITHIN`]. Peers also tell their client-facing address in every batch, so any
//! broker can point clients at any other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_proto::internal::v1::raft_client::RaftClient;
use conveyor_proto::internal::v1::raft_server::Raft;
use conveyor_proto::internal::v1::{GroupMessage, MembershipChange, MembershipChanged, RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status};

use crate::metrics::{Counter, Metrics};

/// A peer counts as alive while it was heard from this recently.
pub const ALIVE_WITHIN: Duration = Duration::from_secs(3);
/// Most messages one `Send` call carries.
const MAX_MESSAGES_PER_CALL: usize = 4096;
/// Most bytes one `Send` call carries (the receiver accepts 64 MiB messages).
const MAX_BYTES_PER_CALL: usize = 16 << 20;
/// How long one `Send` call may take before the peer counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed call, so that a dead peer costs one connection attempt per backoff.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// An idle link sends an empty batch this often, well within [`ALIVE_WITHIN`].
const PING_EVERY: Duration = Duration::from_millis(500);
/// The group key of the controller (cluster metadata) group.
pub const CONTROLLER_TOPIC: &str = "__cluster_metadata";

/// Which Raft group a message belongs to: a topic's partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupKey {
    pub topic: String,
    pub partition: i32,
}

impl GroupKey {
    pub fn new(topic: &str, partition: i32) -> GroupKey {
        GroupKey {
            topic: topic.to_string(),
            partition,
        }
    }
}

#[derive(Debug)]
struct Peer {
    address: String,
    queue: mpsc::Sender<(Arc<GroupKey>, Message)>,
    /// Where clients reach this peer, as it last said.
    client_address: Mutex<Option<String>>,
    last_heard: Mutex<Option<Instant>>,
    dropped: Counter,
    /// Set when the broker left the cluster: the sender task ends.
    removed: AtomicBool,
}

impl Peer {
    /// What the peer said its client address is, else its Raft address.
    fn client_address(&self) -> String {
        let said = self
            .client_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        said.unwrap_or_else(|| self.address.clone())
    }
}

/// Peers, their queues, and the router from group keys to local group inboxes.
#[derive(Debug)]
pub struct Transport {
    node_id: u32,
    client_address: String,
    peers: RwLock<BTreeMap<u32, Arc<Peer>>>,
    queue_depth: usize,
    runtime: tokio::runtime::Handle,
    router: Arc<Router>,
    /// Messages that arrived for a group that is full or not open here.
    pub dropped_inbound: Counter,
    metrics: Arc<Metrics>,
    /// Brokers removed from the cluster: what they send is not delivered, and they are told.
    removed: RwLock<BTreeSet<u32>>,
    /// Whether this broker was removed from the cluster, as it has learned.
    standing: Arc<Standing>,
    /// Set once this broker began a controlled shutdown: its replicas hand leadership away
    /// and must not take it back (see `crate::shutdown::drain_leadership`).
    draining: AtomicBool,
}

/// Local groups' inboxes, by group key.
#[derive(Debug, Default)]
struct Router {
    inboxes: RwLock<HashMap<GroupKey, mpsc::Sender<Message>>>,
}

impl Router {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<GroupKey, mpsc::Sender<Message>>> {
        self.inboxes.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<GroupKey, mpsc::Sender<Message>>> {
        self.inboxes.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells a local group that messages it sent to `peer` were lost: a snapshot among them
    /// (`snapshot`), and whether the peer could not be reached at all (`unreachable`).
    fn report_undelivered(&self, key: &GroupKey, peer: u64, snapshot: bool, unreachable: bool) {
        let router = self.read();
        let Some(inbox) = router.get(key) else { return };
        if snapshot && inbox.try_send(crate::replica::inbound::snapshot_dropped(peer)).is_err() {
            tracing::debug!(topic = %key.topic, partition = key.partition, peer, "snapshot failure report dropped: inbox full");
        }
        if unreachable {
            // Best effort: Raft's own probing recovers without it.
            let _ = inbox.try_send(crate::replica::inbound::peer_unreachable(peer));
        }
    }
}

/// What [`Transport::peer_states`] reports per broker.
#[derive(Debug, Clone)]
pub struct PeerState {
    pub id: u32,
    pub address: String,
    pub alive: bool,
    pub queue_depth: usize,
    pub dropped: u64,
}

impl Transport {
    /// `peers` maps every other broker's id to the address its Raft service listens on.
    /// Sender tasks run on the current runtime and end when their peer is removed.
    pub fn start(
        node_id: u32,
        client_address: String,
        peers: &BTreeMap<u32, String>,
        queue_depth: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Transport>> {
        let transport = Arc::new(Transport {
            node_id,
            client_address,
            peers: RwLock::new(BTreeMap::new()),
            queue_depth: queue_depth.max(1),
            runtime: tokio::runtime::Handle::current(),
            router: Arc::default(),
            dropped_inbound: Counter::default(),
            metrics,
            removed: RwLock::new(BTreeSet::new()),
            standing: Arc::default(),
            draining: AtomicBool::new(false),
        });
        for (&id, address) in peers.iter().filter(|(id, _)| **id != node_id) {
            transport.add_peer(id, address)?;
        }
        Ok(transport)
    }

    /// Starts talking to broker `id` at `address`. A broker this one already knows keeps its
    /// address: one named in this broker's own `peers` is reached the way the operator said.
    pub fn add_peer(&self, id: u32, address: &str) -> anyhow::Result<()> {
        if id == self.node_id || self.read_peers().contains_key(&id) {
            return Ok(());
        }
        let endpoint = crate::peer::endpoint(address, CONNECT_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("bad address '{address}' for broker {id}: {e}"))?
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(64 << 20);
        let (tx, rx) = mpsc::channel(self.queue_depth);
        let peer = Arc::new(Peer {
            address: address.to_string(),
            queue: tx,
            client_address: Mutex::new(None),
            last_heard: Mutex::new(None),
            dropped: Counter::default(),
            removed: AtomicBool::new(false),
        });
        self.write_peers().insert(id, Arc::clone(&peer));
        self.runtime.spawn(send_loop(
            Sender {
                me: self.node_id,
                client_address: self.client_address.clone(),
                to: id,
                peer,
                standing: Arc::clone(&self.standing),
                router: Arc::clone(&self.router),
            },
            endpoint,
            rx,
        ));
        tracing::info!(peer = id, %address, "raft peer added");
        Ok(())
    }

    /// Stops talking to broker `id` (it left the cluster).
    pub fn remove_peer(&self, id: u32) {
        self.standing.forget_peer(self.node_id, id);
        if let Some(peer) = self.write_peers().remove(&id) {
            peer.removed.store(true, Ordering::Relaxed);
            tracing::info!(peer = id, "raft peer removed");
        }
    }

    /// Records that broker `id` left the cluster: this broker stops talking to it and tells
    /// it so if it speaks; if `id` is this broker, it stops serving.
    pub fn mark_removed(&self, id: u32) {
        if id == self.node_id {
            self.standing.log_said(id, true);
            return;
        }
        self.removed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        self.remove_peer(id);
    }

    /// Records that broker `id` is (again) a member: a broker removed earlier may come back
    /// under its id, with its data wiped, through `--join` and add-node.
    pub fn mark_registered(&self, id: u32) {
        if id == self.node_id {
            self.standing.log_said(id, false);
            return;
        }
        self.removed
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }

    fn is_removed(&self, id: u32) -> bool {
        self.removed
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&id)
    }

    /// Whether this broker was removed from the cluster.
    pub fn removed_from_cluster(&self) -> bool {
        self.standing.removed.load(Ordering::Relaxed)
    }

    /// Marks this broker as shutting down: from now on its replicas neither campaign nor
    /// accept leadership handed to them. Never undone; the process exits after it.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether this broker is in a controlled shutdown.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The address this broker sends Raft messages for broker `id` to.
    pub fn raft_address(&self, id: u32) -> Option<String> {
        if id == self.node_id {
            return Some(self.client_address.clone());
        }
        self.read_peers().get(&id).map(|p| p.address.clone())
    }

    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u32, Arc<Peer>>> {
        self.peers.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_peers(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, Arc<Peer>>> {
        self.peers.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn node_id(&self) -> u32 {
        self.node_id
    }

    /// Queues each message for its peer without waiting; drops it if the queue is full.
    pub fn send(&self, key: &Arc<GroupKey>, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let peers = self.read_peers();
        for message in messages {
            let Some(peer) = u32::try_from(message.to).ok().and_then(|to| peers.get(&to)) else {
                tracing::debug!(to = message.to, "raft message for an unknown broker dropped");
                continue;
            };
            let (to, snapshot) = (message.to, message.get_msg_type() == MessageType::MsgSnapshot);
            if peer.queue.try_send((Arc::clone(key), message)).is_err() {
                peer.dropped.add(1);
                self.metrics.raft_messages_dropped.add(1);
                if snapshot {
                    self.router.report_undelivered(key, to, true, false);
                }
            }
        }
    }

    /// Registers a local group's inbox; messages for it are routed there from now on.
    pub fn register(&self, key: GroupKey, inbox: mpsc::Sender<Message>) {
        self.router.write().insert(key, inbox);
    }

    pub fn deregister(&self, key: &GroupKey) {
        self.router.write().remove(key);
    }

    fn deliver(&self, from: u32, from_address: String, messages: Vec<GroupMessage>) -> u32 {
        if let Some(peer) = self.read_peers().get(&from) {
            *peer
                .last_heard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
            if !from_address.is_empty() {
                *peer
                    .client_address
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(from_address);
            }
        }
        let router = self.router.read();
        let mut dropped = 0;
        let mut key = GroupKey::new("", 0);
        for m in messages {
            let message = match Message::parse_from_carllerche_bytes(&m.message) {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(from, topic = %m.topic, partition = m.partition, error = %e, "undecodable raft message dropped");
                    dropped += 1;
                    continue;
                }
            };
            if crate::replica::inbound::is_local(message.get_msg_type()) {
                // Only this process reports on its own deliveries.
                dropped += 1;
                continue;
            }
            key.topic = m.topic;
            key.partition = m.partition;
            match router.get(&key) {
                Some(inbox) if inbox.try_send(message).is_ok() => {}
                _ => dropped += 1,
            }
        }
        if dropped > 0 {
            self.dropped_inbound.add(u64::from(dropped));
        }
        dropped
    }

    /// The client-facing address of broker `id`, if known: this broker's own, or what the
    /// peer said, or its configured Raft address (the same port unless a proxy sits between).
    pub fn client_address(&self, id: u32) -> Option<String> {
        if id == self.node_id {
            return Some(self.client_address.clone());
        }
        self.read_peers().get(&id).map(|p| p.client_address())
    }

    /// Every broker of the cluster, this one included, with liveness as this broker sees it.
    pub fn peer_states(&self) -> Vec<PeerState> {
        let mut states = vec![PeerState {
            id: self.node_id,
            address: self.client_address.clone(),
            alive: true,
            queue_depth: 0,
            dropped: 0,
        }];
        for (&id, peer) in self.read_peers().iter() {
            let heard = *peer
                .last_heard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            states.push(PeerState {
                id,
                address: peer.client_address(),
                alive: heard.is_some_and(|t| t.elapsed() < ALIVE_WITHIN),
                queue_depth: peer.queue.max_capacity() - peer.queue.capacity(),
                dropped: peer.dropped.get(),
            });
        }
        states.sort_by_key(|s| s.id);
        states
    }

    /// Ids of every broker in the cluster, this one included, ascending.
    pub fn broker_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.read_peers().keys().copied().collect();
        ids.push(self.node_id);
        ids.sort_unstable();
        ids
    }

    pub fn is_alive(&self, id: u32) -> bool {
        id == self.node_id
            || self.read_peers().get(&id).is_some_and(|p| {
                p.last_heard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .is_some_and(|t| t.elapsed() < ALIVE_WITHIN)
            })
    }
}

/// Whether this broker counts as removed from the cluster. A removed broker rarely sees its
/// own `BrokerRemoved` (the controller stops replicating to it), so its peers tell it, in
/// their answers to its Raft traffic. A peer behind on the metadata log may answer
/// otherwise for a while, so peers decide by majority of those that answered; this broker's
/// own log, when it says "removed", decides alone. A broker removed and then added again
/// under its id (data wiped, `--join`, add-node) is a member again once its peers and its
/// log say so.
#[derive(Debug, Default)]
struct Standing {
    said: Mutex<Said>,
    removed: AtomicBool,
}

#[derive(Debug, Default)]
struct Said {
    /// Each peer's latest answer: does it count this broker as removed?
    peers: HashMap<u32, bool>,
    /// What this broker's own metadata log said about it last: removed (true) or registered.
    log: Option<bool>,
}

impl Standing {
    fn peer_said(&self, me: u32, peer: u32, removed: bool) {
        let mut said = self.said.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if said.peers.insert(peer, removed) != Some(removed) {
            self.settle(me, &said);
        }
    }

    fn log_said(&self, me: u32, removed: bool) {
        let mut said = self.said.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        said.log = Some(removed);
        self.settle(me, &said);
    }

    fn forget_peer(&self, me: u32, peer: u32) {
        let mut said = self.said.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if said.peers.remove(&peer).is_some() {
            self.settle(me, &said);
        }
    }

    fn settle(&self, me: u32, said: &Said) {
        let saying = said.peers.values().filter(|r| **r).count();
        let removed = said.log == Some(true) || saying * 2 > said.peers.len();
        if self.removed.swap(removed, Ordering::Relaxed) == removed {
            return;
        }
        if removed {
            tracing::error!(
                broker = me,
                "this broker was removed from the cluster (cluster remove-node); it holds no replicas and refuses requests: stop it"
            );
        } else {
            tracing::info!(broker = me, "this broker is a member of the cluster");
        }
    }
}

/// Who a send loop sends for and to.
struct Sender {
    me: u32,
    client_address: String,
    to: u32,
    peer: Arc<Peer>,
    /// What this broker knows of its own membership, which peers' answers update.
    standing: Arc<Standing>,
    /// Where to report messages a failed call lost.
    router: Arc<Router>,
}

/// The groups one call carries messages for, and whether a snapshot is among them.
#[derive(Default)]
struct Sent {
    groups: HashMap<Arc<GroupKey>, bool>,
}

impl Sent {
    fn add(&mut self, key: &Arc<GroupKey>, snapshot: bool) {
        *self.groups.entry(Arc::clone(key)).or_default() |= snapshot;
    }

    /// The call failed: each group learns that the peer was unreachable, and which of its
    /// snapshots were lost.
    fn report_lost(&self, router: &Router, peer: u64) {
        for (key, &snapshot) in &self.groups {
            router.report_undelivered(key, peer, snapshot, true);
        }
    }
}

async fn send_loop(sender: Sender, endpoint: Endpoint, mut queue: mpsc::Receiver<(Arc<GroupKey>, Message)>) {
    let Sender {
        me,
        client_address,
        to,
        peer,
        standing,
        router,
    } = sender;
    let mut client = RaftClient::new(endpoint.connect_lazy())
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20);
    let mut failing = false;
    while !peer.removed.load(Ordering::Relaxed) {
        // An idle peer still gets an empty batch now and then: that is how brokers that share
        // no busy group know each other alive.
        let first = match tokio::time::timeout(PING_EVERY, queue.recv()).await {
            Ok(Some(first)) => Some(first),
            Ok(None) => return,
            Err(_) => None,
        };
        let mut messages = Vec::new();
        let mut sent_for = Sent::default();
        let mut bytes = 0;
        let mut next = first;
        while let Some((key, message)) = next.take() {
            sent_for.add(&key, message.get_msg_type() == MessageType::MsgSnapshot);
            match message.write_to_bytes() {
                Ok(encoded) => {
                    bytes += encoded.len();
                    messages.push(GroupMessage {
                        topic: key.topic.clone(),
                        partition: key.partition,
                        message: Bytes::from(encoded),
                    });
                }
                Err(e) => tracing::error!(to, error = %e, "cannot encode a raft message"),
            }
            if messages.len() < MAX_MESSAGES_PER_CALL && bytes < MAX_BYTES_PER_CALL {
                next = queue.try_recv().ok();
            }
        }
        let batch = RaftBatch {
            from: me,
            from_address: client_address.clone(),
            messages,
        };
        match tokio::time::timeout(CALL_TIMEOUT, client.send(batch)).await {
            Ok(Ok(ack)) => {
                standing.peer_said(me, to, ack.into_inner().sender_removed);
                if failing {
                    tracing::info!(peer = to, address = %peer.address, "reaching broker again");
                    failing = false;
                }
            }
            Ok(Err(status)) => {
                sent_for.report_lost(&router, u64::from(to));
                if !failing {
                    tracing::warn!(peer = to, address = %peer.address, error = %status.message(), "cannot reach broker; raft messages to it are dropped until it answers");
                    failing = true;
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
            Err(_) => {
                sent_for.report_lost(&router, u64::from(to));
                if !failing {
                    tracing::warn!(peer = to, address = %peer.address, "broker did not answer in time; raft messages to it are dropped until it answers");
                    failing = true;
                }
                tokio::time::sleep(RETRY_BACKOFF).await;
            }
        }
    }
}

/// The receiving side: `conveyor.internal.v1.Raft`.
#[derive(Debug, Clone)]
pub struct RaftService {
    pub transport: Arc<Transport>,
    pub registry: Arc<crate::controller::Registry>,
    /// The metadata change lock the admin service holds too: producer id blocks are
    /// allocated under it.
    pub admin_lock: Arc<tokio::sync::Mutex<()>>,
}

#[tonic::async_trait]
impl Raft for RaftService {
    async fn send(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let batch = request.into_inner();
        if self.transport.is_removed(batch.from) {
            return Ok(Response::new(RaftAck {
                dropped: batch.messages.len() as u32,
                sender_removed: true,
            }));
        }
        let dropped = self.transport.deliver(batch.from, batch.from_address, batch.messages);
        Ok(Response::new(RaftAck {
            dropped,
            sender_removed: false,
        }))
    }

    async fn change_membership(
        &self,
        request: Request<MembershipChange>,
    ) -> Result<Response<MembershipChanged>, Status> {
        let change = request.into_inner();
        crate::replica::membership::change_local(&self.registry, &change)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(MembershipChanged {}))
    }

    async fn allocate_producer_ids(
        &self,
        request: Request<conveyor_proto::internal::v1::AllocateProducerIdsRequest>,
    ) -> Result<Response<conveyor_proto::internal::v1::ProducerIdBlock>, Status> {
        let broker = request.into_inner().broker;
        let block = self
            .registry
            .allocate_producer_ids(&self.admin_lock, broker)
            .await
            .map_err(Status::from)?;
        Ok(Response::new(block))
    }

    async fn ensure_internal_topic(
        &self,
        request: Request<conveyor_proto::internal::v1::InternalTopicRequest>,
    ) -> Result<Response<conveyor_proto::internal::v1::InternalTopicResponse>, Status> {
        let r = request.into_inner();
        self.registry
            .ensure_internal_topic(
                &self.admin_lock,
                &r.name,
                r.partitions,
                r.replication_factor,
                if r.dead_letter {
                    crate::coordinator::internal_topic::TopicKind::DeadLetter
                } else {
                    crate::coordinator::internal_topic::TopicKind::Internal
                },
            )
            .await
            .map_err(Status::from)?;
        Ok(Response::new(conveyor_proto::internal::v1::InternalTopicResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::MessageType;

    use super::*;

    /// A loopback port nothing listens on: calls to it fail at once.
    const UNREACHABLE: &str = "127.0.0.1:1";
    /// Bounds the wait for a report that arrives within one failed call.
    const REPORT_WITHIN: Duration = Duration::from_secs(10);

    fn message(kind: MessageType, to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.from = 1;
        m.to = to;
        m
    }

    fn transport(queue_depth: usize) -> Arc<Transport> {
        let peers = BTreeMap::from([(2, UNREACHABLE.to_string())]);
        Transport::start(1, "127.0.0.1:0".into(), &peers, queue_depth, Arc::default()).expect("transport")
    }

    /// The next message in `inbox` of `kind`, skipping others.
    async fn next_of(inbox: &mut mpsc::Receiver<Message>, kind: MessageType) -> Message {
        tokio::time::timeout(REPORT_WITHIN, async {
            loop {
                let m = inbox.recv().await.expect("inbox open");
                if m.get_msg_type() == kind {
                    return m;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {kind:?} report"))
    }

    #[tokio::test]
    async fn given_a_snapshot_lost_in_a_failed_call_should_tell_the_sending_group_and_that_the_peer_is_unreachable() {
        let transport = transport(64);
        let key = Arc::new(GroupKey::new("t", 0));
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        transport.register(GroupKey::clone(&key), inbox_tx);
        transport.send(&key, vec![message(MessageType::MsgSnapshot, 2)]);
        let report = next_of(&mut inbox, MessageType::MsgSnapStatus).await;
        assert_eq!((report.from, report.reject), (2, true), "a failed snapshot to broker 2");
        let report = next_of(&mut inbox, MessageType::MsgUnreachable).await;
        assert_eq!(report.from, 2);
    }

    #[tokio::test]
    async fn given_a_full_peer_queue_a_dropped_snapshot_should_be_reported_at_once() {
        // One slot, and the sender task cannot run before this test yields: the second
        // message finds the queue full.
        let transport = transport(1);
        let key = Arc::new(GroupKey::new("t", 0));
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        transport.register(GroupKey::clone(&key), inbox_tx);
        transport.send(
            &key,
            vec![message(MessageType::MsgAppend, 2), message(MessageType::MsgSnapshot, 2)],
        );
        let report = inbox.try_recv().expect("reported before send returned");
        assert_eq!(report.get_msg_type(), MessageType::MsgSnapStatus);
        assert_eq!((report.from, report.reject), (2, true));
    }

    #[test]
    fn local_message_types_from_the_wire_are_not_delivered() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let transport = transport(64);
        let (inbox_tx, mut inbox) = mpsc::channel(16);
        transport.register(GroupKey::new("t", 0), inbox_tx);
        let wire = |kind| GroupMessage {
            topic: "t".into(),
            partition: 0,
            message: Bytes::from(message(kind, 1).write_to_bytes().expect("encode")),
        };
        let dropped = transport.deliver(
            2,
            String::new(),
            vec![wire(MessageType::MsgSnapStatus), wire(MessageType::MsgHeartbeat)],
        );
        assert_eq!(dropped, 1);
        assert_eq!(
            inbox.try_recv().expect("heartbeat").get_msg_type(),
            MessageType::MsgHeartbeat
        );
        assert!(inbox.try_recv().is_err());
    }
}
