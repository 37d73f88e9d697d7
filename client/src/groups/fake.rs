//! An in-process fake broker for tests of the group client: a `Groups` service that answers
//! heartbeats as its script says and logs every call in order, and a `Fetch` service that
//! serves one-record batches up to each partition's log end. (Real brokers are in `tests/`;
//! this fake lets the client be checked on its own, with answers a real coordinator gives
//! only in a rebalance or a failover.)

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use conveyor_proto::v1::fetch_server::{Fetch, FetchServer};
use conveyor_proto::v1::groups_server::{Groups, GroupsServer};
use conveyor_proto::v1::*;
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use prost::Message;
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

/// A call the fake received.
#[derive(Debug, Clone)]
pub(crate) enum Call {
    FindCoordinator,
    Heartbeat(GroupHeartbeatRequest),
    Commit(CommitOffsetsRequest),
    FetchOffsets,
    Describe,
    List,
}

#[derive(Debug, Default)]
pub(crate) struct Fake {
    /// What FindCoordinator answers: (id, address).
    pub(crate) coordinator: Mutex<(i32, String)>,
    /// When set, every call but FindCoordinator is refused NOT_COORDINATOR naming it.
    pub(crate) redirect_to: Mutex<Option<(i32, String)>>,
    /// The next this many calls (but FindCoordinator) answer COORDINATOR_LOADING.
    pub(crate) loading: AtomicUsize,
    /// Answers to the next heartbeats, in order; once empty, the last answer again.
    pub(crate) heartbeats: Mutex<VecDeque<Result<GroupHeartbeatResponse, ErrorCode>>>,
    last_heartbeat: Mutex<GroupHeartbeatResponse>,
    pub(crate) calls: Mutex<Vec<Call>>,
    pub(crate) called: Notify,
    pub(crate) committed: Mutex<HashMap<(String, i32), u64>>,
    pub(crate) described: Mutex<GroupDescription>,
    pub(crate) listed: Mutex<Vec<GroupSummary>>,
    /// Each partition's log end: fetches get one-record batches up to it.
    pub(crate) log_ends: Mutex<HashMap<(String, i32), u64>>,
    /// Every fetch's partition and offset, in order.
    pub(crate) fetches: Mutex<Vec<(String, i32, u64)>>,
}

pub(crate) fn refusal(code: ErrorCode, leader: Option<(i32, String)>) -> tonic::Status {
    let status = match code {
        ErrorCode::CoordinatorLoading => tonic::Code::Unavailable,
        _ => tonic::Code::FailedPrecondition,
    };
    let (leader_id, leader_address) = leader.unwrap_or_default();
    let detail = ErrorDetail {
        code: code as i32,
        message: format!("{code:?} (scripted)"),
        leader_id,
        leader_address,
        retriable: matches!(code, ErrorCode::CoordinatorLoading | ErrorCode::NotCoordinator),
        ..ErrorDetail::default()
    };
    tonic::Status::with_details(status, detail.message.clone(), Bytes::from(detail.encode_to_vec()))
}

impl Fake {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log(&self, call: Call) {
        Self::lock(&self.calls).push(call);
        self.called.notify_waiters();
    }

    /// The refusal a coordinator call gets, if any (loading first, then a redirect).
    fn refuse(&self) -> Option<tonic::Status> {
        if self
            .loading
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Some(refusal(ErrorCode::CoordinatorLoading, None));
        }
        Self::lock(&self.redirect_to)
            .clone()
            .map(|to| refusal(ErrorCode::NotCoordinator, Some(to)))
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        Self::lock(&self.calls).clone()
    }

    pub(crate) fn heartbeat_requests(&self) -> Vec<GroupHeartbeatRequest> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Heartbeat(h) => Some(h),
                _ => None,
            })
            .collect()
    }

    pub(crate) fn script(&self, answer: Result<GroupHeartbeatResponse, ErrorCode>) {
        Self::lock(&self.heartbeats).push_back(answer);
    }

    /// Waits until `done` holds of the calls received, or panics after `limit`.
    pub(crate) async fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&[Call]) -> bool) {
        let waited = tokio::time::timeout(limit, async {
            loop {
                let called = self.called.notified();
                if done(&self.calls()) {
                    return;
                }
                called.await;
            }
        })
        .await;
        if waited.is_err() {
            panic!("{what} did not happen within {limit:?}; calls: {:#?}", self.calls());
        }
    }
}

struct GroupsService(Arc<Fake>);

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn find_coordinator(&self, _: tonic::Request<FindCoordinatorRequest>) -> Answer<FindCoordinatorResponse> {
        self.0.log(Call::FindCoordinator);
        let (coordinator, address) = Fake::lock(&self.0.coordinator).clone();
        Ok(tonic::Response::new(FindCoordinatorResponse {
            coordinator,
            address,
            partition: 0,
        }))
    }

    async fn heartbeat(&self, request: tonic::Request<GroupHeartbeatRequest>) -> Answer<GroupHeartbeatResponse> {
        let request = request.into_inner();
        self.0.log(Call::Heartbeat(request.clone()));
        if let Some(refused) = self.0.refuse() {
            return Err(refused);
        }
        if request.member_epoch < 0 {
            return Ok(tonic::Response::new(GroupHeartbeatResponse {
                member_id: request.member_id,
                member_epoch: request.member_epoch,
                ..GroupHeartbeatResponse::default()
            }));
        }
        let scripted = Fake::lock(&self.0.heartbeats).pop_front();
        match scripted {
            Some(Err(code)) => Err(refusal(code, None)),
            Some(Ok(answer)) => {
                *Fake::lock(&self.0.last_heartbeat) = answer.clone();
                Ok(tonic::Response::new(answer))
            }
            None => Ok(tonic::Response::new(Fake::lock(&self.0.last_heartbeat).clone())),
        }
    }

    async fn commit_offsets(&self, request: tonic::Request<CommitOffsetsRequest>) -> Answer<CommitOffsetsResponse> {
        let request = request.into_inner();
        self.0.log(Call::Commit(request.clone()));
        if let Some(refused) = self.0.refuse() {
            return Err(refused);
        }
        let mut committed = Fake::lock(&self.0.committed);
        for o in request.offsets {
            committed.insert((o.topic, o.partition), o.offset);
        }
        Ok(tonic::Response::new(CommitOffsetsResponse {}))
    }

    async fn fetch_offsets(&self, request: tonic::Request<FetchOffsetsRequest>) -> Answer<FetchOffsetsResponse> {
        self.0.log(Call::FetchOffsets);
        if let Some(refused) = self.0.refuse() {
            return Err(refused);
        }
        let committed = Fake::lock(&self.0.committed);
        let offsets = request
            .into_inner()
            .partitions
            .iter()
            .flat_map(|t| t.partitions.iter().map(move |&p| (t.topic.clone(), p)))
            .filter_map(|key| {
                let offset = *committed.get(&key)?;
                Some(CommittedOffset {
                    topic: key.0,
                    partition: key.1,
                    offset,
                    ..CommittedOffset::default()
                })
            })
            .collect();
        Ok(tonic::Response::new(FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(&self, _: tonic::Request<ListGroupsRequest>) -> Answer<ListGroupsResponse> {
        self.0.log(Call::List);
        let groups = Fake::lock(&self.0.listed).clone();
        Ok(tonic::Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(&self, _: tonic::Request<DescribeGroupRequest>) -> Answer<GroupDescription> {
        self.0.log(Call::Describe);
        if let Some(refused) = self.0.refuse() {
            return Err(refused);
        }
        Ok(tonic::Response::new(Fake::lock(&self.0.described).clone()))
    }

    async fn reset_offsets(&self, _: tonic::Request<ResetOffsetsRequest>) -> Answer<ResetOffsetsResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn delete_group(&self, _: tonic::Request<DeleteGroupRequest>) -> Answer<DeleteGroupResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }
}

struct FetchService(Arc<Fake>);

/// A long poll with nothing to return waits this long at most, so tests stay quick.
const FAKE_MAX_WAIT: Duration = Duration::from_millis(50);
/// Records per fetch response, so a partition takes several fetches.
const RECORDS_PER_FETCH: u64 = 4;

fn one_record_batches(partition: i32, from: u64, to: u64) -> Bytes {
    let mut all = Vec::new();
    for offset in from..to {
        let mut builder = BatchBuilder::new(Compression::None);
        builder.push(&Record {
            timestamp: 1,
            value: Some(Bytes::from(format!("p{partition}-{offset}"))),
            ..Record::default()
        });
        if let Ok(batch) = builder.build() {
            let mut bytes = batch.to_vec();
            conveyor_storage::batch::stamp(&mut bytes, offset, 1, offset + 1);
            all.extend_from_slice(&bytes);
        }
    }
    Bytes::from(all)
}

#[tonic::async_trait]
impl Fetch for FetchService {
    async fn fetch(&self, request: tonic::Request<FetchRequest>) -> Answer<FetchResponse> {
        let request = request.into_inner();
        let mut partitions = Vec::new();
        let mut any = false;
        for p in &request.partitions {
            Fake::lock(&self.0.fetches).push((p.topic.clone(), p.partition, p.offset));
            let end = Fake::lock(&self.0.log_ends)
                .get(&(p.topic.clone(), p.partition))
                .copied()
                .unwrap_or(0);
            let to = end.min(p.offset + RECORDS_PER_FETCH);
            any |= to > p.offset;
            partitions.push(PartitionData {
                topic: p.topic.clone(),
                partition: p.partition,
                high_watermark: end,
                batches: if to > p.offset {
                    one_record_batches(p.partition, p.offset, to)
                } else {
                    Bytes::new()
                },
                next_offset: to.max(p.offset),
                ..PartitionData::default()
            });
        }
        if !any {
            tokio::time::sleep(Duration::from_millis(u64::from(request.max_wait_ms)).min(FAKE_MAX_WAIT)).await;
        }
        Ok(tonic::Response::new(FetchResponse { partitions }))
    }

    async fn list_offsets(&self, request: tonic::Request<ListOffsetsRequest>) -> Answer<ListOffsetsResponse> {
        let results = request
            .into_inner()
            .queries
            .into_iter()
            .map(|q| {
                let end = Fake::lock(&self.0.log_ends)
                    .get(&(q.topic.clone(), q.partition))
                    .copied()
                    .unwrap_or(0);
                let offset = match q.spec {
                    Some(offset_query::Spec::Earliest(_)) => 0,
                    _ => end,
                };
                OffsetResult {
                    topic: q.topic,
                    partition: q.partition,
                    offset,
                    found: true,
                    high_watermark: end,
                    log_end_offset: end,
                    ..OffsetResult::default()
                }
            })
            .collect();
        Ok(tonic::Response::new(ListOffsetsResponse { results }))
    }
}

/// Starts a fake broker with id `id` on an ephemeral port; FindCoordinator names itself.
pub(crate) async fn start(id: i32) -> (Arc<Fake>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let fake = Arc::new(Fake::default());
    *Fake::lock(&fake.coordinator) = (id, address.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GroupsServer::new(GroupsService(Arc::clone(&fake))))
            .add_service(FetchServer::new(FetchService(Arc::clone(&fake))))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, address)
}
