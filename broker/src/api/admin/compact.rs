//! `CompactTopic`: a compaction pass now on every replica of a compacting topic's
//! partitions. Each broker compacts its own replicas (each replica's log is its own; see
//! [`crate::cleaner`]); the broker asked first asks the others holding replicas, once (a
//! forwarded request is answered from this broker's replicas alone), and merges the answers.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use conveyor_proto::v1::{CompactTopicRequest, CompactTopicResponse, ReplicaCompaction};
use conveyor_storage::CompactionPolicy;
use tonic::{Request, Response, Status};

use super::AdminService;
use crate::api::forward::{forward, forwarded};
use crate::cleaner::{MAX_QUEUED_REQUESTS, Queued};
use crate::controller::Topic;
use crate::error::BrokerError;

/// How long the broker asked first waits for another broker's answer: a pass over a large
/// log takes minutes with `wait`; without it, only the start is awaited.
const WAIT_FOR_PASSES: Duration = Duration::from_secs(3600);
const WAIT_FOR_START: Duration = Duration::from_secs(10);

impl AdminService {
    pub(super) async fn compact(
        &self,
        request: Request<CompactTopicRequest>,
    ) -> Result<Response<CompactTopicResponse>, Status> {
        self.count();
        let local_only = forwarded(&request);
        let req = request.into_inner();
        crate::error::check_topic_name_length(&req.topic).map_err(|e| self.fail(e))?;
        let topic = self.ctx.registry.get(&req.topic).map_err(|e| self.fail(e))?;
        let policy = topic
            .effective
            .compaction_policy()
            .ok_or_else(|| self.fail(BrokerError::NotCompacted(topic.name.clone())))?;
        let partitions: Vec<i32> = match req.partition {
            Some(p) => {
                topic.check_index(p).map_err(|e| self.fail(e))?;
                vec![p]
            }
            None => (0..topic.partition_count() as i32).collect(),
        };
        // This broker's passes and the other brokers' run at the same time.
        let here = self.compact_here(&topic, &partitions, policy, req.wait);
        let there = async {
            if local_only {
                return Vec::new();
            }
            self.compact_elsewhere(&topic, &partitions, &req).await
        };
        let (mut replicas, theirs) = tokio::join!(here, there);
        replicas.extend(theirs);
        replicas.sort_by_key(|r| (r.partition, r.broker));
        Ok(Response::new(CompactTopicResponse { replicas }))
    }

    /// The same request, forwarded once, to every other broker holding a replica of
    /// `partitions`; a broker that does not answer gets a row per replica saying so.
    async fn compact_elsewhere(
        &self,
        topic: &Topic,
        partitions: &[i32],
        req: &CompactTopicRequest,
    ) -> Vec<ReplicaCompaction> {
        let me = self.ctx.node_id;
        let others: BTreeSet<u32> = partitions
            .iter()
            .flat_map(|&i| topic.assignments[i as usize].iter().copied())
            .filter(|&b| b != me)
            .collect();
        let wait = if req.wait { WAIT_FOR_PASSES } else { WAIT_FOR_START };
        let asked = others.into_iter().map(|broker| {
            let req = req.clone();
            async move {
                let answer = match self.kept_client_for(broker) {
                    Some(mut client) => match tokio::time::timeout(wait, client.compact_topic(forward(req))).await {
                        Ok(Ok(r)) => Ok(r.into_inner().replicas),
                        Ok(Err(status)) => Err(status.message().to_string()),
                        Err(_) => Err(format!("no answer within {} s", wait.as_secs())),
                    },
                    None => Err("address unknown".to_string()),
                };
                (broker, answer)
            }
        });
        let mut out = Vec::new();
        for (broker, answer) in futures::future::join_all(asked).await {
            match answer {
                Ok(theirs) => out.extend(theirs),
                Err(reason) => out.extend(
                    partitions
                        .iter()
                        .filter(|&&i| topic.assignments[i as usize].contains(&broker))
                        .map(|&i| failed(i, broker, format!("broker {broker} not reached: {reason}"))),
                ),
            }
        }
        out
    }

    /// Passes on this broker's replicas of `partitions`, run by the cleaner threads (at most
    /// `[cleaner] threads` at once, from a bounded queue); with `wait`, their outcomes.
    async fn compact_here(
        &self,
        topic: &Topic,
        partitions: &[i32],
        policy: CompactionPolicy,
        wait: bool,
    ) -> Vec<ReplicaCompaction> {
        let me = self.ctx.node_id;
        let mut waiting = Vec::new();
        let mut out = Vec::new();
        for &index in partitions {
            let Some(p) = topic.local.get(&index) else { continue };
            let (tx, rx) = oneshot::channel();
            let queued = self.ctx.cleaner.request(p, policy, wait.then_some(tx));
            match queued {
                Queued::Full => out.push(failed(
                    index,
                    me,
                    format!("refused: {MAX_QUEUED_REQUESTS} compactions are waiting already; retry later"),
                )),
                Queued::Stopping => out.push(failed(index, me, "refused: the broker is shutting down".into())),
                Queued::Queued | Queued::Joined if !wait => out.push(ReplicaCompaction {
                    partition: index,
                    broker: me as i32,
                    outcome: if queued == Queued::Queued {
                        "started"
                    } else {
                        "already requested"
                    }
                    .into(),
                    ..ReplicaCompaction::default()
                }),
                Queued::Queued | Queued::Joined => waiting.push((index, Arc::clone(p), Instant::now(), rx)),
            }
        }
        for (index, p, asked, rx) in waiting {
            let row = |outcome: &str| ReplicaCompaction {
                partition: index,
                broker: me as i32,
                outcome: outcome.to_string(),
                log_size_bytes: p.log().size_bytes(),
                ..ReplicaCompaction::default()
            };
            out.push(match rx.await {
                Ok(Ok(Some(report))) => ReplicaCompaction {
                    bytes_before: report.bytes_before,
                    bytes_after: report.bytes_after,
                    records_before: report.records_before,
                    records_after: report.records_after,
                    segments_before: report.segments_before as u32,
                    segments_after: report.segments_after as u32,
                    tombstones_dropped: report.tombstones_dropped,
                    millis: asked.elapsed().as_millis() as u64,
                    ..row("compacted")
                },
                Ok(Ok(None)) => row("nothing to compact: no sealed, committed segment yet"),
                Ok(Err(e)) => ReplicaCompaction {
                    failed: true,
                    ..row(&e)
                },
                Err(_) => ReplicaCompaction {
                    failed: true,
                    ..row("refused: the broker is shutting down")
                },
            });
        }
        out
    }
}

/// A replica that did not compact, and why.
fn failed(partition: i32, broker: u32, outcome: String) -> ReplicaCompaction {
    ReplicaCompaction {
        partition,
        broker: broker as i32,
        outcome,
        failed: true,
        ..ReplicaCompaction::default()
    }
}
