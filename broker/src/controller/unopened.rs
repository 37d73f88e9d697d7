//! Replicas placed on this broker that could not be opened (a damaged directory, a
//! `RaftLog` consistency error, a full disk, a permission problem, a topic directory that
//! holds another incarnation of the name: every try checks the incarnation first and never
//! opens a replica in another one's directory).
//!
//! Such a failure is local to one partition, so it does not stop the metadata applier: the
//! record that placed the replica applies (the topic is registered, later records follow),
//! the replica is listed in [`Topic::unopened`] with its reason — `topic describe` shows it
//! as `stopped: REASON` — and the applier tries to open it again after 1 s, doubling to
//! 30 s. Once it opens it becomes an ordinary local partition. Only errors of a record
//! itself, or of preparing the topic directory, stop the applier and retry the record.
//!
//! # Invariants
//! - A partition is never both in `Topic::local` and in `Topic::unopened`.
//! - Only the applier's task changes either (as every change to a registered topic), so a
//!   retry and the application of a record never race.
//!
//! # Crash behaviour
//! Nothing is stored: after a restart the broker tries to open the replica at start again,
//! and lists it here if that fails.

use crate::blocking::blocking;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Registry, Topic, TopicDir, other_incarnation_reason, prepare_topic_dir};
use crate::replica::partition::Partition;

/// Wait before the first retry of a replica that could not be opened.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between retries.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often the applier looks for a replica that is due for a retry.
pub(super) const RETRY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A replica that could not be opened, and when to try again.
#[derive(Debug, Clone)]
pub struct Unopened {
    /// Why the last try failed, for people.
    pub reason: String,
    next_try: Instant,
    delay: Duration,
}

impl Unopened {
    pub fn new(reason: String) -> Unopened {
        Unopened {
            reason,
            next_try: Instant::now() + FIRST_RETRY,
            delay: FIRST_RETRY,
        }
    }

    /// After another failed try.
    fn failed_again(&self, reason: String) -> Unopened {
        let delay = (self.delay * 2).min(MAX_RETRY);
        Unopened {
            reason,
            next_try: Instant::now() + delay,
            delay,
        }
    }
}

impl Registry {
    /// Whether any registered topic has a replica here that could not be opened.
    pub(super) fn has_unopened(&self) -> bool {
        self.list().iter().any(|t| !t.unopened.is_empty())
    }

    /// Tries again to open the replicas whose retry is due. Runs in the applier's task.
    pub(super) async fn retry_unopened(self: &Arc<Self>) {
        let now = Instant::now();
        for topic in self.list() {
            let due: Vec<i32> = topic
                .unopened
                .iter()
                .filter(|(_, u)| u.next_try <= now)
                .map(|(&p, _)| p)
                .collect();
            if due.is_empty() {
                continue;
            }
            let mut updated = Topic::clone(&topic);
            for p in due {
                match self.open_local_replica(&topic, p).await {
                    Ok(partition) => {
                        tracing::info!(topic = %topic.name, partition = p, "replica opened after earlier failures");
                        updated.unopened.remove(&p);
                        updated.local.insert(p, partition);
                    }
                    Err(reason) => {
                        tracing::debug!(topic = %topic.name, partition = p, %reason, "replica still cannot be opened");
                        if let Some(u) = updated.unopened.get_mut(&p) {
                            *u = u.failed_again(reason);
                        }
                    }
                }
            }
            self.insert(updated);
        }
    }

    /// Opens this broker's replica of `topic`'s partition `p` as the topic now places it,
    /// off the reactor. The error is the reason, for [`Unopened`].
    pub(super) async fn open_local_replica(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        p: i32,
    ) -> std::result::Result<Arc<Partition>, String> {
        let index = usize::try_from(p).map_err(|e| e.to_string())?;
        let me = self.options.node_id;
        let preferred = topic
            .assignments
            .get(index)
            .and_then(|r| r.first().copied())
            .unwrap_or(me);
        let initial = topic.initial.get(index).cloned().unwrap_or_default();
        let (registry, topic) = (Arc::clone(self), Arc::clone(topic));
        blocking(move || {
            // The directory may since hold another incarnation of the name, or have gone.
            Ok(open_prepared(&registry, &topic, p, &initial, preferred))
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Opens replica `p` of `topic` here once its directory holds this incarnation (blocking).
fn open_prepared(
    registry: &Registry,
    topic: &Topic,
    p: i32,
    initial: &[u32],
    preferred: u32,
) -> std::result::Result<Arc<Partition>, String> {
    {
        match prepare_topic_dir(&registry.options.data_dir, &topic.name, &topic.id) {
            Ok(TopicDir::Ready) => {}
            Ok(TopicDir::Other(held)) => return Err(other_incarnation_reason(&held)),
            Err(e) => return Err(format!("topic '{}' directory: {e}", topic.name)),
        }
        let dir = registry.topics_dir().join(&topic.name).join(p.to_string());
        Partition::open(
            &registry.open_context(),
            &topic.name,
            p,
            &dir,
            topic.effective.log_config(),
            initial,
            preferred,
        )
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_of_a_replica_that_keeps_failing_back_off_to_a_bound() {
        let mut u = Unopened::new("permission denied".into());
        let mut delays = vec![u.delay];
        for _ in 0..7 {
            u = u.failed_again("permission denied".into());
            delays.push(u.delay);
        }
        assert_eq!(delays.first(), Some(&FIRST_RETRY));
        assert!(delays.windows(2).all(|w| w[1] >= w[0]), "{delays:?}");
        assert_eq!(delays.last(), Some(&MAX_RETRY));
    }
}
