//! Asking another broker's `Admin` service: the forwarding mark, connections, and a
//! broker's own view of a topic.
//!
//! A request one broker sends another carries [`FORWARDED`]: the receiver answers from its
//! own view and never forwards it again, so a stale view cannot make a loop.

use std::time::Duration;

use conveyor_proto::v1::admin_client::AdminClient;
use conveyor_proto::v1::{DescribeTopicRequest, TopicDescription};
use tonic::Request;
use tonic::transport::Channel;

use crate::error::BrokerError;
use crate::replica::transport::Transport;

/// Marks a request one broker forwarded to another.
pub const FORWARDED: &str = "x-conveyor-forwarded";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `request` came from another broker.
pub fn forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}

/// `message` as a request marked forwarded.
pub fn forward<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// A new connection to broker `broker`'s client services.
pub async fn connect(transport: &Transport, broker: u32) -> Result<AdminClient<Channel>, BrokerError> {
    let channel = crate::peer::connect(broker, transport.client_address(broker), CONNECT_TIMEOUT).await?;
    Ok(AdminClient::new(channel))
}

/// Broker `broker`'s own description of `topic` (its replicas' views, nothing asked of
/// others), or `None` if it cannot be reached or does not answer within `timeout` (a broker
/// paused or cut off must not hold the asker up).
pub async fn own_description(
    transport: &Transport,
    broker: u32,
    topic: &str,
    timeout: Duration,
) -> Option<TopicDescription> {
    let asked = async {
        let mut client = connect(transport, broker).await.ok()?;
        client
            .describe_topic(forward(DescribeTopicRequest {
                name: topic.to_string(),
            }))
            .await
            .ok()
    };
    tokio::time::timeout(timeout, asked)
        .await
        .ok()
        .flatten()
        .map(tonic::Response::into_inner)
}
