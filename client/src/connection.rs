//! Connecting to a broker from a bootstrap list.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// How long connecting to one bootstrap address may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to the first address of `bootstrap` (comma-separated `HOST:PORT`) that answers.
pub(crate) async fn connect(bootstrap: &str) -> Result<(Channel, String)> {
    let mut last = None;
    for address in bootstrap.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| ClientError::InvalidArgument(format!("bad broker address '{address}': {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        match endpoint.connect().await {
            Ok(channel) => return Ok((channel, address.to_string())),
            Err(e) => {
                let reason = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
                last = Some(ClientError::Unreachable {
                    address: address.to_string(),
                    reason,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::InvalidArgument("no broker address given".into())))
}
