//! Asking a partition's leader about its group, for a replica kept here that the metadata
//! places elsewhere but whose own, possibly stale, configuration still lists this broker
//! (the rule is in [`crate::replica::departure`]).
//!
//! # Design
//! The applier must not wait on other brokers, so an ask runs as its own task and leaves
//! its answer for the applier's next decision pass (at most a second later), which weighs it
//! against the replica's state at that moment. One ask per replica at a time, and asks back
//! off from [`FIRST_WAIT`] to [`MAX_WAIT`] apart: a group that keeps listing this broker, or
//! brokers that do not answer, are not asked every second forever.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::{PartitionDescription, TopicDescription};
use raft::eraftpb::ConfState;
use tokio::time::Instant;

use crate::api::forward;
use crate::replica::departure::GroupReport;
use crate::replica::transport::Transport;

/// The wait before the second ask of a replica; it doubles with each ask after.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long each broker of the placement may take to answer (connecting included).
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Topic name, topic id (the incarnation), partition.
type Key = (String, String, i32);

#[derive(Debug)]
struct Probe {
    /// When the next ask may start.
    next_at: Instant,
    wait: Duration,
    asking: bool,
    /// The answer of the last ask, until a decision pass takes it.
    answer: Option<GroupReport>,
}

/// The asks in progress and their answers, per replica (topic, partition).
#[derive(Debug, Default)]
pub(super) struct LeaderProbes {
    probes: Mutex<HashMap<Key, Probe>>,
}

impl LeaderProbes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Probe>> {
        self.probes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The answer of the last ask about `topic` partition `p`, once; when there is none,
    /// starts an ask of the brokers of `placement` (other than `me`) if one is due.
    pub(super) fn take_answer_or_ask(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        transport: &Arc<Transport>,
        (topic, id, p): (&str, &str, i32),
        placement: &[u32],
        me: u32,
    ) -> Option<GroupReport> {
        let now = Instant::now();
        let key = (topic.to_string(), id.to_string(), p);
        let mut probes = self.lock();
        let probe = probes.entry(key.clone()).or_insert_with(|| Probe {
            next_at: now,
            wait: FIRST_WAIT,
            asking: false,
            answer: None,
        });
        if let Some(answer) = probe.answer.take() {
            return Some(answer);
        }
        if probe.asking || now < probe.next_at {
            return None;
        }
        probe.asking = true;
        let asked: Vec<u32> = placement.iter().copied().filter(|&b| b != me).collect();
        let (probes, transport) = (Arc::clone(self), Arc::clone(transport));
        runtime.spawn(async move {
            let answer = ask_leader(&transport, (&key.0, &key.1, key.2), &asked).await;
            if answer.is_none() {
                tracing::info!(topic = %key.0, partition = key.2, brokers = ?asked, "no broker of the partition's placement answered as its leader; keeping the replica and asking again later");
            }
            let mut all = probes.lock();
            // Forgotten meanwhile (decided, or its topic deleted): nothing to leave.
            if let Some(probe) = all.get_mut(&key) {
                probe.asking = false;
                probe.answer = answer;
                probe.next_at = Instant::now() + probe.wait;
                probe.wait = (probe.wait * 2).min(MAX_WAIT);
            }
        });
        None
    }

    /// Forgets the replicas not in `kept`: decided, or gone with their topic.
    pub(super) fn retain(&self, kept: &BTreeSet<Key>) {
        self.lock().retain(|key, _| kept.contains(key));
    }
}

/// Asks each broker of `asked` at once for its own view of the partition and returns the
/// answer of one that reports itself leader (of the newest term, should two), else any
/// answer (it shows who the answering broker thinks leads), else `None`. Only answers about
/// incarnation `id` count: a broker that lags on metadata may still describe an earlier topic
/// of the same name, whose groups, terms and indexes say nothing about this one's.
async fn ask_leader(transport: &Transport, (topic, id, p): (&str, &str, i32), asked: &[u32]) -> Option<GroupReport> {
    let answers = futures::future::join_all(asked.iter().map(|&broker| async move {
        let theirs = forward::own_description(transport, broker, topic, ASK_TIMEOUT).await?;
        answer_about(broker, theirs, id, p)
    }))
    .await;
    let answers: Vec<GroupReport> = answers.into_iter().flatten().collect();
    let leader = answers
        .iter()
        .filter(|r| r.leader != 0 && r.leader == r.from)
        .max_by_key(|r| r.term)
        .cloned();
    leader.or_else(|| answers.into_iter().next())
}

/// What broker `from`'s description says of partition `p` of incarnation `id`; nothing if
/// it describes another incarnation or lacks the partition.
fn answer_about(from: u32, theirs: TopicDescription, id: &str, p: i32) -> Option<GroupReport> {
    if theirs.topic_id != id {
        tracing::debug!(topic = %theirs.name, id, from, theirs = %theirs.topic_id, "a broker described another incarnation of the topic; its answer does not count");
        return None;
    }
    theirs
        .partitions
        .into_iter()
        .find(|d| d.partition == p)
        .map(|d| report(from, &d))
}

/// The group as broker `from` describes it. An id that is not a broker id reads as listed
/// by nobody: it cannot be this broker's.
fn report(from: u32, d: &PartitionDescription) -> GroupReport {
    let ids = |v: &[i32]| v.iter().filter_map(|&i| u64::try_from(i).ok()).collect();
    GroupReport {
        from,
        leader: u32::try_from(d.leader).unwrap_or(0),
        conf_state: ConfState {
            voters: ids(&d.voters),
            learners: ids(&d.learners),
            voters_outgoing: ids(&d.voters_outgoing),
            learners_next: ids(&d.learners_next),
            ..ConfState::default()
        },
        term: d.term,
        applied: d.applied_index,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(id: &str) -> TopicDescription {
        TopicDescription {
            name: "t".into(),
            topic_id: id.into(),
            partitions: vec![PartitionDescription {
                partition: 0,
                leader: 2,
                voters: vec![2, 3, 4],
                term: 9,
                applied_index: 5_000,
                ..PartitionDescription::default()
            }],
            ..TopicDescription::default()
        }
    }

    #[test]
    fn only_an_answer_about_the_same_incarnation_counts() {
        let same = answer_about(2, described("id2"), "id2", 0).expect("the same incarnation answers");
        assert_eq!((same.leader, same.term, same.applied), (2, 9, 5_000));
        assert!(
            answer_about(2, described("id1"), "id2", 0).is_none(),
            "a broker still on the earlier topic of that name says nothing of this one's group"
        );
        assert!(
            answer_about(2, described(""), "id2", 0).is_none(),
            "an answer naming no incarnation"
        );
        assert!(
            answer_about(2, described("id2"), "id2", 1).is_none(),
            "no such partition"
        );
    }
}
