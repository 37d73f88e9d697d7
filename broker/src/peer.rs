//! Connections to other brokers. Every connection one broker opens to another (Raft
//! messages, forwarded admin calls, membership steps, questions to a leader) starts from
//! [`endpoint`], so they all dial the same way; each caller keeps its own timeouts, channel
//! settings and error mapping.

use std::time::Duration;

use tonic::transport::Endpoint;

/// An endpoint for the broker at `address` (`host:port`, plain HTTP/2), giving up a
/// connection attempt after `connect_timeout`, with Nagle's algorithm off (requests are
/// small and latency-bound). Fails on a malformed address.
pub fn endpoint(address: &str, connect_timeout: Duration) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}
