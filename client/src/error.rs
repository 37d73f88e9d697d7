//! Client errors. Broker errors keep the broker's `ErrorDetail` (code, topic, partition,
//! offsets), so callers can act on them.

use conveyor_proto::v1::{ErrorCode, ErrorDetail};
use prost::Message;

/// What went wrong, with the broker's detail when it answered.
///
/// ```no_run
/// # async fn run(client: conveyor_client::Client) {
/// use conveyor_client::proto::ErrorCode;
/// match client.admin().describe_topic("orders").await {
///     Ok(topic) => println!("{} partitions", topic.partitions.len()),
///     Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => println!("no such topic"),
///     Err(e) if e.is_retriable() => println!("try again later: {e}"),
///     Err(e) => println!("error: {e}"),
/// }
/// # }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("cannot reach a Conveyor broker at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("{message}")]
    Broker {
        code: tonic::Code,
        message: String,
        detail: Option<Box<ErrorDetail>>,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("record batch error: {0}")]
    Batch(#[from] conveyor_storage::BatchError),
    /// A fetched batch is damaged (as Kafka's `check.crcs`): it failed its CRC check, or a
    /// header field the CRC does not cover (its base offset) does not follow from the offset
    /// asked for or the batch before it. Its bytes were altered on disk or in transit, and
    /// none of its records were delivered. Retriable: the partition's leader may change, or
    /// the broker may repair its copy.
    #[error(
        "topic '{topic}' partition {partition}: fetched batch at offset {offset} is corrupt: {problem}; none of its records were delivered"
    )]
    CorruptBatch {
        topic: String,
        partition: i32,
        offset: u64,
        problem: String,
    },
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    #[error("the producer or consumer is closed")]
    Closed,
    /// An idempotent producer stopped for good: a newer epoch of its producer id fenced it
    /// (`code` PRODUCER_FENCED), or the cluster cannot issue producer ids. Every later send
    /// of that producer fails with this error; create a new producer to go on.
    #[error("the producer stopped for good: {reason}")]
    ProducerStopped { reason: String, code: Option<ErrorCode> },
    /// No broker could say which broker coordinates `group`, or the one named did not answer,
    /// within the call's deadline. Retriable: the leader of the `__consumer_offsets`
    /// partition that holds the group is being elected, or the cluster is unreachable.
    #[error(
        "no coordinator of consumer group '{group}' answered: {reason}; retry shortly (the leader of the __consumer_offsets partition that holds the group may be changing)"
    )]
    CoordinatorNotAvailable { group: String, reason: String },
    /// As [`ClientError::CoordinatorNotAvailable`], for a share group: the leader of the
    /// `__share_state` partition that holds it is being elected, or the cluster is
    /// unreachable. Retriable.
    #[error(
        "no coordinator of share group '{group}' answered: {reason}; retry shortly (the leader of the __share_state partition that holds the group may be changing)"
    )]
    ShareCoordinatorNotAvailable { group: String, reason: String },
    /// A group member was assigned a partition that has no committed offset, and its reset
    /// policy is `none`. The partition stays assigned and idle until the member seeks it.
    #[error(
        "consumer group '{group}' has no committed offset for topic '{topic}' partition {partition} and its offset reset policy is none: seek the partition, commit or reset an offset for it (`conveyor group reset-offsets {group} --topic {topic} --to-earliest`, with the group stopped), or use reset earliest or latest"
    )]
    NoCommittedOffset {
        group: String,
        topic: String,
        partition: i32,
    },
    /// A group consumer had something to commit while it was not a member of its group (it
    /// is joining, or just lost its partitions): the partitions' owners go on from the
    /// group's last committed offsets.
    #[error(
        "not a member of consumer group '{group}' at the moment (joining, or its partitions were just lost): nothing was committed"
    )]
    NotMember { group: String },
    /// A bounded queue is full (the message says which, and what to do). Retriable once the work
    /// ahead of it finished.
    #[error("{0}")]
    QueueFull(String),
}

impl ClientError {
    /// The broker's error code, when the broker answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker { detail: Some(d), .. } => ErrorCode::try_from(d.code).ok(),
            ClientError::ProducerStopped { code, .. } => *code,
            _ => None,
        }
    }

    /// True when retrying the same request later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Unreachable { .. }
            | ClientError::Timeout(_)
            | ClientError::CorruptBatch { .. }
            | ClientError::CoordinatorNotAvailable { .. }
            | ClientError::ShareCoordinatorNotAvailable { .. }
            | ClientError::QueueFull(_) => true,
            ClientError::Broker { code, detail, .. } => {
                detail.as_ref().is_some_and(|d| d.retriable)
                    || matches!(code, tonic::Code::Unavailable | tonic::Code::ResourceExhausted)
            }
            _ => false,
        }
    }

    /// True when the call's deadline passed while the operation it started goes on at the
    /// broker (a membership change catching up, say): the same call again follows it.
    pub fn is_in_progress(&self) -> bool {
        matches!(
            self,
            ClientError::Broker {
                code: tonic::Code::DeadlineExceeded,
                ..
            }
        ) && self.code() == Some(ErrorCode::MembershipChanging)
    }

    /// The same error, naming `address` where it says which broker could not be reached
    /// (a status converts with a placeholder; the caller knows the address).
    pub(crate) fn at(self, address: &str) -> ClientError {
        match self {
            ClientError::Unreachable { reason, .. } => ClientError::Unreachable {
                address: address.to_string(),
                reason,
            },
            e => e,
        }
    }

    /// A call (a produce stream, `InitProducer`) that failed with `status` on its way to or
    /// from `address`. `Cancelled` or `Unknown` without the broker's own error detail is a
    /// broken connection (the broker died, the link dropped, or a broker shutting down closed
    /// it: hyper then reports the call "canceled"): retriable, as unreachable. Other codes
    /// (`Unimplemented` from an older broker, a size limit's `ResourceExhausted`) keep their
    /// meaning.
    pub(crate) fn from_call(status: tonic::Status, address: &str) -> ClientError {
        match ClientError::from(status) {
            e @ ClientError::Broker { detail: Some(_), .. } => e,
            ClientError::Broker {
                code: tonic::Code::Cancelled | tonic::Code::Unknown,
                message,
                ..
            } => ClientError::Unreachable {
                address: address.to_string(),
                reason: message,
            },
            e => e.at(address),
        }
    }

    pub(crate) fn from_detail(detail: ErrorDetail) -> ClientError {
        let code = match ErrorCode::try_from(detail.code) {
            Ok(
                ErrorCode::UnknownTopic
                | ErrorCode::UnknownPartition
                | ErrorCode::UnknownBroker
                | ErrorCode::UnknownGroup,
            ) => tonic::Code::NotFound,
            Ok(ErrorCode::OffsetOutOfRange) => tonic::Code::OutOfRange,
            Ok(ErrorCode::Busy) => tonic::Code::ResourceExhausted,
            Ok(
                ErrorCode::ShuttingDown
                | ErrorCode::LeaderNotAvailable
                | ErrorCode::MembershipChanging
                | ErrorCode::BrokerRemoved
                | ErrorCode::CoordinatorLoading,
            ) => tonic::Code::Unavailable,
            Ok(
                ErrorCode::NotLeader
                | ErrorCode::OutOfSequence
                | ErrorCode::OutOfOrderSequence
                | ErrorCode::ProducerFenced
                | ErrorCode::UnknownProducerId
                | ErrorCode::InvalidProducerId
                | ErrorCode::NotCoordinator
                | ErrorCode::UnknownMember
                | ErrorCode::FencedMemberEpoch
                | ErrorCode::GroupNotEmpty
                | ErrorCode::StaleDelivery,
            ) => tonic::Code::FailedPrecondition,
            Ok(ErrorCode::Storage) => tonic::Code::Internal,
            Ok(ErrorCode::TimedOut) => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::InvalidArgument,
        };
        ClientError::Broker {
            code,
            message: detail.message.clone(),
            detail: Some(Box::new(detail)),
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let detail = ErrorDetail::decode(status.details())
            .ok()
            .filter(|d| d.code != 0)
            .map(Box::new);
        if detail.is_none() && status.code() == tonic::Code::Unavailable {
            return ClientError::Unreachable {
                address: "the broker".into(),
                reason: status.message().to_string(),
            };
        }
        ClientError::Broker {
            code: status.code(),
            message: status.message().to_string(),
            detail,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_canceled_by_a_broker_closing_its_connections_is_retried_not_failed() {
        let status = tonic::Status::cancelled("operation was canceled");
        assert!(
            !ClientError::from(status.clone()).is_retriable(),
            "as a broker's answer it is final"
        );
        let error = ClientError::from_call(status, "127.0.0.1:1");
        assert!(error.is_retriable(), "{error}");
    }

    #[test]
    fn a_stream_refused_for_a_reason_a_retry_cannot_change_fails() {
        for status in [
            tonic::Status::unimplemented("unknown service"),
            tonic::Status::permission_denied("no"),
            tonic::Status::invalid_argument("bad"),
        ] {
            let code = status.code();
            let error = ClientError::from_call(status, "127.0.0.1:1");
            assert!(!error.is_retriable(), "{code:?}: {error}");
        }
        // Retriable or not as any broker answer with its code, not as a broken link.
        let error = ClientError::from_call(tonic::Status::resource_exhausted("message too large"), "127.0.0.1:1");
        assert!(
            matches!(
                error,
                ClientError::Broker {
                    code: tonic::Code::ResourceExhausted,
                    ..
                }
            ),
            "{error:?}"
        );
        let error = ClientError::from_call(tonic::Status::unknown("transport error"), "127.0.0.1:1");
        assert!(error.is_retriable(), "{error}");
    }
}
