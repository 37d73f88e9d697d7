//! An in-process fake share coordinator for tests of the share consumer: a `Shares` service
//! that answers fetches from a script, applies acknowledgements (refusing the offsets it is
//! told to), holds `Join` streams it can end on demand, and logs every call in order.
//! (Real brokers are in `tests/`; this fake checks the client on its own.)

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::shares_server::{Shares, SharesServer};
use conveyor_proto::v1::*;
use futures::Stream;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};

use crate::groups::fake::refusal;

type Answer<T> = Result<tonic::Response<T>, tonic::Status>;
type Events = Pin<Box<dyn Stream<Item = Result<ShareSessionEvent, tonic::Status>> + Send>>;

/// The lock every fetch answer names: far enough ahead that nothing expires in a test.
pub(crate) const LOCKED_UNTIL_MS: i64 = i64::MAX / 2;
/// A long poll with nothing to return waits this long at most, so tests stay quick.
const FAKE_MAX_WAIT: Duration = Duration::from_millis(50);

/// Batches of `per_batch` one-record-per-offset records from offset `from`, `count` records
/// in all, with values `v<offset>`, stamped as the broker stores them.
pub(crate) fn batches(from: u64, count: u64, per_batch: u64) -> bytes::Bytes {
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};
    let mut all = Vec::new();
    let mut base = from;
    while base < from + count {
        let n = per_batch.min(from + count - base);
        let mut builder = BatchBuilder::new(Compression::None);
        for o in base..base + n {
            builder.push(&Record {
                timestamp: 1,
                value: Some(bytes::Bytes::from(format!("v{o}"))),
                ..Record::default()
            });
        }
        let mut bytes = builder.build().expect("batch").to_vec();
        conveyor_storage::batch::stamp(&mut bytes, base, 1, base + 1);
        all.extend_from_slice(&bytes);
        base += n;
    }
    bytes::Bytes::from(all)
}

/// A call the fake received.
#[derive(Debug, Clone)]
pub(crate) enum Call {
    Join(ShareJoinRequest),
    Fetch(ShareFetchRequest),
    Acknowledge(ShareAcknowledgeRequest),
}

#[derive(Debug, Default)]
pub(crate) struct Fake {
    /// Where it listens: FindShareCoordinator names it.
    address: Mutex<String>,
    /// Answers to the next fetches, in order; once empty, an empty answer after a short wait.
    pub(crate) fetches: Mutex<VecDeque<Vec<SharePartitionData>>>,
    /// Acknowledgements of ranges holding any of these (partition, offset) are refused
    /// STALE_DELIVERY.
    pub(crate) refuse: Mutex<HashSet<(i32, u64)>>,
    /// When set, the next join is refused with it.
    pub(crate) join_refusal: Mutex<Option<ErrorCode>>,
    /// When set (ms), the group's lock duration: fetches and renewals lock for this long
    /// from now. Unset, locks end far in the future.
    pub(crate) lock_ms: std::sync::atomic::AtomicU64,
    /// Long polls wait the whole `max_wait` they ask for, not just [`FAKE_MAX_WAIT`].
    pub(crate) full_long_polls: std::sync::atomic::AtomicBool,
    /// Join streams open now, and ended so far (by the client or by [`Fake::end_sessions`]).
    pub(crate) sessions_open: AtomicUsize,
    pub(crate) sessions_ended: AtomicUsize,
    /// Bumped to end every Join stream open at the time.
    end_sessions: tokio::sync::watch::Sender<u64>,
    calls: Mutex<Vec<Call>>,
    called: Notify,
}

impl Fake {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn log(&self, call: Call) {
        Self::lock(&self.calls).push(call);
        self.called.notify_waiters();
    }

    pub(crate) fn calls(&self) -> Vec<Call> {
        Self::lock(&self.calls).clone()
    }

    pub(crate) fn script(&self, partitions: Vec<SharePartitionData>) {
        Self::lock(&self.fetches).push_back(partitions);
    }

    /// Ends every open Join stream from the coordinator's side.
    pub(crate) fn end_sessions(&self) {
        self.end_sessions.send_modify(|generation| *generation += 1);
    }

    /// Waits until `done` holds of the fake (checked on every call and every 10 ms), or
    /// panics after `limit`.
    pub(crate) async fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&Fake) -> bool) {
        let waited = tokio::time::timeout(limit, async {
            while !done(self) {
                let _ = tokio::time::timeout(Duration::from_millis(10), self.called.notified()).await;
            }
        })
        .await;
        if waited.is_err() {
            panic!("{what} did not happen within {limit:?}; calls: {:#?}", self.calls());
        }
    }

    /// When a lock taken now ends.
    fn locked_until(&self) -> i64 {
        match self.lock_ms.load(Ordering::SeqCst) {
            0 => LOCKED_UNTIL_MS,
            ms => conveyor_storage::unix_millis() + ms as i64,
        }
    }

    fn results(&self, acks: &[ShareAck]) -> Vec<ShareAckResult> {
        let refused = Self::lock(&self.refuse);
        acks.iter()
            .map(|a| {
                let refuse = (a.first_offset..=a.last_offset).any(|o| refused.contains(&(a.partition, o)));
                ShareAckResult {
                    partition: a.partition,
                    first_offset: a.first_offset,
                    last_offset: a.last_offset,
                    error: if refuse { ErrorCode::StaleDelivery as i32 } else { 0 },
                    message: if refuse {
                        "stale token (scripted)".into()
                    } else {
                        String::new()
                    },
                    locked_until_ms: self.locked_until(),
                }
            })
            .collect()
    }
}

struct SharesService(Arc<Fake>);

fn event(topic: &str, lock_ms: u64) -> ShareSessionEvent {
    ShareSessionEvent {
        topic: topic.to_string(),
        settings: Some(ShareGroupSettings {
            ordering: Some("none".into()),
            lock_duration_ms: Some(if lock_ms == 0 { 30_000 } else { lock_ms as u32 }),
            max_delivery_count: Some(5),
            max_inflight_records: Some(2000),
            auto_offset_reset: Some("latest".into()),
            dead_letter_topic: Some(format!("{topic}.g.dlq")),
        }),
        partitions: 3,
    }
}

#[tonic::async_trait]
impl Shares for SharesService {
    async fn find_share_coordinator(
        &self,
        _: tonic::Request<FindCoordinatorRequest>,
    ) -> Answer<FindCoordinatorResponse> {
        Ok(tonic::Response::new(FindCoordinatorResponse {
            coordinator: 1,
            address: Fake::lock(&self.0.address).clone(),
            partition: 0,
        }))
    }

    type JoinStream = Events;

    async fn join(&self, request: tonic::Request<ShareJoinRequest>) -> Answer<Events> {
        let request = request.into_inner();
        self.0.log(Call::Join(request.clone()));
        if let Some(code) = Fake::lock(&self.0.join_refusal).take() {
            return Err(refusal(code, None));
        }
        let (tx, rx) = mpsc::channel(4);
        let _ = tx
            .send(Ok(event(&request.topic, self.0.lock_ms.load(Ordering::SeqCst))))
            .await;
        let fake = Arc::clone(&self.0);
        let mut ended = fake.end_sessions.subscribe();
        ended.mark_unchanged();
        fake.sessions_open.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::select! {
                _ = tx.closed() => {}
                _ = ended.changed() => {}
            }
            drop(tx);
            fake.sessions_open.fetch_sub(1, Ordering::SeqCst);
            fake.sessions_ended.fetch_add(1, Ordering::SeqCst);
            fake.called.notify_waiters();
        });
        Ok(tonic::Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch(&self, request: tonic::Request<ShareFetchRequest>) -> Answer<ShareFetchResponse> {
        let request = request.into_inner();
        self.0.log(Call::Fetch(request.clone()));
        let ack_results = self.0.results(&request.acks);
        let scripted = Fake::lock(&self.0.fetches).pop_front();
        let partitions = match scripted {
            Some(partitions) => partitions,
            None => {
                let asked = Duration::from_millis(u64::from(request.max_wait_ms));
                let cap = if self.0.full_long_polls.load(Ordering::SeqCst) {
                    asked
                } else {
                    FAKE_MAX_WAIT
                };
                tokio::time::sleep(asked.min(cap)).await;
                Vec::new()
            }
        };
        Ok(tonic::Response::new(ShareFetchResponse {
            partitions,
            ack_results,
            locked_until_ms: self.0.locked_until(),
        }))
    }

    async fn acknowledge(&self, request: tonic::Request<ShareAcknowledgeRequest>) -> Answer<ShareAcknowledgeResponse> {
        let request = request.into_inner();
        self.0.log(Call::Acknowledge(request.clone()));
        let results = self.0.results(&request.acks);
        Ok(tonic::Response::new(ShareAcknowledgeResponse { results }))
    }

    async fn list_share_groups(&self, _: tonic::Request<ListShareGroupsRequest>) -> Answer<ListShareGroupsResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn describe_share_group(
        &self,
        _: tonic::Request<DescribeShareGroupRequest>,
    ) -> Answer<ShareGroupDescription> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn purge_dead_letters(&self, _: tonic::Request<PurgeDeadLettersRequest>) -> Answer<PurgeDeadLettersResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn create_share_group(&self, _: tonic::Request<CreateShareGroupRequest>) -> Answer<CreateShareGroupResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn redrive(&self, _: tonic::Request<RedriveRequest>) -> Answer<RedriveResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }

    async fn delete_share_group(&self, _: tonic::Request<DeleteGroupRequest>) -> Answer<DeleteGroupResponse> {
        Err(tonic::Status::unimplemented("not faked"))
    }
}

/// Starts a fake share coordinator on an ephemeral port; FindShareCoordinator names it.
pub(crate) async fn start() -> (Arc<Fake>, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let fake = Arc::new(Fake::default());
    *Fake::lock(&fake.address) = address.clone();
    let service = SharesService(Arc::clone(&fake));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(SharesServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (fake, address)
}
