//! Share group members over the raw `Shares` protocol: sessions held open, fetches and
//! acknowledgements exactly as sent, and the records of a fetch's acquired ranges.

use std::time::Duration;

use bytes::Bytes;
use conveyor_client::proto::shares_client::SharesClient;
use conveyor_client::proto::*;
use conveyor_storage::batch::BatchIter;
use prost::Message as _;
use tonic::transport::Channel;

pub async fn shares(addr: &str) -> SharesClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("address")
        .connect()
        .await
        .expect("connect");
    SharesClient::new(channel)
}

pub fn detail(status: &tonic::Status) -> ErrorDetail {
    ErrorDetail::decode(status.details()).unwrap_or_default()
}

/// A member's open session: dropping it ends the session (and releases its records).
pub struct RawMember {
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
        let mut client = shares(addr).await;
        let mut session = client
            .join(ShareJoinRequest {
                group: group.into(),
                member_id: id.into(),
                topic: topic.into(),
                settings: Some(settings),
            })
            .await?
            .into_inner();
        let first = session
            .message()
            .await?
            .ok_or_else(|| tonic::Status::unavailable("the session ended before its first event"))?;
        Ok(RawMember {
            group: group.into(),
            id: id.into(),
            client,
            first,
            session,
        })
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
