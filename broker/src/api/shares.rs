//! The `Shares` service: share group sessions, fetches and acknowledgements, and their
//! administration, answered by [`crate::coordinator::shares::ShareCoordinator`]. Requests
//! are checked and bounded here; a broker that does not coordinate the group says which
//! one does.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::shares_server::Shares;
use conveyor_proto::v1::*;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::coordinator::shares::deliver::FetchArgs;
use crate::coordinator::shares::{Session, ShareCoordinator};
use crate::error::BrokerError;
use crate::metrics::Metrics;

/// How often a member's session stream carries an event (keeps idle connections open and
/// lets a member notice a dead coordinator).
const SESSION_EVENT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct SharesService {
    pub coordinator: Arc<ShareCoordinator>,
    pub metrics: Arc<Metrics>,
    /// Set when the broker stops: sessions end so the shutdown need not wait for them.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl SharesService {
    fn fail(&self, e: BrokerError) -> Status {
        self.metrics.request_failed(e.error_code());
        match &e {
            BrokerError::NotCoordinator { .. }
            | BrokerError::CoordinatorLoading { .. }
            | BrokerError::UnknownMember { .. } => tracing::debug!(error = %e, "share request refused"),
            _ => tracing::info!(error = %e, "share request refused"),
        }
        e.into()
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ShareSessionEvent, Status>> + Send>>;

/// Holds a member's session until its stream is closed (or its coordinator's state stops
/// being current), then releases what it holds.
async fn hold(
    coordinator: Arc<ShareCoordinator>,
    session: Session,
    tx: tokio::sync::mpsc::Sender<Result<ShareSessionEvent, Status>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(SESSION_EVENT_EVERY);
    every.tick().await;
    let first = session.event.clone();
    if tx.send(Ok(first)).await.is_ok() {
        loop {
            tokio::select! {
                () = tx.closed() => break,
                _ = stopped(&mut stopping) => {
                    let _ = tx.send(Err(BrokerError::ShuttingDown.into())).await;
                    break;
                }
                _ = every.tick() => {
                    if !session.shard.is_current() {
                        let _ = tx
                            .send(Err(BrokerError::CoordinatorLoading {
                                group: session.group.clone(),
                                state: "moved: its state partition changed leader or term; join again".into(),
                            }
                            .into()))
                            .await;
                        break;
                    }
                    if tx.send(Ok(session.event.clone())).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    coordinator.leave(&session).await;
}

async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[tonic::async_trait]
impl Shares for SharesService {
    type JoinStream = SessionStream;

    async fn find_share_coordinator(
        &self,
        request: Request<FindCoordinatorRequest>,
    ) -> Result<Response<FindCoordinatorResponse>, Status> {
        let group = request.into_inner().group;
        let (coordinator, address, partition) = self.coordinator.find(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(FindCoordinatorResponse {
            coordinator: coordinator as i32,
            address,
            partition,
        }))
    }

    async fn join(&self, request: Request<ShareJoinRequest>) -> Result<Response<Self::JoinStream>, Status> {
        let r = request.into_inner();
        let session = self
            .coordinator
            .join(&r.group, &r.member_id, &r.topic, &r.settings.unwrap_or_default())
            .await
            .map_err(|e| self.fail(e))?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(hold(Arc::clone(&self.coordinator), session, tx, self.stopping.clone()));
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn create_share_group(
        &self,
        request: Request<CreateShareGroupRequest>,
    ) -> Result<Response<CreateShareGroupResponse>, Status> {
        let r = request.into_inner();
        let (created, settings) = self
            .coordinator
            .create(&r.group, &r.topic, &r.settings.unwrap_or_default())
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(CreateShareGroupResponse {
            created,
            settings: Some(settings),
        }))
    }

    async fn fetch(&self, request: Request<ShareFetchRequest>) -> Result<Response<ShareFetchResponse>, Status> {
        self.metrics.share_fetch_requests.add(1);
        let r = request.into_inner();
        let args = FetchArgs {
            group: r.group,
            member: r.member_id,
            max_records: r.max_records,
            max_bytes: r.max_bytes,
            max_wait: Duration::from_millis(u64::from(r.max_wait_ms)),
            acks: r.acks,
        };
        let answer = self.coordinator.fetch(args).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(answer))
    }

    async fn acknowledge(
        &self,
        request: Request<ShareAcknowledgeRequest>,
    ) -> Result<Response<ShareAcknowledgeResponse>, Status> {
        self.metrics.share_acknowledge_requests.add(1);
        let r = request.into_inner();
        let results = self
            .coordinator
            .acknowledge(&r.group, &r.member_id, &r.acks)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(ShareAcknowledgeResponse { results }))
    }

    async fn list_share_groups(
        &self,
        _request: Request<ListShareGroupsRequest>,
    ) -> Result<Response<ListShareGroupsResponse>, Status> {
        Ok(Response::new(ListShareGroupsResponse {
            groups: self.coordinator.list().await,
        }))
    }

    async fn describe_share_group(
        &self,
        request: Request<DescribeShareGroupRequest>,
    ) -> Result<Response<ShareGroupDescription>, Status> {
        let group = request.into_inner().group;
        let d = self.coordinator.describe(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(d))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Result<Response<PurgeDeadLettersResponse>, Status> {
        let group = request.into_inner().group;
        let purged = self
            .coordinator
            .purge_dead_letters(&group)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }

    async fn redrive(&self, request: Request<RedriveRequest>) -> Result<Response<RedriveResponse>, Status> {
        let group = request.into_inner().group;
        let republished = self.coordinator.redrive(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(RedriveResponse { republished }))
    }

    async fn delete_share_group(
        &self,
        request: Request<DeleteGroupRequest>,
    ) -> Result<Response<DeleteGroupResponse>, Status> {
        let group = request.into_inner().group;
        self.coordinator.delete(&group).await.map_err(|e| self.fail(e))?;
        Ok(Response::new(DeleteGroupResponse {}))
    }
}
