//! Topic, offset and cluster administration.

use conveyor_proto::v1::admin_client::AdminClient;
use conveyor_proto::v1::fetch_client::FetchClient;
use conveyor_proto::v1::*;

use tonic::transport::Channel;

use crate::Client;
use crate::error::Result;

/// Where to look up an offset.
///
/// ```no_run
/// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
/// use conveyor_client::OffsetSpec;
/// let end = client.admin().list_offset("orders", 0, OffsetSpec::Latest).await?;
/// println!("high watermark {}, log end {}", end.high_watermark, end.log_end_offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    Earliest,
    /// The high watermark: the offset the next visible record will get.
    Latest,
    /// The first record at or after this timestamp (ms since the Unix epoch).
    Timestamp(i64),
}

/// An idempotent producer a partition keeps state for, as its leader reports it
/// ([`Admin::list_producers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveProducer {
    pub producer_id: i64,
    pub producer_epoch: i16,
    /// Sequence of the last record of the producer's last batch on the partition: its next
    /// batch must start at `last_sequence + 1`.
    pub last_sequence: i32,
    /// Offset of the last record of that batch.
    pub last_offset: u64,
    /// When the producer last wrote to the partition (ms since the Unix epoch); the partition
    /// forgets a producer idle for longer than the broker's producer id expiration.
    pub last_write_ms: i64,
    /// How many of its latest batches the partition remembers to answer retries with their
    /// original offsets.
    pub cached_batches: u32,
}

impl TryFrom<ProducerState> for ActiveProducer {
    type Error = crate::ClientError;

    fn try_from(p: ProducerState) -> Result<ActiveProducer> {
        let producer_epoch = i16::try_from(p.producer_epoch).map_err(|_| {
            crate::ClientError::InvalidArgument(format!(
                "the broker reported producer {} with epoch {}, outside an epoch's range",
                p.producer_id, p.producer_epoch
            ))
        })?;
        Ok(ActiveProducer {
            producer_id: p.producer_id,
            producer_epoch,
            last_sequence: p.last_sequence,
            last_offset: p.last_offset,
            last_write_ms: p.last_timestamp,
            cached_batches: p.cached_batches,
        })
    }
}

/// Admin calls. Obtain one with [`Client::admin`].
///
/// ```no_run
/// # async fn run() -> Result<(), conveyor_client::ClientError> {
/// let client = conveyor_client::Client::connect("127.0.0.1:9292").await?;
/// let admin = client.admin();
/// admin.create_topic("deliveries", 6, &[("retention.ms", "86400000")]).await?;
/// for topic in admin.list_topics().await? {
///     println!("{} ({} partitions)", topic.name, topic.partitions);
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    pub(crate) fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// Runs an admin call on any broker that answers.
    async fn call<Req, T, F, Fut>(&self, request: Req, f: F) -> Result<T>
    where
        Req: Clone,
        F: Fn(AdminClient<Channel>, Req) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.client
            .cluster()
            .any(|channel| {
                let fut = f(AdminClient::new(channel), request.clone());
                async move { Ok(fut.await?.into_inner()) }
            })
            .await
    }

    /// Creates a topic with `partitions` partitions and per-topic config overrides.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) -> Result<TopicDescription> {
        self.create_replicated_topic(name, partitions, 0, configs).await
    }

    /// As [`create_topic`](Self::create_topic) with `replication_factor` replicas per
    /// partition (0: the broker default).
    pub async fn create_replicated_topic(
        &self,
        name: &str,
        partitions: i32,
        replication_factor: i32,
        configs: &[(&str, &str)],
    ) -> Result<TopicDescription> {
        let request = CreateTopicRequest {
            name: name.to_string(),
            partitions,
            replication_factor,
            configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        let response = self
            .call(request, |mut c, r| async move { c.create_topic(r).await })
            .await?;
        Ok(response.topic.unwrap_or_default())
    }

    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = DeleteTopicRequest { name: name.to_string() };
        self.call(request, |mut c, r| async move { c.delete_topic(r).await })
            .await?;
        Ok(())
    }

    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        let response = self
            .call(ListTopicsRequest {}, |mut c, r| async move { c.list_topics(r).await })
            .await?;
        Ok(response.topics)
    }

    /// Partitions with their offsets, and the effective config (defaults included).
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let request = DescribeTopicRequest { name: name.to_string() };
        self.call(request, |mut c, r| async move { c.describe_topic(r).await })
            .await
    }

    /// Sets config keys; an empty value resets a key to the broker default.
    pub async fn alter_topic_config(&self, name: &str, configs: &[(&str, &str)]) -> Result<TopicDescription> {
        let request = AlterTopicConfigRequest {
            name: name.to_string(),
            configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        self.call(request, |mut c, r| async move { c.alter_topic_config(r).await })
            .await
    }

    pub async fn describe_cluster(&self) -> Result<ClusterDescription> {
        self.call(DescribeClusterRequest {}, |mut c, r| async move {
            c.describe_cluster(r).await
        })
        .await
    }

    /// Moves a partition's leadership to broker `to` (one of its replicas) and waits until
    /// it has moved.
    pub async fn transfer_leader(&self, topic: &str, partition: i32, to: i32) -> Result<i32> {
        let request = TransferLeaderRequest {
            topic: topic.to_string(),
            partition,
            to,
        };
        let response = self
            .call(request, |mut c, r| async move { c.transfer_leader(r).await })
            .await?;
        Ok(response.leader)
    }

    /// Adds broker `id`, reachable at `address`, to the cluster. The broker must be running
    /// with `--join`. Returns once it votes in the controller group; idempotent. Like every
    /// membership call it answers within the broker's deadline (20 s): if not done by then,
    /// the error's [`is_in_progress`](crate::ClientError::is_in_progress) is true and its
    /// message names the step under way; the same call again follows the operation.
    pub async fn add_broker(&self, id: i32, address: &str) -> Result<ClusterDescription> {
        let request = AddBrokerRequest {
            id,
            address: address.to_string(),
        };
        let response = self
            .call(request, |mut c, r| async move { c.add_broker(r).await })
            .await?;
        Ok(response.cluster.unwrap_or_default())
    }

    /// Removes broker `id` from the cluster: its replicas move to other live brokers first.
    /// Returns the moves made; idempotent, so a removal that failed half-way can be repeated.
    /// Answers within the broker's deadline, as [`add_broker`](Self::add_broker) says; while
    /// it runs, another membership call fails with `BUSY`.
    pub async fn remove_broker(&self, id: i32) -> Result<RemoveBrokerResponse> {
        self.call(RemoveBrokerRequest { id }, |mut c, r| async move {
            c.remove_broker(r).await
        })
        .await
    }

    /// Moves a partition's replicas onto exactly `replicas` (as many as it has), one replica
    /// at a time with no downtime; the first becomes the preferred leader. Returns the moves
    /// made once they are done; repeating it finishes a move that stopped half-way. Answers
    /// within the broker's deadline, as [`add_broker`](Self::add_broker) says.
    pub async fn reassign_partition(&self, topic: &str, partition: i32, replicas: &[i32]) -> Result<Vec<ReplicaMove>> {
        let request = ReassignPartitionRequest {
            topic: topic.to_string(),
            partition,
            replicas: replicas.to_vec(),
        };
        let response = self
            .call(request, |mut c, r| async move { c.reassign_partition(r).await })
            .await?;
        Ok(response.moves)
    }

    /// Evens out replicas per live broker (after adding a broker, say); with `dry_run`, only
    /// says which replicas would move. Returns the moves. Answers within the broker's
    /// deadline, as [`add_broker`](Self::add_broker) says.
    pub async fn rebalance(&self, dry_run: bool) -> Result<Vec<ReplicaMove>> {
        let response = self
            .call(
                RebalanceRequest { dry_run },
                |mut c, r| async move { c.rebalance(r).await },
            )
            .await?;
        Ok(response.moves)
    }

    /// The idempotent producers partition `partition` of `topic` keeps state for, by producer
    /// id, as its leader knows them. Asked of the leader; a broker that does not lead the
    /// partition forwards the call.
    ///
    /// ```no_run
    /// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
    /// for p in client.admin().list_producers("orders", 0).await? {
    ///     println!("producer {} epoch {}: last offset {}", p.producer_id, p.producer_epoch, p.last_offset);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_producers(&self, topic: &str, partition: i32) -> Result<Vec<ActiveProducer>> {
        let request = ListProducersRequest {
            topic: topic.to_string(),
            partition,
        };
        let response = self
            .client
            .cluster()
            .with_leader(topic, partition, |channel| {
                let request = request.clone();
                async move { Ok(AdminClient::new(channel).list_producers(request).await?.into_inner()) }
            })
            .await?;
        let mut producers = response
            .producers
            .into_iter()
            .map(ActiveProducer::try_from)
            .collect::<Result<Vec<_>>>()?;
        producers.sort_by_key(|p| p.producer_id);
        Ok(producers)
    }

    /// Compacts `topic` (every partition, or only `partition`) now, whatever its dirty
    /// ratio: every replica, on every broker holding one, compacts its own log below its
    /// high watermark. With `wait`, answers when the passes are done, with what each did;
    /// otherwise once they started. A topic whose `cleanup.policy` is `delete` is refused
    /// (FAILED_PRECONDITION).
    ///
    /// ```no_run
    /// # async fn run(client: conveyor_client::Client) -> Result<(), conveyor_client::ClientError> {
    /// for r in client.admin().compact_topic("drone-positions", None, true).await? {
    ///     println!("partition {} on broker {}: {} ({} -> {} bytes)", r.partition, r.broker, r.outcome, r.bytes_before, r.bytes_after);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn compact_topic(
        &self,
        topic: &str,
        partition: Option<i32>,
        wait: bool,
    ) -> Result<Vec<ReplicaCompaction>> {
        let request = CompactTopicRequest {
            topic: topic.to_string(),
            partition,
            wait,
        };
        let response = self
            .call(request, |mut c, r| async move { c.compact_topic(r).await })
            .await?;
        Ok(response.replicas)
    }

    /// Looks up an offset of one partition.
    pub async fn list_offset(&self, topic: &str, partition: i32, spec: OffsetSpec) -> Result<OffsetResult> {
        let spec = match spec {
            OffsetSpec::Earliest => offset_query::Spec::Earliest(true),
            OffsetSpec::Latest => offset_query::Spec::Latest(true),
            OffsetSpec::Timestamp(ts) => offset_query::Spec::Timestamp(ts),
        };
        let request = ListOffsetsRequest {
            queries: vec![OffsetQuery {
                topic: topic.to_string(),
                partition,
                spec: Some(spec),
            }],
        };
        let mut results = self
            .client
            .cluster()
            .with_leader(topic, partition, |channel| {
                let request = request.clone();
                async move { Ok(FetchClient::new(channel).list_offsets(request).await?.into_inner()) }
            })
            .await?
            .results;
        results
            .pop()
            .ok_or_else(|| crate::ClientError::InvalidArgument("the broker returned no offset".into()))
    }
}
