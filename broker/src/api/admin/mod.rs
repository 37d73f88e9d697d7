//! The `Admin` service: topics, cluster description and leadership.
//!
//! Any broker takes any admin request. Topic changes go to the controller: a broker that is
//! not the controller forwards the request there (once: a forwarded request is never
//! forwarded again, so a stale view cannot make a loop). Descriptions answer from this
//! broker's view and ask each partition's leader for what only the leader knows (in-sync
//! replicas, log end offset).
//!
//! # Deadlines
//! Every call answers in bounded time. Topic changes hold the metadata change lock only to
//! check and propose one record (each bounded, see [`crate::controller::admin_ops`]); membership calls
//! run their operation as a background job and answer within [`MEMBERSHIP_CALL_WAIT`] (or
//! the caller's shorter `grpc-timeout`) with the outcome, or with a retriable error naming
//! the step under way; a forwarded call waits for the controller at most
//! [`FORWARD_TIMEOUT`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::admin_client::AdminClient;
use conveyor_proto::v1::admin_server::Admin;
use conveyor_proto::v1::*;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::Context;
use crate::api::forward::{CONNECT_TIMEOUT, connect, forward, forwarded, own_description};
use crate::controller::Topic;
use crate::controller::admin_ops::{self, ChangeContext, Jobs, Operation};
use crate::controller::{membership, rebalance};
use crate::error::BrokerError;
use crate::replica::partition::Partition;

const FORWARD_CONNECT_TIMEOUT: Duration = CONNECT_TIMEOUT;
/// How long a description waits for a partition leader's own view.
const DESCRIBE_ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long metadata waits for another broker's view of the partitions it has no replica of.
const METADATA_ASK_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a leader transfer may take before the request fails.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a membership call waits for its operation before answering with its progress.
pub const MEMBERSHIP_CALL_WAIT: Duration = Duration::from_secs(20);
/// How long a call forwarded to the controller may take: above everything the controller
/// itself waits for (a membership call's wait, a topic change's lock and proposal).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);
/// The share of a caller's `grpc-timeout` a membership call waits, leaving the rest for the
/// answer to travel back before the caller gives up.
const CALLER_DEADLINE_SHARE: f64 = 0.8;
/// How long `cluster info` waits for another broker's own report.
const CLUSTER_ASK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct AdminService {
    pub ctx: Arc<Context>,
    /// The membership operation running on this broker (as the controller).
    jobs: Arc<Jobs>,
}

/// How long a membership call may wait for its operation: [`MEMBERSHIP_CALL_WAIT`], or less
/// when the caller's deadline (the `grpc-timeout` header) is shorter.
fn membership_wait<T>(request: &Request<T>) -> Duration {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(MEMBERSHIP_CALL_WAIT, |d| {
            MEMBERSHIP_CALL_WAIT.min(d.mul_f64(CALLER_DEADLINE_SHARE))
        })
}

/// A `grpc-timeout` value: an integer of at most 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at_checked(split)?;
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Waits at most [`FORWARD_TIMEOUT`] for a call forwarded to the controller.
async fn forwarded_call<T>(
    controller: u32,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    tokio::time::timeout(FORWARD_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(BrokerError::TimedOut {
            what: format!("the call forwarded to the controller (broker {controller})"),
            after: FORWARD_TIMEOUT,
            state: "the controller did not answer; it may be stopped or overloaded, and what the call asked may still take effect".into(),
        }
        .into())
    })
}

fn to_wire_moves(moves: Vec<membership::ReplicaMove>) -> Vec<ReplicaMove> {
    moves
        .into_iter()
        .map(|m| ReplicaMove {
            topic: m.topic,
            partition: m.partition,
            from: m.from as i32,
            to: m.to as i32,
        })
        .collect()
}

fn to_i32(ids: &[u32]) -> Vec<i32> {
    ids.iter().map(|&i| i as i32).collect()
}

impl AdminService {
    pub fn new(ctx: Arc<Context>) -> AdminService {
        AdminService {
            ctx,
            jobs: Arc::default(),
        }
    }

    /// Runs a membership operation as a background job (see [`Jobs::run`]); `work` gets the
    /// change context.
    async fn membership_job<F, Fut>(&self, operation: Operation, wait: Duration, work: F) -> admin_ops::Outcome
    where
        F: FnOnce(Arc<Context>, Arc<admin_ops::Progress>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = admin_ops::Outcome> + Send + 'static,
    {
        let ctx = Arc::clone(&self.ctx);
        let outcome = self
            .jobs
            .run(operation, wait, move |progress| work(ctx, progress))
            .await;
        if let Err(status) = &outcome {
            self.ctx.metrics.request_failed_status(status);
            tracing::info!(error = %status.message(), "membership request not done");
        }
        outcome
    }

    /// This broker's view of one partition: complete where it leads, partial elsewhere.
    fn describe_partition(&self, topic: &Topic, index: i32) -> PartitionDescription {
        let replicas = to_i32(&topic.assignments[index as usize]);
        match topic.local.get(&index) {
            Some(p) => {
                let status = p.status();
                let view = p.raft_view();
                let ids = |v: &[u64]| v.iter().map(|&i| i as i32).collect::<Vec<_>>();
                PartitionDescription {
                    partition: index,
                    leader: status.leader as i32,
                    replicas,
                    in_sync: to_i32(&status.in_sync()),
                    log_start_offset: p.log().log_start_offset(),
                    high_watermark: p.high_watermark(),
                    log_end_offset: p.log().log_end_offset(),
                    size_bytes: p.log().size_bytes(),
                    replica_state: match status.failure {
                        Some(reason) => format!("stopped: {reason}"),
                        None => "running".into(),
                    },
                    voters: ids(&view.conf_state.voters),
                    learners: ids(&view.conf_state.learners),
                    voters_outgoing: ids(&view.conf_state.voters_outgoing),
                    learners_next: ids(&view.conf_state.learners_next),
                    term: status.term,
                    applied_index: view.applied,
                }
            }
            None => PartitionDescription {
                partition: index,
                leader: 0,
                replicas,
                // A replica placed here that could not be opened (retried by the applier).
                replica_state: topic
                    .unopened
                    .get(&index)
                    .map(|u| format!("stopped: {}", u.reason))
                    .unwrap_or_default(),
                ..PartitionDescription::default()
            },
        }
    }

    fn describe_local(&self, topic: &Topic) -> TopicDescription {
        TopicDescription {
            name: topic.name.clone(),
            configs: topic.effective.to_map().into_iter().collect(),
            replication_factor: topic.replication_factor,
            topic_id: topic.id.clone(),
            partitions: (0..topic.partition_count() as i32)
                .map(|i| self.describe_partition(topic, i))
                .collect(),
        }
    }

    /// The description with every partition as its leader sees it, where the leader answers.
    async fn describe(&self, topic: &Topic, local_only: bool) -> TopicDescription {
        let me = self.ctx.node_id as i32;
        let mut description = self.describe_local(topic);
        if local_only {
            return description;
        }
        // Where this broker does not lead, ask the leader it knows of, or the preferred one.
        let mut ask: BTreeSet<u32> = BTreeSet::new();
        for p in &description.partitions {
            if p.leader != me {
                let guess = if p.leader > 0 {
                    p.leader
                } else {
                    p.replicas.first().copied().unwrap_or(0)
                };
                if guess > 0 && guess != me {
                    ask.insert(guess as u32);
                }
            }
        }
        for broker in ask {
            // A leader that stopped answering (paused, partitioned) must not hang the
            // description: its partitions keep this broker's view.
            let transport = self.ctx.registry.transport();
            let wait = FORWARD_CONNECT_TIMEOUT + DESCRIBE_ASK_TIMEOUT;
            let Some(theirs) = own_description(transport, broker, &topic.name, wait).await else {
                continue;
            };
            for p in theirs.partitions {
                if p.leader == broker as i32
                    && let Some(slot) = description.partitions.get_mut(p.partition as usize)
                {
                    let ours = std::mem::take(&mut slot.replica_state);
                    *slot = p;
                    slot.replica_state = ours;
                }
            }
        }
        description
    }

    /// Fills in the leaders of partitions this broker holds no replica of (in a cluster with
    /// more brokers than a topic's replication factor), as their preferred replicas see
    /// them. A replica that does not answer in time leaves its partitions at 0 (unknown):
    /// clients then try the replicas, preferred first, and follow the leader they name.
    async fn fill_remote_leaders(&self, topics: &mut [TopicMetadata]) {
        let mut ask: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for t in topics.iter() {
            for p in t.partitions.iter().filter(|p| p.leader == 0) {
                let preferred = p.replicas.first().copied().unwrap_or(0) as u32;
                if preferred != 0 && preferred != self.ctx.node_id && self.ctx.registry.transport().is_alive(preferred)
                {
                    ask.entry(preferred).or_default().insert(t.name.clone());
                }
            }
        }
        if ask.is_empty() {
            return;
        }
        let answers = futures::future::join_all(ask.into_iter().map(|(broker, names)| async move {
            let mut client = self.kept_client_for(broker)?;
            let request = forward(MetadataRequest {
                topics: names.into_iter().collect(),
            });
            tokio::time::timeout(METADATA_ASK_TIMEOUT, client.metadata(request))
                .await
                .ok()?
                .ok()
        }))
        .await;
        let mut leaders: HashMap<String, HashMap<i32, i32>> = HashMap::new();
        for answer in answers.into_iter().flatten() {
            for t in answer.into_inner().topics {
                let known = leaders.entry(t.name).or_default();
                known.extend(
                    t.partitions
                        .iter()
                        .filter(|p| p.leader > 0)
                        .map(|p| (p.partition, p.leader)),
                );
            }
        }
        for t in topics.iter_mut() {
            let Some(known) = leaders.get(&t.name) else {
                continue;
            };
            for p in t.partitions.iter_mut().filter(|p| p.leader == 0) {
                if let Some(leader) = known.get(&p.partition) {
                    p.leader = *leader;
                }
            }
        }
    }

    /// The members of the cluster, with liveness as this broker sees it.
    fn brokers(&self) -> Vec<BrokerInfo> {
        let members = self.ctx.registry.members();
        self.ctx
            .registry
            .transport()
            .peer_states()
            .into_iter()
            .filter(|s| members.contains(&s.id))
            .map(|s| BrokerInfo {
                id: s.id as i32,
                address: s.address,
                alive: s.alive,
                ..BrokerInfo::default()
            })
            .collect()
    }

    fn cluster(&self) -> ClusterDescription {
        let controller = self.ctx.registry.metadata_partition().leader();
        ClusterDescription {
            cluster_id: "conveyor".into(),
            controller: controller as i32,
            brokers: self.brokers(),
        }
    }

    /// Hands the controller role to another live broker (before this one is removed) and
    /// returns the new controller.
    async fn move_controller(&self) -> Result<u32, BrokerError> {
        let me = self.ctx.node_id;
        let registry = &self.ctx.registry;
        let (voters, _) = registry.metadata_partition().members();
        let Some(to) = voters
            .into_iter()
            .find(|&v| v != me && registry.transport().is_alive(v))
        else {
            return Err(BrokerError::CannotRemoveBroker {
                id: me,
                reason: "no other live broker can take over as controller".into(),
            });
        };
        let metadata = registry.metadata_partition();
        let mut status = metadata.watch_status();
        metadata.transfer_leader(to).await?;
        let moved = tokio::time::timeout(TRANSFER_TIMEOUT, status.wait_for(|s| s.leader != 0 && s.leader != me)).await;
        match moved {
            Ok(Ok(s)) => Ok(s.leader),
            _ => Err(BrokerError::NoController),
        }
    }

    fn count(&self) {
        self.ctx.metrics.admin_requests.add(1);
    }

    fn fail(&self, e: BrokerError) -> Status {
        self.ctx.metrics.request_failed(e.error_code());
        tracing::info!(error = %e, "admin request refused");
        e.into()
    }

    /// A client for broker `broker` over a connection kept for repeated use (it connects on
    /// first use and reconnects by itself); `None` if its address is unknown or malformed.
    fn kept_client_for(&self, broker: u32) -> Option<AdminClient<Channel>> {
        let address = self.ctx.registry.transport().client_address(broker)?;
        let mut kept = self
            .ctx
            .peer_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match kept.entry((broker, address)) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let endpoint = Endpoint::from_shared(format!("http://{}", e.key().1))
                    .ok()?
                    .connect_timeout(FORWARD_CONNECT_TIMEOUT)
                    .tcp_nodelay(true);
                e.insert(endpoint.connect_lazy()).clone()
            }
        };
        Some(AdminClient::new(channel))
    }

    async fn client_for(&self, broker: u32) -> Result<AdminClient<Channel>, BrokerError> {
        connect(self.ctx.registry.transport(), broker).await
    }

    /// `None` when this broker is the controller; else the controller and a client for it.
    async fn controller_client(&self, already_forwarded: bool) -> Result<Option<(u32, AdminClient<Channel>)>, Status> {
        let controller = self.ctx.registry.controller().await.map_err(|e| self.fail(e))?;
        if controller == self.ctx.node_id {
            return Ok(None);
        }
        if already_forwarded {
            // The sender thought this broker was the controller; its view is stale.
            return Err(self.fail(BrokerError::NoController));
        }
        let client = self.client_for(controller).await.map_err(|e| self.fail(e))?;
        Ok(Some((controller, client)))
    }

    /// Waits, bounded, for the lock that serialises metadata changes.
    async fn lock_changes(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        admin_ops::lock_changes(&self.ctx.admin_lock)
            .await
            .map_err(|e| self.fail(e))
    }

    /// This broker's own entry for `cluster info`, with its metadata apply state.
    fn own_metadata_state(&self, info: &mut BrokerInfo) {
        let registry = &self.ctx.registry;
        info.metadata_applied_offset = registry.applied_offset();
        info.metadata_apply_error = registry
            .apply_failure()
            .map(|f| format!("{} (offset {}): {}", f.change, f.offset, f.error))
            .unwrap_or_default();
        info.metadata_reported = true;
    }

    /// Fills in each other live broker's metadata apply state as it reports it; a broker
    /// that does not answer in time is left unreported.
    async fn ask_metadata_states(&self, brokers: &mut [BrokerInfo]) {
        let me = self.ctx.node_id as i32;
        let asked = brokers
            .iter()
            .filter(|b| b.id != me && b.alive)
            .map(|b| b.id as u32)
            .collect::<Vec<_>>();
        let answers = futures::future::join_all(asked.into_iter().map(|broker| async move {
            let mut client = self.kept_client_for(broker)?;
            let theirs = tokio::time::timeout(
                CLUSTER_ASK_TIMEOUT,
                client.describe_cluster(forward(DescribeClusterRequest {})),
            )
            .await
            .ok()?
            .ok()?
            .into_inner();
            theirs
                .brokers
                .into_iter()
                .find(|b| b.id == broker as i32 && b.metadata_reported)
        }))
        .await;
        for theirs in answers.into_iter().flatten() {
            if let Some(slot) = brokers.iter_mut().find(|b| b.id == theirs.id) {
                slot.metadata_applied_offset = theirs.metadata_applied_offset;
                slot.metadata_apply_error = theirs.metadata_apply_error;
                slot.metadata_reported = true;
            }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> Result<Response<CreateTopicResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        crate::error::check_topic_name_length(&req.name).map_err(|e| self.fail(e))?;
        if let Some((id, mut controller)) = self.controller_client(was_forwarded).await? {
            return forwarded_call(id, controller.create_topic(forward(req))).await;
        }
        let _guard = self.lock_changes().await?;
        let configs: BTreeMap<String, String> = req.configs.into_iter().collect();
        let topic = self
            .ctx
            .registry
            .create_topic(&req.name, req.partitions, req.replication_factor, configs)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(CreateTopicResponse {
            topic: Some(self.describe_local(&topic)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<DeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        if let Some((id, mut controller)) = self.controller_client(was_forwarded).await? {
            return forwarded_call(id, controller.delete_topic(forward(req))).await;
        }
        let _guard = self.lock_changes().await?;
        self.ctx
            .registry
            .delete_topic(&req.name)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(DeleteTopicResponse {}))
    }

    async fn list_topics(&self, _: Request<ListTopicsRequest>) -> Result<Response<ListTopicsResponse>, Status> {
        self.count();
        let topics = self
            .ctx
            .registry
            .list()
            .iter()
            .map(|t| TopicSummary {
                name: t.name.clone(),
                partitions: t.partition_count() as i32,
                replication_factor: t.replication_factor,
            })
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<DescribeTopicRequest>,
    ) -> Result<Response<TopicDescription>, Status> {
        self.count();
        let local_only = forwarded(&request);
        let name = request.into_inner().name;
        crate::error::check_topic_name_length(&name).map_err(|e| self.fail(e))?;
        let topic = self.ctx.registry.get(&name).map_err(|e| self.fail(e))?;
        Ok(Response::new(self.describe(&topic, local_only).await))
    }

    async fn alter_topic_config(
        &self,
        request: Request<AlterTopicConfigRequest>,
    ) -> Result<Response<TopicDescription>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        if let Some((id, mut controller)) = self.controller_client(was_forwarded).await? {
            return forwarded_call(id, controller.alter_topic_config(forward(req))).await;
        }
        let _guard = self.lock_changes().await?;
        let changes: BTreeMap<String, String> = req.configs.into_iter().collect();
        let topic = self
            .ctx
            .registry
            .alter_topic_config(&req.name, changes)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.describe_local(&topic)))
    }

    async fn describe_cluster(
        &self,
        request: Request<DescribeClusterRequest>,
    ) -> Result<Response<ClusterDescription>, Status> {
        self.count();
        let mut cluster = self.cluster();
        let me = self.ctx.node_id as i32;
        if let Some(own) = cluster.brokers.iter_mut().find(|b| b.id == me) {
            self.own_metadata_state(own);
        }
        if !forwarded(&request) {
            self.ask_metadata_states(&mut cluster.brokers).await;
        }
        Ok(Response::new(cluster))
    }

    async fn add_broker(&self, request: Request<AddBrokerRequest>) -> Result<Response<AddBrokerResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let wait = membership_wait(&request);
        let req = request.into_inner();
        if let Some((controller_id, mut controller)) = self.controller_client(was_forwarded).await? {
            let mut forwarded = forward(req);
            forwarded.set_timeout(wait);
            return forwarded_call(controller_id, controller.add_broker(forwarded)).await;
        }
        let id = u32::try_from(req.id)
            .map_err(|_| self.fail(BrokerError::InvalidRequest(format!("invalid broker id {}", req.id))))?;
        let operation = Operation::AddBroker {
            id,
            address: req.address.clone(),
        };
        self.membership_job(operation, wait, move |ctx, progress| async move {
            let cx = ChangeContext {
                registry: &ctx.registry,
                lock: &ctx.admin_lock,
                progress: &progress,
            };
            membership::add_broker(&cx, id, &req.address).await?;
            Ok(vec![])
        })
        .await?;
        Ok(Response::new(AddBrokerResponse {
            cluster: Some(self.cluster()),
        }))
    }

    async fn remove_broker(
        &self,
        request: Request<RemoveBrokerRequest>,
    ) -> Result<Response<RemoveBrokerResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let wait = membership_wait(&request);
        let req = request.into_inner();
        let id = u32::try_from(req.id)
            .map_err(|_| self.fail(BrokerError::InvalidRequest(format!("invalid broker id {}", req.id))))?;
        if let Some((controller_id, mut controller)) = self.controller_client(was_forwarded).await? {
            let mut forwarded = forward(req);
            forwarded.set_timeout(wait);
            return forwarded_call(controller_id, controller.remove_broker(forwarded)).await;
        }
        if id == self.ctx.node_id {
            // The controller is the broker to remove: another broker runs the removal.
            let members = self.ctx.registry.members();
            if !members.contains(&id) {
                return Err(self.fail(BrokerError::UnknownBroker(id)));
            }
            if members.len() == 1 {
                return Err(self.fail(BrokerError::CannotRemoveBroker {
                    id,
                    reason: "it is the only broker of the cluster".into(),
                }));
            }
            let next = self.move_controller().await.map_err(|e| self.fail(e))?;
            tracing::info!(controller = next, "controller moved off the broker being removed");
            let mut client = self.client_for(next).await.map_err(|e| self.fail(e))?;
            let mut forwarded = forward(req);
            forwarded.set_timeout(wait);
            return forwarded_call(next, client.remove_broker(forwarded)).await;
        }
        let moves = self
            .membership_job(Operation::RemoveBroker(id), wait, move |ctx, progress| async move {
                let cx = ChangeContext {
                    registry: &ctx.registry,
                    lock: &ctx.admin_lock,
                    progress: &progress,
                };
                Ok(membership::remove_broker(&cx, id).await?)
            })
            .await?;
        Ok(Response::new(RemoveBrokerResponse {
            moves: to_wire_moves(moves),
            cluster: Some(self.cluster()),
        }))
    }

    async fn reassign_partition(
        &self,
        request: Request<ReassignPartitionRequest>,
    ) -> Result<Response<ReassignPartitionResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let wait = membership_wait(&request);
        let req = request.into_inner();
        let target = req
            .replicas
            .iter()
            .map(|&id| u32::try_from(id).ok().filter(|&id| id > 0))
            .collect::<Option<Vec<u32>>>()
            .ok_or_else(|| {
                self.fail(BrokerError::InvalidRequest(format!(
                    "broker ids are positive; got {:?}",
                    req.replicas
                )))
            })?;
        if let Some((controller_id, mut controller)) = self.controller_client(was_forwarded).await? {
            let mut forwarded = forward(req);
            forwarded.set_timeout(wait);
            return forwarded_call(controller_id, controller.reassign_partition(forwarded)).await;
        }
        let operation = Operation::Reassign {
            topic: req.topic.clone(),
            partition: req.partition,
            target: target.clone(),
        };
        let moves = self
            .membership_job(operation, wait, move |ctx, progress| async move {
                let cx = ChangeContext {
                    registry: &ctx.registry,
                    lock: &ctx.admin_lock,
                    progress: &progress,
                };
                Ok(membership::reassign(&cx, &req.topic, req.partition, &target).await?)
            })
            .await?;
        Ok(Response::new(ReassignPartitionResponse {
            moves: to_wire_moves(moves),
        }))
    }

    async fn rebalance(&self, request: Request<RebalanceRequest>) -> Result<Response<RebalanceResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let wait = membership_wait(&request);
        let req = request.into_inner();
        if let Some((controller_id, mut controller)) = self.controller_client(was_forwarded).await? {
            let mut forwarded = forward(req);
            forwarded.set_timeout(wait);
            return forwarded_call(controller_id, controller.rebalance(forwarded)).await;
        }
        let moves = if req.dry_run {
            rebalance::plan_rebalance(&self.ctx.registry)
                .into_iter()
                .map(|(_, m)| m)
                .collect()
        } else {
            self.membership_job(Operation::Rebalance, wait, move |ctx, progress| async move {
                let cx = ChangeContext {
                    registry: &ctx.registry,
                    lock: &ctx.admin_lock,
                    progress: &progress,
                };
                Ok(rebalance::rebalance(&cx, false).await?)
            })
            .await?
        };
        Ok(Response::new(RebalanceResponse {
            moves: to_wire_moves(moves),
        }))
    }

    async fn metadata(&self, request: Request<MetadataRequest>) -> Result<Response<MetadataResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let wanted = request.into_inner().topics;
        let topics = if wanted.is_empty() {
            self.ctx.registry.list()
        } else if was_forwarded {
            // Another broker asking for leaders: a topic this broker has not applied yet must
            // not cost the asker the answers for the others.
            wanted.iter().filter_map(|n| self.ctx.registry.get(n).ok()).collect()
        } else {
            wanted
                .iter()
                .map(|n| self.ctx.registry.get(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.fail(e))?
        };
        let mut topics: Vec<TopicMetadata> = topics
            .iter()
            .map(|t| TopicMetadata {
                name: t.name.clone(),
                partitions: t
                    .assignments
                    .iter()
                    .enumerate()
                    .map(|(i, replicas)| PartitionMetadata {
                        partition: i as i32,
                        leader: t.local.get(&(i as i32)).map_or(0, |p| p.leader() as i32),
                        replicas: to_i32(replicas),
                    })
                    .collect(),
            })
            .collect();
        if !was_forwarded {
            self.fill_remote_leaders(&mut topics).await;
        }
        Ok(Response::new(MetadataResponse {
            brokers: self.brokers(),
            topics,
        }))
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        let topic = self.ctx.registry.get(&req.topic).map_err(|e| self.fail(e))?;
        topic.check_index(req.partition).map_err(|e| self.fail(e))?;
        let replicas = &topic.assignments[req.partition as usize];
        let replica = self.ctx.registry.replica(&topic, req.partition);
        let leader_here = replica.as_ref().is_ok_and(|p| p.is_leader());
        if req.to <= 0 || !replicas.contains(&(req.to as u32)) {
            return Err(self.fail(BrokerError::InvalidRequest(format!(
                "broker {} holds no replica of topic '{}' partition {} (replicas: {replicas:?})",
                req.to, req.topic, req.partition
            ))));
        }
        if !leader_here {
            let leader = match &replica {
                Ok(p) => p.leader(),
                Err(_) => replicas.first().copied().unwrap_or(0),
            };
            if was_forwarded || leader == 0 || leader == self.ctx.node_id {
                let e = match replica {
                    Ok(p) => p.not_leader(),
                    Err(e) => e,
                };
                return Err(self.fail(e));
            }
            let mut client = self.client_for(leader).await.map_err(|e| self.fail(e))?;
            return client.transfer_leader(forward(req)).await;
        }
        let partition: Arc<Partition> = replica.map_err(|e| self.fail(e))?;
        let to = req.to as u32;
        let mut status = partition.watch_status();
        partition.transfer_leader(to).await.map_err(|e| self.fail(e))?;
        let moved = tokio::time::timeout(TRANSFER_TIMEOUT, status.wait_for(|s| s.leader == to)).await;
        match moved {
            Ok(Ok(_)) => Ok(Response::new(TransferLeaderResponse { leader: to as i32 })),
            _ => Err(self.fail(BrokerError::LeaderNotAvailable {
                topic: req.topic,
                partition: req.partition,
            })),
        }
    }
}

#[cfg(test)]
mod tests;
