//! Running blocking work (disk I/O, decompression, CRC over large batches) off the async
//! reactor. One helper for every caller, so a failed blocking task reads the same everywhere.

use crate::error::{BrokerError, Result};

/// Runs `f` on tokio's blocking pool and returns its result. A panic in `f` becomes
/// `BrokerError::Internal` rather than unwinding into the caller's task.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(format!("blocking task failed: {e}")))?
}
