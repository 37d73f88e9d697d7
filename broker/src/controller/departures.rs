//! Deciding what becomes of replicas the metadata places elsewhere (the rule is in
//! [`crate::replica::departure`]): which to keep and open at start, and when to delete one.
//! A replica whose own configuration still lists this broker is decided by asking its
//! group's leader ([`super::leader_probe`]).
//!
//! # Crash behaviour
//! A replica's directory is removed only after its owner stopped and its files were retired
//! (so no task still holding them writes there again); a crash part-way leaves a directory
//! that the next start recovers, keeps and decides again.

use std::path::Path;
use std::sync::Arc;

use super::{Registry, Topic};
use crate::blocking::blocking;
use crate::error::BrokerError;
use crate::replica::departure;
use crate::replica::partition::Partition;

impl Registry {
    /// The replica directories of a topic that the metadata known here places elsewhere.
    /// Their data is kept, never deleted from this view: it may be stale (replayed only up
    /// to a stored commit index, or a creation applied before the reassignments that
    /// followed it). Returns those whose own Raft configuration lists this broker, to be
    /// opened (the group counts on them); the others wait for a decision. Blocking.
    pub(super) fn kept_replicas(
        &self,
        topic: &str,
        topic_dir: &Path,
        assignments: &[Vec<u32>],
    ) -> std::io::Result<Vec<i32>> {
        let me = self.options.node_id;
        let mut open = Vec::new();
        for p in departure::partition_dirs(topic_dir)? {
            let placed = usize::try_from(p).ok().and_then(|i| assignments.get(i));
            if placed.is_some_and(|r| r.contains(&me)) {
                continue;
            }
            let dir = topic_dir.join(p.to_string());
            let member = departure::stored_config_lists(&dir, u64::from(me));
            tracing::info!(
                topic,
                partition = p,
                member,
                "keeping a replica the metadata known so far places elsewhere; deciding once the metadata is current"
            );
            if member && placed.is_some() {
                open.push(p);
            }
            self.undecided.insert(topic, p);
        }
        Ok(open)
    }

    /// Whether this broker's view of the metadata is current: its whole local metadata log
    /// is applied and a controller is known, so no record it holds is still to come.
    fn view_is_current(&self) -> bool {
        self.metadata.leader() != 0 && *self.applied.borrow() >= self.metadata.log().log_end_offset()
    }

    /// Decides the replicas kept for later (see [`Self::kept_replicas`]), once the view is
    /// current: a replica placed here is kept; one placed elsewhere is deleted once its own
    /// Raft configuration no longer lists this broker, and kept (retried) until then.
    pub(super) async fn decide_kept_replicas(self: &Arc<Self>) {
        if self.undecided.is_empty() || !self.view_is_current() {
            return;
        }
        let me = self.options.node_id;
        let undecided = self.undecided.snapshot();
        for (name, p) in undecided.iter().cloned() {
            let Ok(topic) = self.get(&name) else {
                // Deleted: its whole directory went with it.
                self.undecided.remove(&name, p);
                continue;
            };
            let placed = usize::try_from(p).ok().and_then(|i| topic.assignments.get(i));
            if placed.is_some_and(|r| r.contains(&me)) {
                self.undecided.remove(&name, p);
                continue;
            }
            self.remove_departed_replica(&topic, p).await;
        }
        // Keyed by incarnation too: an answer about a topic since deleted and created again
        // is never taken for the new one's replica.
        let asked = undecided
            .into_iter()
            .filter_map(|(name, p)| self.get(&name).ok().map(|t| (name, t.id.clone(), p)))
            .collect();
        self.leader_probes.retain(&asked);
    }

    /// Removes this broker's replica of a partition that a committed, applied record placed
    /// elsewhere, if the partition's own Raft configuration no longer lists this broker, or
    /// its group's leader confirms that the group no longer does (see
    /// [`departure::leader_confirms_departure`]); otherwise keeps it (running, if it is
    /// open) and decides again later.
    pub(super) async fn remove_departed_replica(self: &Arc<Self>, topic: &Arc<Topic>, p: i32) {
        let me = u64::from(self.options.node_id);
        let dir = self.topics_dir().join(&topic.name).join(p.to_string());
        let open = topic.local.get(&p).cloned();
        let listed = match &open {
            Some(partition) => departure::config_lists(&partition.raft_view().conf_state, me),
            None => {
                let dir = dir.clone();
                let found = blocking(move || Ok(dir.exists().then(|| departure::stored_config_lists(&dir, me)))).await;
                match found {
                    Ok(Some(listed)) => listed,
                    Ok(None) => {
                        // No replica here: nothing to decide.
                        self.undecided.remove(&topic.name, p);
                        return;
                    }
                    Err(_) => true,
                }
            }
        };
        if listed {
            if self.undecided.insert_new(&topic.name, p) {
                tracing::warn!(topic = %topic.name, partition = p, "replica placed elsewhere but its group still lists this broker; keeping it until the group applies its removal");
            }
            let confirmed = match &open {
                Some(partition) => self.leader_confirms_departure(topic, p, partition),
                // Not open: nothing here to weigh an answer against (its last entry is in a
                // log not read); kept.
                None => false,
            };
            if !confirmed {
                return;
            }
        }
        if let Some(partition) = &open {
            partition.stop().await;
            let mut local = topic.local.clone();
            local.remove(&p);
            self.insert(Topic {
                local,
                ..Topic::clone(topic)
            });
        }
        self.remove_replica_data(topic, p, dir, open).await;
    }

    /// Whether the leader of the partition, asked about its group, confirms that the group
    /// no longer counts on this broker's open replica `partition`. Never waits: it takes the
    /// answer of an earlier ask, or starts one when due and answers no. Asked only with the
    /// metadata view current, so that the placement asked is the one the cluster has.
    fn leader_confirms_departure(self: &Arc<Self>, topic: &Topic, p: i32, partition: &Partition) -> bool {
        let placed = usize::try_from(p).ok().and_then(|i| topic.assignments.get(i));
        let Some(placement) = placed.filter(|_| self.view_is_current()) else {
            return false;
        };
        let me = self.options.node_id;
        let Some(report) = self.leader_probes.take_answer_or_ask(
            &self.runtime,
            &self.transport,
            (&topic.name, &topic.id, p),
            placement,
            me,
        ) else {
            return false;
        };
        let own = partition.raft_view();
        match departure::leader_confirms_departure(u64::from(me), &own, &report) {
            Ok(()) => {
                tracing::info!(topic = %topic.name, partition = p, leader = report.from, term = report.term, applied = report.applied, "the group's leader no longer lists this broker; its own configuration was stale");
                true
            }
            Err(keep) => {
                tracing::info!(topic = %topic.name, partition = p, reason = %keep, "replica placed elsewhere kept: its group's leader does not confirm the departure yet; asking again later");
                false
            }
        }
    }

    /// Stops and retires the replica (if open) and removes its directory.
    async fn remove_replica_data(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        p: i32,
        dir: std::path::PathBuf,
        open: Option<Arc<Partition>>,
    ) {
        let removed = blocking(move || {
            if let Some(partition) = open {
                // Retired, as a deleted topic's replicas are, not closed: a retention pass or
                // scrub step still holding the partition finishes first (`retire` waits for
                // it), and none can store `raft-state` or delete segments in the directory
                // once it is removed, or in a replica placed at the same path later. Nothing
                // needs flushing: the data goes.
                partition.retire();
            }
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(BrokerError::Internal(format!("{}: {e}", dir.display())))
                }
                _ => Ok(()),
            }
        })
        .await;
        match removed {
            Ok(()) => {
                self.undecided.remove(&topic.name, p);
                tracing::info!(topic = %topic.name, partition = p, "replica moved off this broker; data removed");
            }
            Err(e) => {
                tracing::error!(topic = %topic.name, partition = p, error = %e, "removing a moved replica failed")
            }
        }
    }
}
