//! A share consumer's session: the `Join` stream, held open for the consumer's whole life.
//!
//! The coordinator sends an event at once (the group's settings, the partition count) and
//! then every few seconds. While the stream is open the member's locks hold; when it ends
//! the coordinator makes every record the member holds available again at once. So the
//! session task rejoins (finding the coordinator again, with backoff) whenever the stream
//! ends or fails, and ending the task (dropping the stream) is how the consumer leaves.
//!
//! # Crash behaviour
//! A process that dies drops its connection, which ends the stream: its records go back
//! to the group without waiting for their locks.

use std::time::Duration;

use conveyor_proto::v1::{ShareJoinRequest, ShareSessionEvent};
use tokio::sync::{oneshot, watch};
use tonic::Streaming;

use crate::Client;
use crate::error::Result;
use crate::groups::coordinator::{self, GroupKind};

/// First pause before a rejoin, doubled up to the maximum while rejoins fail.
const REJOIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_REJOIN_BACKOFF: Duration = Duration::from_secs(5);
/// How long one rejoin follows a moving or loading coordinator before pausing.
const REJOIN_DEADLINE: Duration = Duration::from_secs(30);

/// Joins the group: the open stream and its first event, following the coordinator for up
/// to `deadline`.
pub(crate) async fn join(
    client: &Client,
    request: &ShareJoinRequest,
    deadline: Duration,
) -> Result<(Streaming<ShareSessionEvent>, ShareSessionEvent)> {
    coordinator::route(
        client,
        GroupKind::Share,
        &request.group,
        "Join",
        deadline,
        crate::shares::grpc,
        |mut grpc| {
            let request = request.clone();
            async move {
                let mut stream = grpc.join(request).await?.into_inner();
                match stream.message().await? {
                    Some(first) => Ok(tonic::Response::new((stream, first))),
                    // No detail: counts as a broken connection, so the coordinator is found
                    // again.
                    None => Err(tonic::Status::unavailable(
                        "the Join stream ended before its first event",
                    )),
                }
            }
        },
    )
    .await
}

/// Holds the session until `stop` fires (or its sender is dropped): reads events into
/// `events`, and rejoins whenever the stream ends.
pub(crate) async fn hold(
    client: Client,
    request: ShareJoinRequest,
    mut stream: Streaming<ShareSessionEvent>,
    events: watch::Sender<ShareSessionEvent>,
    mut stop: oneshot::Receiver<()>,
) {
    let group = request.group.clone();
    let mut backoff = REJOIN_BACKOFF;
    loop {
        let ended = tokio::select! {
            _ = &mut stop => return,
            ended = read(&mut stream, &events) => ended,
        };
        tracing::debug!(
            group,
            member = request.member_id,
            "share session ended ({ended}); rejoining"
        );
        // The coordinator may have moved: the next join asks where it is.
        client.coordinators().forget(GroupKind::Share, &group);
        loop {
            let rejoined = tokio::select! {
                _ = &mut stop => return,
                rejoined = join(&client, &request, REJOIN_DEADLINE) => rejoined,
            };
            match rejoined {
                Ok((again, first)) => {
                    events.send_replace(first);
                    stream = again;
                    backoff = REJOIN_BACKOFF;
                    break;
                }
                Err(e) => {
                    tracing::warn!(group, member = request.member_id, error = %e, "cannot rejoin share group; retrying in {backoff:?}");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_REJOIN_BACKOFF);
                }
            }
        }
    }
}

/// Reads events until the stream ends; says how it ended.
async fn read(stream: &mut Streaming<ShareSessionEvent>, events: &watch::Sender<ShareSessionEvent>) -> String {
    loop {
        match stream.message().await {
            Ok(Some(event)) => {
                events.send_replace(event);
            }
            Ok(None) => return "closed by the coordinator".into(),
            Err(status) => return format!("{}: {}", status.code(), status.message()),
        }
    }
}
