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
    #[error(
        "topic '{0}' is not compacted (cleanup.policy=delete); set cleanup.policy=compact or compact,delete first: conveyor topic alter {0} --config cleanup.policy=compact"
    )]
    NotCompacted(String),
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
    #[error("topic '{topic}' partition {partition}: {source} ([limits] max_uncompressed_batch_bytes)")]
    InflatesTooLarge {
        topic: String,
        partition: i32,
        #[source]
        source: BatchError,
    },
    /// A stored batch failed its check (CRC, frame) when the broker decoded it: its bytes
    /// changed on disk after they were acknowledged. Nothing of it is served.
    #[error(
        "topic '{topic}' partition {partition}: the stored batch at offset {offset} is damaged ({source}) and was not served; retry later, or read from another replica"
    )]
    DamagedOnDisk {
        topic: String,
        partition: i32,
        offset: u64,
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
    /// A read met a log that is quarantined or poisoned (damage found at rest, a failed
    /// write): this replica serves nothing of it until it is reopened and repaired, while
    /// another replica takes over. Retriable, like a lost leader.
    #[error(
        "topic '{topic}' partition {partition}: this replica cannot serve it ({source}); it repairs itself from its leader and another replica takes over: retry"
    )]
    ReplicaUnreadable {
        topic: String,
        partition: i32,
        #[source]
        source: LogError,
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
    #[error("topic '{topic}' partition {partition}: {refusal}")]
    Producer {
        topic: String,
        partition: i32,
        refusal: crate::replica::producers::ProducerRefusal,
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
    #[error("this broker is not the controller; broker {controller} at {address} is: ask it")]
    NotController { controller: u32, address: String },
    #[error("cannot issue a producer id: {reason}; retry shortly")]
    ProducerIdsUnavailable { reason: String },
    #[error(
        "cannot issue a producer id: {waiting} calls are already waiting for this broker's next block of ids; retry shortly"
    )]
    ProducerIdsBusy { waiting: usize },
    #[error(
        "topic '{topic}' partition {partition}: this broker's replica stopped after a failure ({reason}); it is reopened from its log by itself and another replica takes over leadership: retry"
    )]
    ReplicaStopped {
        topic: String,
        partition: i32,
        reason: String,
    },
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
    #[error("the broker is busy: {what} waited {waited_ms} ms for {memory} held by other requests; retry shortly")]
    Busy {
        what: String,
        memory: String,
        waited_ms: u64,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error(
        "broker {me} does not coordinate group '{group}'; broker {coordinator} at {address} does: send the request there"
    )]
    NotCoordinator {
        group: String,
        me: u32,
        coordinator: u32,
        address: String,
    },
    #[error("the coordinator of group '{group}' {state}; retry shortly")]
    CoordinatorLoading { group: String, state: String },
    #[error(
        "group '{group}' has no member '{member}' (its session expired, it left, or a static member with its instance id replaced it); rejoin with epoch 0"
    )]
    UnknownMember { group: String, member: String },
    #[error("group '{group}' member '{member}': {reason}; heartbeat for the current assignment and retry")]
    FencedMemberEpoch {
        group: String,
        member: String,
        reason: String,
    },
    #[error("group '{group}' has {members} member(s): {what} needs an empty group; stop its consumers first")]
    GroupNotEmpty {
        group: String,
        members: usize,
        what: String,
    },
    #[error("unknown group '{0}'")]
    UnknownGroup(String),
    #[error("{0}")]
    AssignmentFailed(String),
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
            BatchError::InflatesTooLarge { .. } => BrokerError::InflatesTooLarge {
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
            source @ (LogError::Corrupt { .. } | LogError::Poisoned { .. }) => BrokerError::ReplicaUnreadable {
                topic: topic.to_string(),
                partition,
                source,
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
            NotCompacted(_) => (Code::FailedPrecondition, ErrorCode::InvalidConfig, false),
            CorruptBatch { .. } => (Code::InvalidArgument, ErrorCode::CorruptBatch, false),
            RecordTooLarge { .. } | InflatesTooLarge { .. } => {
                (Code::InvalidArgument, ErrorCode::RecordTooLarge, false)
            }
            // Retriable: leadership may move to a healthy replica, or this one repair itself.
            DamagedOnDisk { .. } => (Code::DataLoss, ErrorCode::Storage, true),
            ReplicaUnreadable { .. } => (Code::Unavailable, ErrorCode::Storage, true),
            OffsetOutOfRange { .. } => (Code::OutOfRange, ErrorCode::OffsetOutOfRange, false),
            Storage { .. } | Internal(_) => (Code::Internal, ErrorCode::Storage, false),
            ShuttingDown => (Code::Unavailable, ErrorCode::ShuttingDown, true),
            TimedOut { .. } => (Code::DeadlineExceeded, ErrorCode::TimedOut, true),
            MetadataNotWritten { .. } | MetadataNotApplied { .. } => (Code::Unavailable, ErrorCode::Storage, true),
            MembershipInProgress { .. } => (Code::DeadlineExceeded, ErrorCode::MembershipChanging, true),
            MembershipBusy { .. } | Busy { .. } => (Code::ResourceExhausted, ErrorCode::Busy, true),
            LeaderNotAvailable { .. } | NoController => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            // Sends the client to the replica that takes over, like a lost leader.
            ReplicaStopped { .. } => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            BrokerUnreachable { .. } => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            ProducerIdsUnavailable { .. } => (Code::Unavailable, ErrorCode::LeaderNotAvailable, true),
            ProducerIdsBusy { .. } => (Code::ResourceExhausted, ErrorCode::Busy, true),
            NotController { .. } => (Code::FailedPrecondition, ErrorCode::NotLeader, true),
            NotLeader { .. } => (Code::FailedPrecondition, ErrorCode::NotLeader, true),
            OutOfSequence { .. } => (Code::FailedPrecondition, ErrorCode::OutOfSequence, true),
            Producer { refusal, .. } => refusal.code(),
            MembershipChanging { .. } => (Code::Unavailable, ErrorCode::MembershipChanging, true),
            UnknownBroker(_) => (Code::NotFound, ErrorCode::UnknownBroker, false),
            RemovedFromCluster(_) => (Code::Unavailable, ErrorCode::BrokerRemoved, true),
            CannotRemoveBroker { .. } => (Code::FailedPrecondition, ErrorCode::InvalidRequest, false),
            NotCoordinator { .. } => (Code::FailedPrecondition, ErrorCode::NotCoordinator, true),
            CoordinatorLoading { .. } => (Code::Unavailable, ErrorCode::CoordinatorLoading, true),
            UnknownMember { .. } => (Code::FailedPrecondition, ErrorCode::UnknownMember, false),
            FencedMemberEpoch { .. } => (Code::FailedPrecondition, ErrorCode::FencedMemberEpoch, false),
            GroupNotEmpty { .. } => (Code::FailedPrecondition, ErrorCode::GroupNotEmpty, false),
            UnknownGroup(_) => (Code::NotFound, ErrorCode::UnknownGroup, false),
            AssignmentFailed(_) => (Code::FailedPrecondition, ErrorCode::InvalidConfig, false),
        }
    }

    /// The code a client sees for this error.
    pub fn error_code(&self) -> ErrorCode {
        self.code().1
    }

    pub fn detail(&self) -> ErrorDetail {
        let (_, code, retriable) = self.code();
        let mut detail = ErrorDetail {
            code: code as i32,
            message: shorten(&self.to_string(), MAX_MESSAGE_BYTES),
            retriable,
            ..ErrorDetail::default()
        };
        use BrokerError::*;
        match self {
            UnknownTopic(t) | TopicExists(t) | NotCompacted(t) => detail.topic = t.clone(),
            UnknownPartition { topic, partition, .. }
            | CorruptBatch { topic, partition, .. }
            | RecordTooLarge { topic, partition, .. }
            | InflatesTooLarge { topic, partition, .. }
            | DamagedOnDisk { topic, partition, .. }
            | ReplicaUnreadable { topic, partition, .. }
            | LeaderNotAvailable { topic, partition }
            | MembershipChanging { topic, partition, .. }
            | ReplicaStopped { topic, partition, .. }
            | OutOfSequence { topic, partition, .. }
            | Producer { topic, partition, .. }
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
            NotCoordinator {
                coordinator, address, ..
            } => {
                detail.leader_id = *coordinator as i32;
                detail.leader_address = address.clone();
            }
            NotController { controller, address } => {
                detail.leader_id = *controller as i32;
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
        // Names come from the client: echo no more of one than a valid name can hold.
        detail.topic = shorten(&detail.topic, MAX_TOPIC_NAME_LEN);
        detail
    }
}

/// Longest topic name accepted (Kafka's rule); also the most of a name an error echoes.
pub const MAX_TOPIC_NAME_LEN: usize = 249;
/// Longest error message sent. Messages travel in HTTP/2 headers twice (the status message
/// and the encoded detail), and a client drops a response whose headers pass its limit
/// (16 KiB by default) with a protocol error instead of the broker's message.
const MAX_MESSAGE_BYTES: usize = 2048;

/// `text` cut to at most `max` bytes (on character boundaries): its start and its end, which
/// usually says what was wrong, around a note of how much was left out.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let floor = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    };
    let ceil = |mut at: usize| {
        while !text.is_char_boundary(at) {
            at += 1;
        }
        at
    };
    let keep = max.saturating_sub(48);
    let head = floor(keep * 2 / 3);
    let tail = ceil(text.len() - (keep - head));
    format!("{}…[{} bytes left out]…{}", &text[..head], tail - head, &text[tail..])
}

/// Refuses a topic name too long to exist before it is looked up or echoed: an unknown name
/// of any length would otherwise come back whole in the error.
pub fn check_topic_name_length(name: &str) -> Result<()> {
    if name.len() > MAX_TOPIC_NAME_LEN {
        return Err(BrokerError::InvalidTopicName {
            name: shorten(name, 64),
            reason: format!(
                "it is {} bytes long, longer than {MAX_TOPIC_NAME_LEN} characters",
                name.len()
            ),
        });
    }
    Ok(())
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let (code, _, _) = e.code();
        let detail = e.detail();
        Status::with_details(code, detail.message.clone(), detail.encode_to_vec().into())
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_echoing_a_huge_name_is_cut_but_keeps_its_reason() {
        let name = "n".repeat(10_000);
        let e = BrokerError::InvalidTopicName {
            name: name.clone(),
            reason: "it is longer than 249 characters".into(),
        };
        let detail = e.detail();
        assert!(detail.message.len() <= MAX_MESSAGE_BYTES, "{}", detail.message.len());
        assert!(
            detail.message.ends_with("longer than 249 characters"),
            "{}",
            detail.message
        );
        let e = BrokerError::UnknownTopic(name);
        assert!(e.detail().topic.len() <= MAX_TOPIC_NAME_LEN);
        let status = Status::from(e);
        assert!(status.message().len() <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn reading_a_quarantined_or_poisoned_log_is_a_retriable_error_not_internal() {
        let quarantined = LogError::Corrupt {
            path: "/data/topics/t/0/00000000000000000061.log".into(),
            detail: "batch at offset 101 is corrupt: batch CRC mismatch; reads are refused until the log is reopened and repaired".into(),
        };
        let poisoned = LogError::Poisoned { reason: "write".into() };
        for e in [quarantined, poisoned] {
            let status = Status::from(BrokerError::from_log("t", 0, e));
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let detail = ErrorDetail::decode(status.details()).expect("detail");
            assert!(detail.retriable, "{detail:?}");
            assert_eq!(detail.code, ErrorCode::Storage as i32);
            assert!(detail.message.contains("repairs itself"), "{}", detail.message);
        }
    }

    #[test]
    fn shortening_respects_character_boundaries() {
        let text = "é".repeat(3000);
        for max in [0, 1, 49, 50, 51, 100, 1001] {
            let cut = shorten(&text, max);
            assert!(cut.len() <= max.max(48 + 40), "{max}: {}", cut.len());
        }
        assert_eq!(shorten("short", 100), "short");
        let long_name = "t".repeat(10_000);
        let e = check_topic_name_length(&long_name).expect_err("too long");
        assert!(e.to_string().contains("longer than 249"), "{e}");
        assert!(e.to_string().len() < 300, "{e}");
        check_topic_name_length(&"t".repeat(249)).expect("249 is fine");
    }
}
