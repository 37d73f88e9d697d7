//! Broker errors and their mapping to gRPC: a status code plus a `conveyor.v1.ErrorDetail`
//! in the status details, as ARCHITECTURE.md section 6 fixes.

use conveyor_proto::v1::{ErrorCode, ErrorDetail};
use conveyor_storage::{BatchError, LogError};
use prost::Message;
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("unknown topic '{0}'")]
    UnknownTopic(String),
    #[error("topic '{topic}' has no partition {partition} (it has {count})")]
    UnknownPartition { topic: String, partition: i32, count: u32 },
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    #[error("invalid topic name '{name}': {reason}")]
    InvalidTopicName { name: String, reason: String },
    #[error("invalid partition count {0}: must be between 1 and {1}")]
    InvalidPartitions(i32, u32),
    #[error("invalid replication factor {0}: this cluster has {1} broker(s)")]
    InvalidReplication(i32, u32),
    #[error("invalid topic config: {0}")]
    InvalidConfig(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("topic '{topic}' partition {partition}: corrupt batch: {source}")]
    CorruptBatch {
        topic: String,
        partition: i32,
        #[source]
        source: BatchError,
    },
    #[error("topic '{topic}' partition {partition}: {source} (max.message.bytes)")]
    RecordTooLarge {
        topic: String,
        partition: i32,
        #[source]
        source: BatchError,
    },
    #[error("topic '{topic}' partition {partition}: offset {offset} is outside [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        topic: String,
        partition: i32,
        offset: u64,
        log_start_offset: u64,
        log_end_offset: u64,
    },
    #[error("topic '{topic}' partition {partition}: storage failure: {source}")]
    Storage {
        topic: String,
        partition: i32,
        #[source]
        source: LogError,
    },
    #[error("topic '{topic}' partition {partition} has no leader right now; retry shortly")]
    LeaderNotAvailable { topic: String, partition: i32 },
    #[error("topic '{topic}' partition {partition} is led by broker {leader} at {address}; send the request there")]
    NotLeader {
        topic: String,
        partition: i32,
        leader: u32,
        address: String,
    },
    #[error("topic '{topic}' partition {partition}: membership change under way: {reason}; retry shortly")]
    MembershipChanging {
        topic: String,
        partition: i32,
        reason: String,
    },
    #[error(
        "topic '{topic}' partition {partition}: produce stream part {got} refused because part {expected} before it was not appended; resend from the first refused part, in order"
    )]
    OutOfSequence {
        topic: String,
        partition: i32,
        expected: u64,
        got: u64,
    },
    #[error(
        "broker {0} was removed from the cluster and serves nothing; ask another broker (to use this one again, wipe its data directory and add it with --join and cluster add-node)"
    )]
    RemovedFromCluster(u32),
    #[error("broker {0} is not a member of this cluster")]
    UnknownBroker(u32),
    #[error("cannot remove broker {id}: {reason}")]
    CannotRemoveBroker { id: u32, reason: String },
    #[error("the cluster has no controller right now; retry shortly")]
    NoController,
    #[error("cannot reach broker {id} at {address}: {reason}")]
    BrokerUnreachable { id: u32, address: String, reason: String },
    #[error("the broker is shutting down")]
    ShuttingDown,
    #[error("{what} did not finish within {after:?}: {state}")]
    TimedOut {
        what: String,
        after: std::time::Duration,
        state: String,
    },
    #[error(
        "the {what} could not be written to the cluster metadata log on broker {broker}: {reason}; free disk space there; if the record reached other brokers first it may still take effect, so look (topic list, cluster info) before repeating the call"
    )]
    MetadataNotWritten { what: String, broker: u32, reason: String },
    #[error(
        "the {what} was committed, but broker {broker} has not applied it yet: {reason}; the broker retries until it succeeds (see `conveyor cluster info`), and the change takes effect there then"
    )]
    MetadataNotApplied { what: String, broker: u32, reason: String },
    #[error("{progress}; it goes on in the background: repeat the same command to wait for it")]
    MembershipInProgress { progress: String },
    #[error(
        "another membership change is running: {progress}; wait for it to finish (repeat that command to follow it), then retry"
    )]
    MembershipBusy { progress: String },
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    pub fn from_batch(topic: &str, partition: i32, e: BatchError) -> BrokerError {
        let (topic, source) = (topic.to_string(), e);
        match source {
            BatchError::TooLarge { .. } => BrokerError::RecordTooLarge {
                topic,
                partition,
                source,
            },
            _ => BrokerError::CorruptBatch {
                topic,
                partition,
                source,
            },
        }
    }

    pub fn from_log(topic: &str, partition: i32, e: LogError) -> BrokerError {
        match e {
            LogError::Batch(b) => Self::from_batch(topic, partition, b),
            LogError::OffsetOutOfRange {
                requested,
                log_start_offset,
                log_end_offset,
            } => BrokerError::OffsetOutOfRange {
                topic: topic.to_string(),
                partition,
                offset: requested,
                log_start_offset,
                log_end_offset,
            },
            source => BrokerError::Storage {
                topic: topic.to_string(),
                partition,
                source,
            },
        }
    }

    fn code(&self) -> (Code, ErrorCode, bool) {
        use BrokerError::*;
        match self {
            UnknownTopic(_) => (Code::NotFound, ErrorCode::UnknownTopic, false),
            UnknownPartition { .. } => (Code::NotFound, ErrorCode::UnknownPartition, false),
            TopicExists(_) => (Code::AlreadyExists, ErrorCode::TopicExists, false),
            InvalidTopicName { .. } => (Code::InvalidArgument, ErrorCode::InvalidTopicName, false),
            InvalidPartitions(..) => (Code::InvalidArgument, ErrorCode::InvalidPartitions, false),
            InvalidReplication(..) | InvalidConfig(_) => (Code::InvalidArgument, ErrorCode::InvalidConfig, false),
            InvalidRequest(_) => (Code::InvalidArgument, ErrorCode::InvalidRequest, false),
            CorruptBatch { .. } => (Code::InvalidArgument, ErrorCode::CorruptBatch, false),
            RecordTooLarge { .. } => (Code::InvalidArgument, ErrorCode::RecordTooLarge, false),
            OffsetOutOfRange { .. } => (Code::OutOfRange, ErrorCode::OffsetOutOfRange, false),
            Storage { .. } | Internal(_) => (Code::Internal, ErrorCode::Storage, false),
            ShuttingDown => (Code::Unavailable, ErrorCode::ShuttingDown, true),
            TimedOut { .. } => (Code::DeadlineExceeded, ErrorCode::TimedOut, true),
            MetadataNotWritten { .. } | MetadataNotApplied { .. } => (Code::Unavailable, ErrorCode::Storage, true),
            MembershipInProgress { .. } => (Code::DeadlineExceeded, ErrorCode::MembershipChanging, true),
            MembershipBusy { .. } => (Code::ResourceExhausted, ErrorCode::Busy, true),
            LeaderNotAvailable { .. } | NoController => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            BrokerUnreachable { .. } => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            NotLeader { .. } => (Code::FailedPrecondition, ErrorCode::NotLeader, true),
            OutOfSequence { .. } => (Code::FailedPrecondition, ErrorCode::OutOfSequence, true),
            MembershipChanging { .. } => (Code::Unavailable, ErrorCode::MembershipChanging, true),
            UnknownBroker(_) => (Code::NotFound, ErrorCode::UnknownBroker, false),
            RemovedFromCluster(_) => (Code::Unavailable, ErrorCode::BrokerRemoved, true),
            CannotRemoveBroker { .. } => (Code::FailedPrecondition, ErrorCode::InvalidRequest, false),
        }
    }

    pub fn detail(&self) -> ErrorDetail {
        let (_, code, retriable) = self.code();
        let mut detail = ErrorDetail {
            code: code as i32,
            message: self.to_string(),
            retriable,
            ..ErrorDetail::default()
        };
        use BrokerError::*;
        match self {
            UnknownTopic(t) | TopicExists(t) => detail.topic = t.clone(),
            UnknownPartition { topic, partition, .. }
            | CorruptBatch { topic, partition, .. }
            | RecordTooLarge { topic, partition, .. }
            | LeaderNotAvailable { topic, partition }
            | MembershipChanging { topic, partition, .. }
            | OutOfSequence { topic, partition, .. }
            | Storage { topic, partition, .. } => {
                detail.topic = topic.clone();
                detail.partition = *partition;
            }
            NotLeader {
                topic,
                partition,
                leader,
                address,
            } => {
                detail.topic = topic.clone();
                detail.partition = *partition;
                detail.leader_id = *leader as i32;
                detail.leader_address = address.clone();
            }
            OffsetOutOfRange {
                topic,
                partition,
                log_start_offset,
                log_end_offset,
                ..
            } => {
                detail.topic = topic.clone();
                detail.partition = *partition;
                detail.log_start_offset = *log_start_offset;
                detail.log_end_offset = *log_end_offset;
            }
            _ => {}
        }
        detail
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let (code, _, _) = e.code();
        let detail = e.detail();
        Status::with_details(code, detail.message.clone(), detail.encode_to_vec().into())
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
