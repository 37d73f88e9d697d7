//! Offsets of partitions a coordinator does not necessarily lead: log ends for lag, the
//! earliest, latest or first-at-a-time offset for `reset-offsets`. Asked of this broker's
//! replica when it leads the partition, otherwise of the leader over its client service
//! (one call per leader, bounded in time: a broker that does not answer leaves its
//! partitions unknown rather than holding the coordinator up).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use conveyor_proto::v1::fetch_client::FetchClient;
use conveyor_proto::v1::{ListOffsetsRequest, OffsetQuery, offset_query};

use super::groups::assignor::TopicPartition;
use crate::blocking::blocking;
use crate::controller::Registry;
use crate::error::{BrokerError, Result};

/// How long a leader elsewhere is given to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Which offset of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    Earliest,
    /// The high watermark.
    Latest,
    /// The first offset at or after this time (ms since the Unix epoch); the high watermark
    /// when every record is older.
    Timestamp(i64),
}

/// The offset `spec` names in each partition, where it could be learned.
pub async fn lookup(registry: &Registry, partitions: &[TopicPartition], spec: Spec) -> HashMap<TopicPartition, u64> {
    let mut found = HashMap::new();
    let mut elsewhere: BTreeMap<u32, Vec<TopicPartition>> = BTreeMap::new();
    for p in partitions {
        let Ok(topic) = registry.get(&p.topic) else { continue };
        match registry.leader(&topic, p.partition) {
            Ok(replica) => {
                if let Ok(offset) = local(&replica, spec).await {
                    found.insert(p.clone(), offset);
                }
            }
            Err(BrokerError::NotLeader { leader, .. }) if leader != 0 => {
                elsewhere.entry(leader).or_default().push(p.clone());
            }
            Err(_) => {}
        }
    }
    let asks = elsewhere
        .into_iter()
        .map(|(leader, ps)| async move { ask(registry, leader, ps, spec).await.unwrap_or_default() });
    for answers in futures::future::join_all(asks).await {
        found.extend(answers);
    }
    found
}

async fn local(replica: &crate::replica::partition::Partition, spec: Spec) -> Result<u64> {
    let hw = replica.high_watermark();
    Ok(match spec {
        Spec::Earliest => replica.log().log_start_offset(),
        Spec::Latest => hw,
        Spec::Timestamp(ts) => {
            let log = replica.log();
            let (topic, index) = (replica.topic.clone(), replica.index);
            let at = blocking(move || {
                log.offset_for_timestamp(ts)
                    .map_err(|e| BrokerError::from_log(&topic, index, e))
            })
            .await?;
            at.filter(|o| *o < hw).unwrap_or(hw)
        }
    })
}

async fn ask(
    registry: &Registry,
    leader: u32,
    partitions: Vec<TopicPartition>,
    spec: Spec,
) -> Result<HashMap<TopicPartition, u64>> {
    let transport = registry.transport();
    let channel = crate::peer::connect(leader, transport.client_address(leader), ASK_TIMEOUT).await?;
    let query = |p: &TopicPartition| OffsetQuery {
        topic: p.topic.clone(),
        partition: p.partition,
        spec: Some(match spec {
            Spec::Earliest => offset_query::Spec::Earliest(true),
            Spec::Latest => offset_query::Spec::Latest(true),
            Spec::Timestamp(ts) => offset_query::Spec::Timestamp(ts),
        }),
    };
    let request = ListOffsetsRequest {
        queries: partitions.iter().map(query).collect(),
    };
    let answer = tokio::time::timeout(ASK_TIMEOUT, FetchClient::new(channel).list_offsets(request))
        .await
        .map_err(|_| BrokerError::BrokerUnreachable {
            id: leader,
            address: transport.client_address(leader).unwrap_or_default(),
            reason: format!("no answer within {ASK_TIMEOUT:?}"),
        })?
        .map_err(|status| BrokerError::BrokerUnreachable {
            id: leader,
            address: transport.client_address(leader).unwrap_or_default(),
            reason: status.message().to_string(),
        })?;
    Ok(answer
        .into_inner()
        .results
        .into_iter()
        .map(|r| (TopicPartition::new(r.topic, r.partition), r.offset))
        .collect())
}
