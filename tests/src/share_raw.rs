//! Share group members over the raw `Shares` protocol: sessions held open, fetches and
//! acknowledgements exactly as sent, and the records of a fetch's acquired ranges; in a
//! cluster, joins that find the coordinator and follow NOT_COORDINATOR / COORDINATOR_LOADING.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::proto::shares_client::SharesClient;
use conveyor_client::proto::*;
use conveyor_storage::batch::BatchIter;
use prost::Message as _;
use tonic::transport::Channel;

/// How long connecting to a broker may take (a killed broker refuses at once; this bounds
/// one that does not answer).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one coordinator lookup or join may take before it is tried again elsewhere.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call may take before it fails instead of hanging the test: longer than the
/// longest fetch wait a coordinator allows (30 s). A Join's stream is not bounded by it,
/// only its answer and first event.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between rounds of a lookup or join that found no coordinator.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

pub async fn shares(addr: &str) -> SharesClient<Channel> {
    try_shares(addr).await.expect("connect")
}

/// A client of `addr`, or UNAVAILABLE when it cannot be reached within [`CONNECT_TIMEOUT`].
/// Its calls fail after [`CALL_TIMEOUT`].
pub async fn try_shares(addr: &str) -> Result<SharesClient<Channel>, tonic::Status> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| tonic::Status::invalid_argument(format!("address {addr}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect {addr}: {e}")))?;
    Ok(SharesClient::new(channel))
}

pub fn detail(status: &tonic::Status) -> ErrorDetail {
    ErrorDetail::decode(status.details()).unwrap_or_default()
}

/// A member's open session: dropping it ends the session (and releases its records).
#[derive(Debug)]
pub struct RawMember {
    /// The broker the session is held at.
    pub addr: String,
    pub group: String,
    pub id: String,
    pub client: SharesClient<Channel>,
    pub first: ShareSessionEvent,
    pub session: tonic::Streaming<ShareSessionEvent>,
}

/// One record a fetch acquired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub partition: i32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
    pub delivery_count: u32,
    pub token: u64,
}

impl RawMember {
    /// Joins `group` at `addr` (the coordinator), creating it on `topic` with `settings`.
    pub async fn join(
        addr: &str,
        group: &str,
        id: &str,
        topic: &str,
        settings: ShareGroupSettings,
    ) -> Result<RawMember, tonic::Status> {
        let mut client = try_shares(addr).await?;
        let mut session = client
            .join(ShareJoinRequest {
                group: group.into(),
                member_id: id.into(),
                topic: topic.into(),
                settings: Some(settings),
            })
            .await?
            .into_inner();
        let first = tokio::time::timeout(CALL_TIMEOUT, session.message())
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("no first session event in time"))??
            .ok_or_else(|| tonic::Status::unavailable("the session ended before its first event"))?;
        Ok(RawMember {
            addr: addr.into(),
            group: group.into(),
            id: id.into(),
            client,
            first,
            session,
        })
    }

    /// Joins `group` at its coordinator among `addrs` (a cluster's client addresses): asks
    /// them in turn for the coordinator, joins there, and follows NOT_COORDINATOR to the
    /// broker it names; COORDINATOR_LOADING, UNAVAILABLE and unreachable brokers are tried
    /// again until `deadline` passes (then it panics). Other refusals are returned.
    pub async fn join_following(
        addrs: &[String],
        group: &str,
        id: &str,
        topic: &str,
        settings: ShareGroupSettings,
        deadline: std::time::Instant,
    ) -> Result<RawMember, tonic::Status> {
        let mut last = None;
        while std::time::Instant::now() < deadline {
            let mut at = find_share_coordinator(addrs, group, deadline).await;
            // At most one redirect per round: a second one means the lookup is stale.
            for _ in 0..2 {
                let joined =
                    tokio::time::timeout(JOIN_TIMEOUT, RawMember::join(&at, group, id, topic, settings.clone()))
                        .await
                        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded(format!("no join answer from {at}"))));
                let e = match joined {
                    Ok(m) => return Ok(m),
                    Err(e) => e,
                };
                let d = detail(&e);
                if d.code == ErrorCode::NotCoordinator as i32 && addrs.contains(&d.leader_address) {
                    at = d.leader_address.clone();
                    last = Some(e);
                    continue;
                }
                if !(d.retriable
                    || matches!(
                        e.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
                    ))
                {
                    return Err(e);
                }
                last = Some(e);
                break;
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        panic!("{id} could not join share group '{group}' by the deadline; last refusal: {last:?}");
    }

    /// One fetch: its acquired records, and the acknowledgement results it carried.
    pub async fn fetch(
        &mut self,
        max_records: u32,
        max_wait: Duration,
        acks: Vec<ShareAck>,
    ) -> Result<(Vec<Acquired>, Vec<ShareAckResult>), tonic::Status> {
        let answer = self
            .client
            .fetch(ShareFetchRequest {
                group: self.group.clone(),
                member_id: self.id.clone(),
                max_records,
                max_bytes: 0,
                max_wait_ms: max_wait.as_millis() as u32,
                acks,
            })
            .await?
            .into_inner();
        Ok((records_of(&answer), answer.ack_results))
    }

    pub async fn ack(&mut self, acks: Vec<ShareAck>) -> Result<Vec<ShareAckResult>, tonic::Status> {
        Ok(self
            .client
            .acknowledge(ShareAcknowledgeRequest {
                group: self.group.clone(),
                member_id: self.id.clone(),
                acks,
            })
            .await?
            .into_inner()
            .results)
    }
}

/// The address of `group`'s share coordinator, asking each of `addrs` in turn until one
/// names a broker among them (a lookup naming a killed broker is asked again); panics once
/// `deadline` passes.
pub async fn find_share_coordinator(addrs: &[String], group: &str, deadline: std::time::Instant) -> String {
    let mut last = None;
    while std::time::Instant::now() < deadline {
        for a in addrs {
            let asked = tokio::time::timeout(JOIN_TIMEOUT, async {
                try_shares(a)
                    .await?
                    .find_share_coordinator(FindCoordinatorRequest { group: group.into() })
                    .await
            })
            .await;
            match asked {
                Ok(Ok(r)) if addrs.contains(&r.get_ref().address) => {
                    let address = r.into_inner().address;
                    // A broker named but dead (not yet known to be) is not the coordinator.
                    if try_shares(&address).await.is_ok() {
                        return address;
                    }
                }
                Ok(Ok(r)) => last = Some(format!("{a} named {:?}", r.get_ref().address)),
                Ok(Err(e)) => last = Some(format!("{a}: {e:?}")),
                Err(_) => last = Some(format!("{a}: no answer")),
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    panic!("no share coordinator of '{group}' found among {addrs:?} by the deadline; last: {last:?}");
}

/// An acknowledgement of one acquired record.
pub fn ack_of(r: &Acquired, kind: ShareAckKind) -> ShareAck {
    ShareAck {
        partition: r.partition,
        first_offset: r.offset,
        last_offset: r.offset,
        token: r.token,
        kind: kind as i32,
        delay_ms: 0,
        reason: String::new(),
    }
}

/// Acknowledgements of `records` with `kind`: one per delivery (partition and token),
/// spanning its records' offsets, in the order first seen.
pub fn acks_of(records: &[Acquired], kind: ShareAckKind) -> Vec<ShareAck> {
    let mut out: Vec<ShareAck> = Vec::new();
    for r in records {
        match out
            .iter_mut()
            .find(|a| a.partition == r.partition && a.token == r.token)
        {
            Some(a) => {
                a.first_offset = a.first_offset.min(r.offset);
                a.last_offset = a.last_offset.max(r.offset);
            }
            None => out.push(ack_of(r, kind)),
        }
    }
    out
}

/// The records of `answer` inside its acquired ranges, in order.
pub fn records_of(answer: &ShareFetchResponse) -> Vec<Acquired> {
    let mut out = Vec::new();
    for p in &answer.partitions {
        for batch in BatchIter::new(p.batches.clone()) {
            let batch = batch.expect("a fetched batch parses");
            batch.verify_crc().expect("a fetched batch's CRC holds");
            if batch.header().is_control() {
                continue;
            }
            for r in batch.records().expect("records") {
                let r = r.expect("a record");
                let Some(range) = p
                    .acquired
                    .iter()
                    .find(|a| a.first_offset <= r.offset && r.offset <= a.last_offset)
                else {
                    continue;
                };
                out.push(Acquired {
                    partition: p.partition,
                    offset: r.offset,
                    key: r.key,
                    value: r.value,
                    headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                    delivery_count: range.delivery_count,
                    token: range.token,
                });
            }
        }
    }
    out
}
