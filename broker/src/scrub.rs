//! The background scrub: verifies every batch in the sealed segments of every local partition
//! (frame and CRC), so that damage at rest is found before it is served.
//!
//! One task walks the partitions one after another, each from its first sealed segment to its
//! active one, in chunks of at most [`SCRUB_CHUNK`] bytes read off the reactor, sleeping
//! between chunks so that it reads no more than `[log] scrub_bytes_per_second` on average.
//! After a pass over every partition it rests for `[log] scrub_interval` and starts again, picking
//! up partitions created or moved here in the meantime. `0` disables it.
//!
//! When a corrupt batch is found this task counts it (`conveyor_corrupt_batches_total`) and
//! logs its topic, partition and offset. If the partition's group has another voter (looked up
//! at each step, under the partition's generation lock: membership may change during a pass), the
//! storage layer records the damage durably in the partition directory and quarantines the
//! log (reads and appends refused; see `conveyor_storage::scrub`); the partition owner then
//! reopens the log, which cuts it at the corrupt batch, and the replica catches up from its
//! leader. A replica with no other voter (a single node, replication factor 1) has no one to
//! repair from, and cutting would destroy the intact, acknowledged data after the damage: its
//! log is left as it is, the damage is reported on every pass until an operator acts, and
//! the pass goes on at the next sealed segment (a damaged frame's length cannot be trusted)
//! so that later damage is found too. Decoding reads and clients that check CRCs refuse the
//! bad batch; a raw fetch still returns its bytes.
//!
//! # Crash behaviour
//! Nothing is kept: after a restart the scrub starts a new pass. The corruption marker, not
//! this task, carries a finding across a crash.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use conveyor_storage::{LogError, OnDamage, ScrubCursor, ScrubStep};

use crate::blocking::blocking;
use crate::controller::Registry;
use crate::metrics::Metrics;

/// Most bytes verified per blocking step.
pub const SCRUB_CHUNK: u64 = 1 << 20;

/// How one partition's scrub ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every sealed segment verified.
    Clean,
    /// A corrupt batch at this offset; the log is quarantined if a peer can repair it.
    Corrupt(u64),
    /// The log could not be scrubbed (poisoned, closed, an I/O error); skipped this pass.
    Skipped,
    /// The broker is stopping.
    Stopped,
}

/// Scrubs every local partition at `bytes_per_second`, resting `pass_interval` between
/// passes, until `stop` resolves. Returns at once when the rate is 0.
pub async fn run(
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    bytes_per_second: u64,
    pass_interval: Duration,
    stop: impl Future<Output = ()>,
) {
    if bytes_per_second == 0 {
        tracing::info!("background scrub disabled ([log] scrub_bytes_per_second = 0)");
        return;
    }
    tokio::pin!(stop);
    loop {
        for p in registry.all_partitions() {
            let (topic, index) = (p.topic.clone(), p.index);
            // Each step re-checks that the partition still serves from the log this pass
            // started on, and no reopening runs during a step: a pass never reads, or
            // quarantines, a log the partition retired. Each also decides from the group's
            // voters then whether damage may be cut.
            let log = p.log();
            let step = move |cursor, max_bytes| p.scrub_step(&log, cursor, max_bytes);
            let outcome = scrub_steps(step, &topic, index, &metrics, bytes_per_second, stop.as_mut()).await;
            if outcome == Outcome::Stopped {
                return;
            }
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(pass_interval) => {}
        }
    }
}

/// One pass made of `step`s (blocking; each returns what it did and what it did with damage,
/// or `None` when the log was replaced, which ends the pass as skipped).
async fn scrub_steps(
    step: impl Fn(ScrubCursor, u64) -> Option<Result<(ScrubStep, OnDamage), LogError>> + Send + Sync + 'static,
    topic: &str,
    partition: i32,
    metrics: &Metrics,
    bytes_per_second: u64,
    mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Outcome {
    let chunk = SCRUB_CHUNK.min(bytes_per_second.max(1));
    let mut cursor = ScrubCursor::start();
    // The first damage this pass only reported (no peer to repair from).
    let mut reported: Option<u64> = None;
    let step = Arc::new(step);
    loop {
        let step = {
            let step = Arc::clone(&step);
            blocking(move || Ok(step(cursor, chunk)))
        };
        let step = tokio::select! {
            _ = stop.as_mut() => return Outcome::Stopped,
            step = step => step,
        };
        let (step, on_damage) = match step {
            Ok(Some(Ok(done))) => done,
            // Reopened or retired during the pass, or stopped: its next pass starts afresh.
            Ok(None) | Ok(Some(Err(LogError::Closed | LogError::Poisoned { .. }))) => return Outcome::Skipped,
            // Anything else (an I/O error, damage that could not be quarantined) is worth
            // an operator's attention: the next pass tries again.
            Ok(Some(Err(e))) => return skipped(topic, partition, &e),
            Err(e) => return skipped(topic, partition, &e),
        };
        match step {
            ScrubStep::Verified { bytes, next } => {
                metrics.scrub_bytes.add(bytes);
                cursor = next;
                if bytes > 0 {
                    let pause = Duration::from_secs_f64(bytes as f64 / bytes_per_second as f64);
                    tokio::select! {
                        _ = stop.as_mut() => return Outcome::Stopped,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
            ScrubStep::PassComplete => return reported.map_or(Outcome::Clean, Outcome::Corrupt),
            ScrubStep::Corrupt(c) => {
                metrics.corrupt_batches.add(1);
                let action = match on_damage {
                    OnDamage::Quarantine => {
                        "scrub found a corrupt batch: this replica stops serving the partition and repairs it from the leader"
                    }
                    OnDamage::Report => {
                        "scrub found a corrupt batch in a replica that has no peer to repair it from: decoding reads and \
                         clients that check CRCs refuse it; restore the partition from a backup or re-produce its data"
                    }
                };
                tracing::error!(
                    topic, partition, offset = c.offset, segment = c.segment_base_offset, position = c.position,
                    detail = %c.detail,
                    "{action}"
                );
                if on_damage == OnDamage::Quarantine {
                    return Outcome::Corrupt(c.offset);
                }
                // The log stays whole and is still served: the rest of it is verified too,
                // so a second damaged batch is found as well.
                reported.get_or_insert(c.offset);
                cursor = ScrubCursor::past_segment_of(&c);
            }
        }
    }
}

fn skipped(topic: &str, partition: i32, error: &dyn std::fmt::Display) -> Outcome {
    tracing::warn!(topic, partition, error = %error, "scrub could not verify this partition; it tries again next pass");
    Outcome::Skipped
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_storage::batch::{BatchBuilder, Compression, Record};
    use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
    use std::os::unix::fs::FileExt;

    const RATE: u64 = 64 << 20;

    fn filled_log(dir: &std::path::Path) -> Arc<PartitionLog> {
        let config = LogConfig {
            segment_bytes: 8 * 1024,
            max_batch_bytes: 4 * 1024,
            flush: FlushPolicy::Os,
            ..LogConfig::default()
        };
        let log = Arc::new(PartitionLog::open(dir, config).expect("open"));
        let mut i = 0;
        while log.segment_count() < 3 {
            let mut b = BatchBuilder::new(Compression::None);
            b.push(&Record {
                timestamp: 1,
                key: None,
                value: Some(bytes::Bytes::from(format!("value-{i}-{}", "x".repeat(100)))),
                headers: vec![],
            });
            log.append(&b.build().expect("batch")).expect("append");
            i += 1;
        }
        log
    }

    /// One pass over `log`'s sealed segments, doing `on_damage` with damage.
    async fn pass(log: &Arc<PartitionLog>, metrics: &Metrics, on_damage: OnDamage) -> Outcome {
        let log = Arc::clone(log);
        let step = move |cursor, max_bytes| {
            Some(
                log.scrub_step_with(cursor, max_bytes, on_damage)
                    .map(|s| (s, on_damage)),
            )
        };
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        scrub_steps(step, "t", 0, metrics, RATE, never.as_mut()).await
    }

    #[tokio::test]
    async fn a_scrub_counts_verified_bytes_and_reports_a_flipped_byte_in_a_sealed_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled_log(dir.path());
        let metrics = Metrics::default();
        let outcome = pass(&log, &metrics, OnDamage::Quarantine).await;
        assert_eq!(outcome, Outcome::Clean);
        let first = conveyor_storage::file_names::segment_file(dir.path(), 0, "log");
        let first_len = std::fs::metadata(&first).expect("stat").len();
        assert!(metrics.scrub_bytes.get() >= first_len, "the sealed segments were read");
        assert_eq!(metrics.corrupt_batches.get(), 0);

        // A record byte of the third batch, inside what its CRC covers.
        let at = log.locate(2).expect("locate").expect("in the first segment");
        assert_eq!(at.segment_base_offset, 0);
        let file = std::fs::OpenOptions::new().write(true).open(&first).expect("open");
        file.write_all_at(
            b"\xff\xff",
            at.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
        )
        .expect("flip");
        let outcome = pass(&log, &metrics, OnDamage::Quarantine).await;
        assert_eq!(outcome, Outcome::Corrupt(2));
        assert_eq!(metrics.corrupt_batches.get(), 1);
        assert!(log.is_poisoned());
        assert!(log.read(0, 1 << 20).is_err(), "a quarantined log serves nothing");
        let again = pass(&log, &metrics, OnDamage::Quarantine).await;
        assert_eq!(again, Outcome::Skipped, "a quarantined log is not scrubbed again");
        assert_eq!(metrics.corrupt_batches.get(), 1);
    }

    #[tokio::test]
    async fn a_scrub_with_no_peer_to_repair_from_reports_damage_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = filled_log(dir.path());
        let end = log.log_end_offset();
        let metrics = Metrics::default();
        let first = conveyor_storage::file_names::segment_file(dir.path(), 0, "log");
        let at = log.locate(2).expect("locate").expect("in the first segment");
        let file = std::fs::OpenOptions::new().write(true).open(&first).expect("open");
        file.write_all_at(
            b"\xff\xff",
            at.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
        )
        .expect("flip");
        // And a batch in the second sealed segment: found too, though the pass cannot walk
        // past the first damaged frame within its segment.
        let second = (0..end)
            .map(|o| log.locate(o).expect("locate").expect("in the log"))
            .find(|at| at.segment_base_offset > 0)
            .expect("a second segment");
        let second_file = conveyor_storage::file_names::segment_file(dir.path(), second.segment_base_offset, "log");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&second_file)
            .expect("open")
            .write_all_at(
                b"\xff\xff",
                second.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
            )
            .expect("flip");
        for round in 1..=2 {
            let outcome = pass(&log, &metrics, OnDamage::Report).await;
            assert_eq!(outcome, Outcome::Corrupt(2), "reported on every pass");
            assert_eq!(
                metrics.corrupt_batches.get(),
                2 * round,
                "both damaged batches found, each once per pass"
            );
        }
        assert!(
            !log.is_poisoned(),
            "the log stays open: the data after the damage is intact"
        );
        assert!(log.read(0, 1 << 20).is_ok());
        assert!(
            !dir.path().join(conveyor_storage::scrub::CORRUPTION_MARKER).exists(),
            "no marker: a reopen must not cut the log"
        );
        // Closed cleanly: recovery does not rescan what was flushed, so only a marker could cut.
        log.close().expect("close");
        drop(log);
        let reopened = PartitionLog::open(
            dir.path(),
            LogConfig {
                segment_bytes: 8 * 1024,
                max_batch_bytes: 4 * 1024,
                flush: FlushPolicy::Os,
                ..LogConfig::default()
            },
        )
        .expect("reopen");
        assert_eq!(reopened.log_end_offset(), end, "nothing was cut");
    }
}
