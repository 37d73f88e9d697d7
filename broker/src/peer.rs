//! Connections to other brokers. Every connection one broker opens to another (Raft
//! messages, forwarded admin calls, membership steps, questions to a leader) starts from
//! [`endpoint`], so they all dial the same way; each caller keeps its own timeouts and channel
//! settings. [`connect`] dials a broker once, with the error a caller reports.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::BrokerError;

/// A new connection to broker `broker` at `address` (`None`: this broker does not know it).
pub async fn connect(broker: u32, address: Option<String>, timeout: Duration) -> Result<Channel, BrokerError> {
    let address = address.ok_or(BrokerError::UnknownBroker(broker))?;
    let unreachable = |reason: String| BrokerError::BrokerUnreachable {
        id: broker,
        address: address.clone(),
        reason,
    };
    endpoint(&address, timeout)
        .map_err(|e| unreachable(e.to_string()))?
        .connect()
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// An endpoint for the broker at `address` (`host:port`, plain HTTP/2), giving up a
/// connection attempt after `connect_timeout`, with Nagle's algorithm off (requests are
/// small and latency-bound). Fails on a malformed address.
pub fn endpoint(address: &str, connect_timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}
