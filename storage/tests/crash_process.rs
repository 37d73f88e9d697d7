//! Crash consistency with a real process: a child appends with `FlushPolicy::Always` from
//! several threads and prints each acknowledged batch; the parent SIGKILLs it mid-stream,
//! reopens the log and checks that every acknowledged batch is there, in order, once.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{batch, batches, small_config};
use conveyor_storage::{FlushPolicy, PartitionLog};

const CHILD_DIR_ENV: &str = "CONVEYOR_CRASH_CHILD_DIR";
const CHILD_ROUND_ENV: &str = "CONVEYOR_CRASH_CHILD_ROUND";
/// How long the parent waits for the child's acknowledgements before failing.
const ACK_DEADLINE: Duration = Duration::from_secs(60);
/// A child never runs longer than this, even if nobody kills it.
const CHILD_LIFETIME: Duration = Duration::from_secs(60);
const APPENDERS: u64 = 4;
const ACKS_BEFORE_KILL: usize = 400;
const ROUNDS: u64 = 3;

/// Entry point of the child process; does nothing in a normal test run.
#[test]
fn child_appender() {
    let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_ROUND_ENV)) else {
        return;
    };
    let round: u64 = round.parse().expect("round");
    let log = Arc::new(PartitionLog::open(&dir, small_config(FlushPolicy::Always)).expect("child open"));
    let started = Instant::now();
    let threads: Vec<_> = (0..APPENDERS)
        .map(|t| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut i = 0u64;
                while started.elapsed() < CHILD_LIFETIME {
                    let tag = round * 1_000_000_000 + t * 10_000_000 + i;
                    let info = log.append(&batch(tag, 3, 1)).expect("child append");
                    println!("ack {} {tag}", info.base_offset);
                    i += 1;
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("appender");
    }
}

#[test]
fn sigkill_during_appends_loses_no_acknowledged_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["child_appender", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::sync_channel::<(u64, u64)>(1024);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.strip_prefix("ack ").map(|l| l.split(' ')).into_iter().flatten();
                if let (Some(o), Some(t)) = (parts.next(), parts.next())
                    && tx.send((o.parse().expect("offset"), t.parse().expect("tag"))).is_err()
                {
                    break;
                }
            }
        });
        let deadline = Instant::now() + ACK_DEADLINE;
        let mut this_round = 0;
        while this_round < ACKS_BEFORE_KILL {
            let left = deadline.saturating_duration_since(Instant::now());
            let (offset, tag) = rx
                .recv_timeout(left)
                .expect("child acknowledges appends before the deadline");
            assert!(
                acked.insert(offset, tag).is_none(),
                "offset {offset} acknowledged twice"
            );
            this_round += 1;
        }
        child.kill().expect("SIGKILL child");
        child.wait().expect("reap child");
        // Acks already in the pipe when the child died are acknowledged too.
        // The reader ends at EOF and drops its sender, which ends this loop.
        for (offset, tag) in rx.iter() {
            assert!(
                acked.insert(offset, tag).is_none(),
                "offset {offset} acknowledged twice"
            );
        }
        reader.join().expect("reader");

        let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("reopen after SIGKILL");
        let mut next = 0;
        let mut found: BTreeMap<u64, u64> = BTreeMap::new();
        for b in batches(&log) {
            assert_eq!(b.header().base_offset, next, "no gap, no overlap");
            let first = b.records().expect("records").next().expect("a record").expect("decode");
            let value = String::from_utf8(first.value.expect("value").to_vec()).expect("utf8");
            let tag: u64 = value.split('-').nth(1).expect("tag").parse().expect("tag number");
            found.insert(next, tag);
            next = b.header().next_offset();
        }
        for (offset, tag) in &acked {
            assert_eq!(
                found.get(offset),
                Some(tag),
                "acknowledged batch at offset {offset} lost in round {round}"
            );
        }
        let mut tags: Vec<u64> = found.values().copied().collect();
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), found.len(), "no batch stored twice");
        drop(log);
    }
}

const POISON_CHILD_ENV: &str = "CONVEYOR_POISON_CHILD_DIR";
/// Marker the poison child prints when every assertion in it held.
const POISON_CHILD_OK: &str = "poison-child-ok";

/// Child entry point: appends under a file-size limit until a write fails, then checks that
/// the log stays poisoned.
#[test]
fn child_write_failure() {
    let Ok(dir) = std::env::var(POISON_CHILD_ENV) else {
        return;
    };
    let config = conveyor_storage::LogConfig {
        segment_bytes: 64 << 20,
        max_index_bytes: 64 << 10,
        index_interval_bytes: 4096,
        ..small_config(FlushPolicy::Always)
    };
    let log = PartitionLog::open(&dir, config).expect("open");
    let mut acked = 0u64;
    let failure = loop {
        match log.append(&batch(acked, 10, 1)) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the file size limit never hit");
    };
    assert!(
        matches!(failure, conveyor_storage::LogError::Io { .. }),
        "first failure is the I/O error: {failure}"
    );
    let again = log.append(&batch(0, 1, 1)).expect_err("a poisoned log refuses appends");
    assert!(matches!(again, conveyor_storage::LogError::Poisoned { .. }), "{again}");
    assert!(
        again.to_string().contains("reopen"),
        "the error says how to recover: {again}"
    );
    assert!(log.is_poisoned());
    println!("acked {acked}");
    println!("{POISON_CHILD_OK}");
}

#[test]
fn a_failed_write_poisons_the_log_until_it_is_reopened() {
    let dir = tempfile::tempdir().expect("tempdir");
    // RLIMIT_FSIZE makes a write fail part-way with EFBIG (SIGXFSZ ignored so the write
    // returns the error instead of killing the process).
    let script = "trap '' XFSZ; ulimit -f 1024; exec \"$0\" child_write_failure --exact --nocapture --test-threads=1";
    let output = Command::new("sh")
        .args(["-c", script])
        .arg(std::env::current_exe().expect("test binary"))
        .env(POISON_CHILD_ENV, dir.path())
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains(POISON_CHILD_OK),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let acked: u64 = stdout
        .lines()
        .find_map(|l| l.split_once("acked ").map(|(_, n)| n.trim()))
        .and_then(|n| n.parse().ok())
        .expect("acked count");
    assert!(acked > 0);
    let log = PartitionLog::open(dir.path(), small_config(FlushPolicy::Always)).expect("reopen heals the log");
    assert_eq!(
        log.log_end_offset(),
        acked * 10,
        "exactly the acknowledged batches, the torn one cut"
    );
    log.append(&batch(0, 1, 1)).expect("appends work again after reopening");
}
