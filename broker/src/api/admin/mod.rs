//! The `Admin` service: topics, cluster description and leadership.
//!
//! Any broker takes any admin request. Topic changes go to the controller: a broker that is
//! not the controller forwards the request there (once: a forwarded request is never
//! forwarded again, so a stale view cannot make a loop). Descriptions answer from this
//! broker's view and ask each partition's leader for what only the leader knows (in-sync
//! replicas, log end offset).
//!
//! The handlers are here; [`route`] forwards a change to the controller (one helper,
//! `to_controller`, behind every handler that changes metadata), [`describe`] builds topic
//! descriptions and metadata answers, [`cluster`] the cluster description.
//!
//! # Deadlines
//! Every call answers in bounded time. Topic changes hold the metadata change lock only to
//! check and propose one record (each bounded, see [`crate::controller::admin_ops`]); membership calls
//! run their operation as a background job and answer within [`MEMBERSHIP_CALL_WAIT`] (or
//! the caller's shorter `grpc-timeout`) with the outcome, or with a retriable error naming
//! the step under way; a forwarded call waits for the controller at most
//! [`FORWARD_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::admin_server::Admin;
use conveyor_proto::v1::*;
use tonic::{Request, Response, Status};

use super::Context;
use crate::api::forward::{CONNECT_TIMEOUT, forward, forwarded};
use crate::controller::admin_ops::{self, ChangeContext, Jobs, Operation};
use crate::controller::{membership, rebalance};
use crate::error::BrokerError;

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

/// Evaluates to `$req` when this broker is the controller; otherwise returns the
/// controller's answer to `$req`, forwarded with `AdminClient::$method` (see
/// [`AdminService::to_controller`]).
macro_rules! on_controller {
    ($service:expr, $was_forwarded:expr, $req:expr, $wait:expr, $method:ident) => {
        match $service
            .to_controller(
                $was_forwarded,
                $req,
                $wait,
                |mut c, r| async move { c.$method(r).await },
            )
            .await?
        {
            Route::Here(req) => req,
            Route::Forwarded(answer) => return Ok(answer),
        }
    };
}

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

    fn count(&self) {
        self.ctx.metrics.admin_requests.add(1);
    }

    fn fail(&self, e: BrokerError) -> Status {
        self.ctx.metrics.request_failed(e.error_code());
        tracing::info!(error = %e, "admin request refused");
        e.into()
    }

    /// Waits, bounded, for the lock that serialises metadata changes.
    async fn lock_changes(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        admin_ops::lock_changes(&self.ctx.admin_lock)
            .await
            .map_err(|e| self.fail(e))
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
        let req = on_controller!(self, was_forwarded, req, None, create_topic);
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
        crate::coordinator::internal_topic::refuse_client_write(&req.name, "delete").map_err(|e| self.fail(e))?;
        let req = on_controller!(self, was_forwarded, req, None, delete_topic);
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
        crate::coordinator::internal_topic::refuse_client_write(&req.name, "change the config of")
            .map_err(|e| self.fail(e))?;
        let req = on_controller!(self, was_forwarded, req, None, alter_topic_config);
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
        let req = on_controller!(self, was_forwarded, req, Some(wait), add_broker);
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
        let req = on_controller!(self, was_forwarded, req, Some(wait), remove_broker);
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
            let client = self.client_for(next).await.map_err(|e| self.fail(e))?;
            return forward_to(next, client, req, Some(wait), |mut c, r| async move {
                c.remove_broker(r).await
            })
            .await;
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
        let req = on_controller!(self, was_forwarded, req, Some(wait), reassign_partition);
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
        let req = on_controller!(self, was_forwarded, req, Some(wait), rebalance);
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

    async fn list_producers(
        &self,
        request: Request<ListProducersRequest>,
    ) -> Result<Response<ListProducersResponse>, Status> {
        self.producers(request).await
    }

    async fn compact_topic(
        &self,
        request: Request<CompactTopicRequest>,
    ) -> Result<Response<CompactTopicResponse>, Status> {
        self.compact(request).await
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
        if req.to <= 0 || !replicas.contains(&(req.to as u32)) {
            return Err(self.fail(BrokerError::InvalidRequest(format!(
                "broker {} holds no replica of topic '{}' partition {} (replicas: {replicas:?})",
                req.to, req.topic, req.partition
            ))));
        }
        let partition = match self.at_leader(&topic, req.partition, was_forwarded).await? {
            AtLeader::Here(p) => p,
            AtLeader::There(_, mut client) => return client.transfer_leader(forward(req)).await,
        };
        let to = req.to as u32;
        let mut status = partition.watch_status();
        partition.transfer_leader(to).await.map_err(|e| self.fail(e))?;
        let moved = tokio::time::timeout(TRANSFER_TIMEOUT, status.wait_for(|s| s.leader == to)).await;
        match moved {
            Ok(Ok(_)) => Ok(Response::new(TransferLeaderResponse { leader: to as i32 })),
            // Usually the target is still catching up: say who leads now, not that no one does.
            _ if partition.leader() == to => Ok(Response::new(TransferLeaderResponse { leader: to as i32 })),
            _ => {
                let state = match partition.leader() {
                    0 => "the partition has no leader right now (an election is under way); retry shortly".to_string(),
                    l => format!("broker {l} still leads (broker {to} may still be catching up); retry shortly"),
                };
                Err(self.fail(BrokerError::TimedOut {
                    what: format!(
                        "moving the leadership of topic '{}' partition {} to broker {to}",
                        req.topic, req.partition
                    ),
                    after: TRANSFER_TIMEOUT,
                    state,
                }))
            }
        }
    }
}

mod cluster;
mod compact;
mod describe;
mod producers;
mod route;
use route::{AtLeader, Route, forward_to};

#[cfg(test)]
mod tests;
