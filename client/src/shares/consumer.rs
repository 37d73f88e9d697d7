//! [`ShareConsumer`]: a member of a share group, yielding [`Delivery`]s as a stream.
//!
//! Two background tasks serve it: the session (`session.rs`, the `Join` stream) and the
//! driver (`driver.rs`: fetches, acknowledgements, renewals). Both end with the consumer:
//! [`ShareConsumer::close`] flushes acknowledgements first; dropping it aborts them, which
//! ends the session all the same, so the coordinator releases the member's records at once.
//!
//! # Thread-safety
//! The consumer is `Send`; deliveries are `Send` and may be acknowledged from any task.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use conveyor_proto::v1::{ShareGroupSettings, ShareJoinRequest, ShareSessionEvent};
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};

use super::ack_queue::AckQueue;
use super::delivery::Delivery;
use super::driver::{Buffered, Driver, Fetched};
use super::{ShareConfig, session};
use crate::Client;
use crate::consumer::AbortOnDrop;
use crate::error::{ClientError, Result};

/// How long creating a consumer follows a moving or loading coordinator.
const JOIN_DEADLINE: Duration = Duration::from_secs(30);
/// Messages of errors the channel to the consumer holds beyond the prefetch bound.
const ERROR_ROOM: usize = 16;

/// A member of a share group: the group's coordinator hands it records of the group's
/// topic, each locked to it until acknowledged or its lock runs out. Obtain one with
/// [`Client::share_consumer`].
///
/// As a [`Stream`] it yields deliveries in the order fetched (per partition, in offset
/// order; across members no order unless the group orders by key). A retriable error
/// (a damaged batch, whose records were given back) is yielded and the stream goes on; an
/// error a retry cannot change (the group was deleted, say) is yielded and ends it.
/// Failed fetches caused by a moving coordinator or a lost connection are retried
/// silently, and the session rejoins on its own.
///
/// A delivery that waited in the prefetch buffer until its lock ran out is skipped: the
/// record went back to the group and comes again.
#[derive(Debug)]
pub struct ShareConsumer {
    group: String,
    member_id: String,
    rx: mpsc::Receiver<Fetched>,
    /// The deliveries of the last fetch not handed out yet.
    ready: std::vec::IntoIter<Delivery>,
    buffered: Arc<Buffered>,
    session: watch::Receiver<ShareSessionEvent>,
    close_driver: Option<oneshot::Sender<()>>,
    stop_session: Option<oneshot::Sender<()>>,
    driver: Option<AbortOnDrop>,
    session_task: Option<AbortOnDrop>,
}

impl ShareConsumer {
    pub(crate) async fn start(client: &Client, group: &str, topic: &str, config: ShareConfig) -> Result<ShareConsumer> {
        config.validate()?;
        if group.is_empty() {
            return Err(ClientError::InvalidArgument(
                "a share group id must not be empty".into(),
            ));
        }
        if topic.is_empty() {
            return Err(ClientError::InvalidArgument(format!(
                "share group '{group}': the topic to consume must not be empty"
            )));
        }
        let request = ShareJoinRequest {
            group: group.to_string(),
            member_id: new_member_id(),
            topic: topic.to_string(),
            settings: Some(config.settings()),
        };
        let (stream, first) = session::join(client, &request, JOIN_DEADLINE).await?;
        let topic: Arc<str> = Arc::from(if first.topic.is_empty() {
            topic
        } else {
            first.topic.as_str()
        });
        let (events, session) = watch::channel(first);
        let (stop_session, stopped) = oneshot::channel();
        let session_task = tokio::spawn(session::hold(client.clone(), request.clone(), stream, events, stopped));
        let acks = Arc::new(AckQueue::new(config.ack_queue));
        let (out, rx) = mpsc::channel(config.prefetch + ERROR_ROOM);
        let buffered = Arc::new(Buffered::default());
        let (close_driver, close) = oneshot::channel();
        let driver = Driver {
            client: client.clone(),
            group: group.to_string(),
            member_id: request.member_id.clone(),
            topic,
            config,
            acks,
            out,
            buffered: Arc::clone(&buffered),
            session: session.clone(),
        };
        let driver = tokio::spawn(driver.run(close));
        Ok(ShareConsumer {
            group: group.to_string(),
            member_id: request.member_id,
            rx,
            ready: Vec::new().into_iter(),
            buffered,
            session,
            close_driver: Some(close_driver),
            stop_session: Some(stop_session),
            driver: Some(AbortOnDrop(driver)),
            session_task: Some(AbortOnDrop(session_task)),
        })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// This member's id in the group (chosen by the client: `s-` and random hex).
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// The group's settings as its coordinator last said, every field set.
    pub fn settings(&self) -> ShareGroupSettings {
        self.session.borrow().settings.clone().unwrap_or_default()
    }

    /// The partition count of the group's topic, as the coordinator last said.
    pub fn partitions(&self) -> u32 {
        self.session.borrow().partitions
    }

    /// Leaves the group cleanly: stops fetching, sends every acknowledgement queued so far
    /// and waits for the broker's answers, then ends the session, which gives every record
    /// still held (buffered here, or delivered and not acknowledged) back to the group at
    /// once. Acknowledging a delivery after this fails with [`ClientError::Closed`].
    pub async fn close(mut self) -> Result<()> {
        if let Some(close) = self.close_driver.take() {
            let _ = close.send(());
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = (&mut driver.0).await;
        }
        // Buffered deliveries are never handed out now (their acknowledgements would find the
        // queue closed); their records go back with the session.
        self.ready = Vec::new().into_iter();
        self.rx.close();
        if let Some(stop) = self.stop_session.take() {
            let _ = stop.send(());
        }
        if let Some(mut session) = self.session_task.take() {
            let _ = (&mut session.0).await;
        }
        Ok(())
    }
}

/// `s-` and 16 random hex digits: unique in the group, and a new one per consumer, so a
/// restarted process does not take over a session the coordinator still holds.
fn new_member_id() -> String {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    format!("s-{:016x}", hasher.finish())
}

impl Stream for ShareConsumer {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(delivery) = self.ready.next() {
                self.buffered.taken();
                // The coarse clock may be a tick behind: a delivery whose lock just ran out
                // can still go out, and its acknowledgement is then refused, as one made
                // a moment later would be.
                if delivery.locked_until() <= conveyor_storage::unix_millis_coarse() {
                    // Its lock ran out while it waited here: the record is the group's again.
                    continue;
                }
                return Poll::Ready(Some(Ok(delivery)));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Ok(deliveries))) => self.ready = deliveries.into_iter(),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
