//! Connecting to brokers.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{ClientError, Result};

/// How long connecting to one broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The endpoint settings every connection to a broker uses.
pub(crate) fn endpoint(address: &str) -> Result<Endpoint> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| ClientError::InvalidArgument(format!("bad broker address '{address}': {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // The default 64 KiB HTTP/2 window would cap batch streams far below loopback speed.
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        // A stopped or unreachable broker must surface as an error, not a silent hang.
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}

/// The addresses of a bootstrap list (comma-separated `HOST:PORT`).
pub(crate) fn addresses(bootstrap: &str) -> Vec<String> {
    bootstrap
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(str::to_string)
        .collect()
}

/// Connects to the first address of `bootstrap` (comma-separated `HOST:PORT`) that answers.
pub(crate) async fn connect(bootstrap: &str) -> Result<(Channel, String)> {
    let mut last = None;
    for address in addresses(bootstrap) {
        match endpoint(&address)?.connect().await {
            Ok(channel) => return Ok((channel, address)),
            Err(e) => {
                // The innermost cause says what happened ("Connection refused").
                let mut reason = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    reason = s.to_string();
                    source = s.source();
                }
                last = Some(ClientError::Unreachable { address, reason });
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::InvalidArgument("no broker address given".into())))
}
