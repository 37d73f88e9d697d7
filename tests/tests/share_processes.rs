//! Share group members as `conveyor queue consume` processes and as many in-process
//! consumers: workers SIGKILLed mid-stream (what they printed and had not accepted comes
//! back at once, to the survivors), key order held by concurrent workers that accept,
//! release and drop deliveries at random, and delayed records never printed before due.
//!
//! A CLI worker prints a delivery as a JSON line and then accepts it, so a record printed
//! by a worker that dies before its accept is answered is printed again by another: at
//! least once, and more than once only through a worker that died.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use conveyor_client::{Client, ProducerConfig, ProducerRecord, ShareConfig, ShareOffsetReset, ShareOrdering};
use conveyor_storage::unix_millis;
use conveyor_tests::{BrokerProcess, cli, cli_bin, cli_json, keyed, poll_for, runtime};
use futures::StreamExt;

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";
const PARTITIONS: i32 = 3;
/// Producer batches of about this many bytes: share fetches ship whole stored batches, so
/// small ones keep what a worker holds close to what it asked for.
const BATCH_BYTES: usize = 4096;
/// How long a worker process may take to exit once it should (its idle timeout included).
const EXIT_DEADLINE: Duration = Duration::from_secs(40);
/// Header naming when a record may first be delivered (ms since the Unix epoch).
const DELIVER_AT: &str = "conveyor-deliver-at";

/// One line a worker printed, with when it was read.
#[derive(Debug, Clone)]
struct Printed {
    partition: i32,
    offset: u64,
    delivery_count: u64,
    line: serde_json::Value,
    /// Wall clock when the line was read, ms since the Unix epoch.
    read_at_ms: i64,
}

/// A `conveyor queue consume --output json` process whose lines are read as they come.
struct WorkerProcess {
    name: String,
    child: Child,
    printed: Arc<Mutex<Vec<Printed>>>,
    reader: Option<JoinHandle<()>>,
    stderr: PathBuf,
}

impl WorkerProcess {
    /// Spawns `conveyor --broker ADDR --output json queue consume TOPIC --group GROUP ARGS`;
    /// every line it prints is added to its list and counted in `total`.
    fn spawn(name: &str, addr: &str, args: &[&str], dir: &Path, total: &Arc<AtomicUsize>) -> WorkerProcess {
        let stderr = dir.join(format!("{name}.stderr"));
        let mut child = Command::new(cli_bin())
            .args([
                "--broker", addr, "--output", "json", "queue", "consume", TOPIC, "--group", GROUP,
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("worker stderr file"))
            .spawn()
            .expect("spawn conveyor queue consume");
        let stdout = child.stdout.take().expect("worker stdout");
        let printed: Arc<Mutex<Vec<Printed>>> = Arc::default();
        let reader = {
            let (printed, total) = (Arc::clone(&printed), Arc::clone(total));
            std::thread::spawn(move || {
                // Ends at EOF: the process exited or was killed (maybe mid-line).
                for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                    let read_at_ms = unix_millis();
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    let p = Printed {
                        partition: v["partition"].as_i64().expect("partition") as i32,
                        offset: v["offset"].as_u64().expect("offset"),
                        delivery_count: v["delivery_count"].as_u64().expect("delivery_count"),
                        line: v,
                        read_at_ms,
                    };
                    printed.lock().expect("printed").push(p);
                    total.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        WorkerProcess {
            name: name.to_string(),
            child,
            printed,
            reader: Some(reader),
            stderr,
        }
    }

    fn count(&self) -> usize {
        self.printed.lock().expect("printed").len()
    }

    /// SIGKILL: no acknowledgement sent, no clean leave.
    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL worker");
        self.child.wait().expect("reap worker");
    }

    /// Waits for the process to exit by itself and its output to be read.
    fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let status = poll_for(deadline, || self.child.try_wait().expect("try_wait"))
            .unwrap_or_else(|| panic!("{} did not exit within {deadline:?}", self.name));
        self.join_reader();
        status
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            r.join().expect("reader thread");
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn printed(&self) -> Vec<Printed> {
        self.printed.lock().expect("printed").clone()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_broker() -> BrokerProcess {
    let broker = BrokerProcess::start();
    let out = cli(
        broker.addr(),
        &["topic", "create", TOPIC, "--partitions", &PARTITIONS.to_string()],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    broker
}

/// Produces `records` in small batches; returns each one's (partition, offset), in order.
async fn produce(addr: &str, records: Vec<ProducerRecord>) -> Vec<(i32, u64)> {
    let client = Client::connect(addr).await.expect("connect");
    let producer = client
        .producer(ProducerConfig::default().batch_size(BATCH_BYTES))
        .expect("producer");
    let mut deliveries = Vec::with_capacity(records.len());
    for r in records {
        deliveries.push(producer.send(r).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    let mut at = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let m = d.await.expect("delivered");
        at.push((m.partition, m.offset.expect("an acks=all delivery has its offset")));
    }
    at
}

/// Asserts that `queue describe` shows every partition done: its start at its log end.
fn assert_all_done(addr: &str) {
    let d = cli_json(addr, &["queue", "describe", GROUP]);
    let partitions = d["partitions"].as_array().expect("partitions");
    assert_eq!(partitions.len(), PARTITIONS as usize, "{d}");
    for p in partitions {
        assert_eq!(
            p["start_offset"], p["log_end_offset"],
            "partition {}: records left undone: {d}",
            p["partition"]
        );
        assert_eq!(
            (p["available"].as_u64(), p["acquired"].as_u64()),
            (Some(0), Some(0)),
            "{d}"
        );
    }
}

#[test]
fn given_four_cli_workers_when_two_are_sigkilled_mid_stream_should_reprint_only_what_the_killed_held_and_at_once() {
    const RECORDS: usize = 20_000;
    const WORKERS: usize = 4;
    /// Records the survivors must have printed, all of them, within this long after the
    /// kill: the locks last 30 s, so records back by then came back because their holder
    /// died, not because its locks ran out.
    const BACK_BEFORE_LOCKS: Duration = Duration::from_secs(20);
    const KILL_DEADLINE: Duration = Duration::from_secs(60);
    let broker = start_broker();
    let addr = broker.addr().to_string();
    let records = (0..RECORDS)
        .map(|i| ProducerRecord::new(TOPIC, format!("job-{i}")).partition(i as i32 % PARTITIONS))
        .collect();
    let produced: Vec<(i32, u64)> = runtime().block_on(produce(&addr, records));
    let value_at: HashMap<(i32, u64), String> = produced
        .iter()
        .enumerate()
        .map(|(i, at)| (*at, format!("job-{i}")))
        .collect();
    assert_eq!(value_at.len(), RECORDS, "every record at an offset of its own");

    let dir = tempfile::tempdir().expect("temp dir");
    let total = Arc::new(AtomicUsize::new(0));
    let args = ["--from", "earliest", "--lock-duration", "30s", "--idle-timeout", "5s"];
    let mut workers: Vec<WorkerProcess> = (0..WORKERS)
        .map(|i| WorkerProcess::spawn(&format!("worker-{i}"), &addr, &args, dir.path(), &total))
        .collect();
    let started = Instant::now();
    poll_for(KILL_DEADLINE, || {
        (total.load(Ordering::SeqCst) >= RECORDS / 4).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "only {} records printed in {KILL_DEADLINE:?}",
            total.load(Ordering::SeqCst)
        )
    });
    // The two that printed most: both surely hold printed records not yet accepted.
    let mut by_count: Vec<usize> = (0..WORKERS).collect();
    by_count.sort_by_key(|i| std::cmp::Reverse(workers[*i].count()));
    let killed: BTreeSet<usize> = by_count[..2].iter().copied().collect();
    for i in &killed {
        workers[*i].kill();
    }
    let killed_at = Instant::now();
    let printed_at_kill = total.load(Ordering::SeqCst);
    for i in &killed {
        workers[*i].join_reader();
    }

    // The survivors print everything not accepted before the kill.
    let all_printed = poll_for(BACK_BEFORE_LOCKS + Duration::from_secs(30), || {
        let mut seen: BTreeSet<(i32, u64)> = BTreeSet::new();
        for w in &workers {
            seen.extend(
                w.printed
                    .lock()
                    .expect("printed")
                    .iter()
                    .map(|p| (p.partition, p.offset)),
            );
        }
        (seen.len() >= RECORDS).then(|| killed_at.elapsed())
    });
    for (i, w) in workers.iter_mut().enumerate() {
        if !killed.contains(&i) {
            let status = w.wait(EXIT_DEADLINE);
            assert!(status.success(), "{} failed: {status}\n{}", w.name, w.stderr());
            assert!(
                !w.stderr().contains("refused or lost"),
                "{}: a survivor's accept was refused:\n{}",
                w.name,
                w.stderr()
            );
        }
    }

    // Per record: (worker, delivery count) of each printing.
    let mut printings: BTreeMap<(i32, u64), Vec<(usize, u64)>> = BTreeMap::new();
    for (i, w) in workers.iter().enumerate() {
        for p in w.printed() {
            let at = (p.partition, p.offset);
            let value = value_at
                .get(&at)
                .unwrap_or_else(|| panic!("{} printed a record never produced: {:?}", w.name, p.line));
            assert_eq!(
                p.line["value"].as_str(),
                Some(value.as_str()),
                "{}: {:?}",
                w.name,
                p.line
            );
            printings.entry(at).or_default().push((i, p.delivery_count));
        }
    }
    let missing: Vec<_> = value_at
        .keys()
        .filter(|at| !printings.contains_key(at))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "records never printed (the survivors went idle first: did the killed workers' records wait for their locks?): {missing:?}"
    );
    let all_printed = all_printed.expect("every record printed (the missing ones are listed above)");
    let mut duplicates = 0;
    for (at, ps) in &printings {
        let by_killed = ps.iter().filter(|(w, _)| killed.contains(w)).count();
        let by_survivors: Vec<u64> = ps
            .iter()
            .filter(|(w, _)| !killed.contains(w))
            .map(|(_, c)| *c)
            .collect();
        assert!(
            by_killed <= 1,
            "{at:?} printed by killed workers {by_killed} times: {ps:?}"
        );
        assert!(
            by_survivors.len() <= 1,
            "{at:?} printed by survivors {} times: {ps:?}",
            by_survivors.len()
        );
        if ps.len() > 1 {
            duplicates += 1;
            // Printed first by a killed worker, then delivered again to a survivor.
            assert!(by_survivors[0] >= 2, "{at:?} printed again with delivery count {ps:?}");
        }
    }
    let printed_by_killed: usize = killed.iter().map(|i| workers[*i].count()).sum();
    eprintln!(
        "{WORKERS} workers printed {printed_at_kill} records in {:?}; killed {killed:?} (they had printed {printed_by_killed}); \
         the survivors printed every record {all_printed:?} after the kill, {duplicates} of them a second time",
        killed_at - started
    );
    assert!(
        all_printed < BACK_BEFORE_LOCKS,
        "every record printed only {all_printed:?} after the kill: the killed workers' records waited for their locks"
    );
    assert_all_done(&addr);
}

/// `CONVEYOR_TEST_SEED` when set (to replay a run), else one from the clock.
fn seed() -> u64 {
    std::env::var("CONVEYOR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| unix_millis() as u64)
}

/// What a key-order worker did with one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    /// Its accept was refused (the lock had run out while it was processed).
    AcceptRefused,
    Released,
    ReleaseRefused,
    /// Dropped without an acknowledgement: its lock runs out.
    Dropped,
}

/// One delivery a key-order worker handled.
#[derive(Debug, Clone)]
struct Handled {
    worker: usize,
    key: usize,
    /// The record's place among its key's records.
    seq: usize,
    partition: i32,
    offset: u64,
    delivery_count: u32,
    /// When the coordinator acquired it: its lock's end less the lock duration (the
    /// coordinator's clock, which is this machine's).
    acquired_ms: i64,
    locked_until_ms: i64,
    /// When the worker sent its accept or release.
    acked_ms: Option<i64>,
    /// Its place in the order acknowledgements were sent, over all workers.
    ack_seq: u64,
    /// Its place in the order acknowledgements were answered, over all workers.
    answer_seq: u64,
    outcome: Outcome,
}

impl Handled {
    /// When the coordinator may have let the record go at the latest: the worker's
    /// acknowledgement (applied after it was sent) or the lock's end, whichever came first.
    fn end_ms(&self) -> i64 {
        self.acked_ms
            .map_or(self.locked_until_ms, |a| a.min(self.locked_until_ms))
    }
}

/// What the key-order workers share.
struct Board {
    records: usize,
    accepted: AtomicUsize,
    ack_seq: AtomicU64,
    answer_seq: AtomicU64,
    deadline: Instant,
}

const KEY_ORDER_LOCK: Duration = Duration::from_secs(1);
/// Deliveries a key-order worker fetches ahead: few, so none waits in its buffer anywhere
/// near the 1 s lock.
const KEY_ORDER_PREFETCH: usize = 8;

/// Takes deliveries until `board.records` were accepted: each after 0–20 ms of
/// "processing", then (by `rng`) accepted (88%), released (10%) or dropped (2%).
async fn key_order_worker(client: Client, worker: usize, mut rng: keyed::Rng, board: Arc<Board>) -> Vec<Handled> {
    let config = ShareConfig::default()
        .ordering(ShareOrdering::Key)
        .lock_duration(KEY_ORDER_LOCK)
        .max_delivery_count(10)
        .auto_offset_reset(ShareOffsetReset::Earliest)
        .prefetch(KEY_ORDER_PREFETCH)
        .max_records(KEY_ORDER_PREFETCH as u32);
    let mut consumer = client.share_consumer(GROUP, TOPIC, config).await.expect("join");
    let mut handled = Vec::new();
    while board.accepted.load(Ordering::SeqCst) < board.records {
        assert!(
            Instant::now() < board.deadline,
            "worker {worker}: the deadline passed with {} of {} records accepted",
            board.accepted.load(Ordering::SeqCst),
            board.records
        );
        let d = match tokio::time::timeout(Duration::from_millis(200), consumer.next()).await {
            Err(_) => continue,
            Ok(None) => panic!("worker {worker}: the consumer's stream ended"),
            Ok(Some(Err(e))) if e.is_retriable() => continue,
            Ok(Some(Err(e))) => panic!("worker {worker}: {e}"),
            Ok(Some(Ok(d))) => d,
        };
        let value = String::from_utf8_lossy(d.record().value.as_deref().unwrap_or_default()).into_owned();
        let (key, seq) = value
            .strip_prefix('k')
            .and_then(|v| v.split_once(':'))
            .and_then(|(k, s)| Some((k.parse().ok()?, s.parse().ok()?)))
            .unwrap_or_else(|| panic!("worker {worker}: a value not produced: {value:?}"));
        let locked_until_ms = d.locked_until();
        let mut h = Handled {
            worker,
            key,
            seq,
            partition: d.record().partition,
            offset: d.record().offset,
            delivery_count: d.delivery_count(),
            acquired_ms: locked_until_ms - KEY_ORDER_LOCK.as_millis() as i64,
            locked_until_ms,
            acked_ms: None,
            ack_seq: 0,
            answer_seq: 0,
            outcome: Outcome::Dropped,
        };
        tokio::time::sleep(Duration::from_millis(rng.below(21))).await;
        let roll = rng.below(100);
        if roll < 2 {
            drop(d);
        } else {
            h.acked_ms = Some(unix_millis());
            h.ack_seq = board.ack_seq.fetch_add(1, Ordering::SeqCst);
            h.outcome = if roll < 12 {
                match d.release(Duration::ZERO).await {
                    Ok(()) => Outcome::Released,
                    Err(_) => Outcome::ReleaseRefused,
                }
            } else {
                match d.accept().await {
                    Ok(()) => {
                        board.accepted.fetch_add(1, Ordering::SeqCst);
                        Outcome::Accepted
                    }
                    Err(_) => Outcome::AcceptRefused,
                }
            };
            h.answer_seq = board.answer_seq.fetch_add(1, Ordering::SeqCst);
        }
        handled.push(h);
    }
    consumer.close().await.expect("close");
    handled
}

#[test]
fn given_key_order_and_eight_workers_that_accept_release_and_drop_at_random_should_accept_each_key_in_offset_order_one_at_a_time()
 {
    const RECORDS: usize = 3_000;
    const KEYS: usize = 50;
    const WORKERS: usize = 8;
    const RUN_DEADLINE: Duration = Duration::from_secs(150);
    let seed = seed();
    eprintln!("seed {seed} (CONVEYOR_TEST_SEED={seed} replays the choices)");
    let broker = start_broker();
    let addr = broker.addr().to_string();
    let rt = runtime();
    // Record i is the (i / KEYS)th of key i % KEYS.
    let records = (0..RECORDS)
        .map(|i| {
            let (key, seq) = (i % KEYS, i / KEYS);
            ProducerRecord::new(TOPIC, format!("k{key}:{seq}")).key(format!("key-{key}"))
        })
        .collect();
    let produced = rt.block_on(produce(&addr, records));
    // Per key, its records' (partition, offset) by seq: one partition, offsets rising.
    let mut of_key: Vec<Vec<(i32, u64)>> = vec![Vec::new(); KEYS];
    for (i, at) in produced.iter().enumerate() {
        of_key[i % KEYS].push(*at);
    }
    for (k, ats) in of_key.iter().enumerate() {
        assert!(
            ats.windows(2).all(|w| w[0].0 == w[1].0 && w[0].1 < w[1].1),
            "key {k} was not written in order to one partition: {ats:?}"
        );
    }

    let board = Arc::new(Board {
        records: RECORDS,
        accepted: AtomicUsize::new(0),
        ack_seq: AtomicU64::new(0),
        answer_seq: AtomicU64::new(0),
        deadline: Instant::now() + RUN_DEADLINE,
    });
    let began = Instant::now();
    let handled: Vec<Handled> = rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        let tasks: Vec<_> = (0..WORKERS)
            .map(|w| {
                let rng = keyed::Rng::new(seed ^ (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
                tokio::spawn(key_order_worker(client.clone(), w, rng, Arc::clone(&board)))
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("a worker failed"));
        }
        all
    });
    let took = began.elapsed();

    let count = |o: Outcome| handled.iter().filter(|h| h.outcome == o).count();
    let mut per_key: Vec<Vec<&Handled>> = vec![Vec::new(); KEYS];
    for h in &handled {
        assert_eq!(
            of_key[h.key].get(h.seq),
            Some(&(h.partition, h.offset)),
            "worker {} was handed k{}:{} at the wrong place",
            h.worker,
            h.key,
            h.seq
        );
        per_key[h.key].push(h);
    }
    let mut answered_out_of_order = 0;
    for (k, hs) in per_key.iter_mut().enumerate() {
        // Accepted (answered Ok), in the order the accepts were sent: each record once,
        // in offset order, none missing. (Sending is causally ordered: record n+1 can only
        // be delivered after record n's accept was applied. The answers are not: two
        // members' answers may cross on their way.)
        let mut accepted: Vec<&Handled> = hs.iter().copied().filter(|h| h.outcome == Outcome::Accepted).collect();
        accepted.sort_by_key(|h| h.ack_seq);
        let seqs: Vec<usize> = accepted.iter().map(|h| h.seq).collect();
        let expected: Vec<usize> = (0..of_key[k].len()).collect();
        assert_eq!(seqs, expected, "key {k}: records accepted (in the order accepted)");
        answered_out_of_order += accepted
            .windows(2)
            .filter(|w| w[0].answer_seq > w[1].answer_seq)
            .count();

        // One record of the key held at a time: in key order its deliveries go record by
        // record, each acquired only after the one before was let go (acknowledged, or its
        // lock ran out).
        hs.sort_by_key(|h| (h.seq, h.delivery_count));
        for w in hs.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(
                b.acquired_ms >= a.end_ms(),
                "key {k}: k{k}:{} (delivery {}) was acquired at {} ms while k{k}:{} (delivery {}) was held until {} ms: {a:?} {b:?}",
                b.seq,
                b.delivery_count,
                b.acquired_ms,
                a.seq,
                a.delivery_count,
                a.end_ms()
            );
            if a.seq == b.seq {
                assert!(b.delivery_count > a.delivery_count, "key {k}: {a:?} then {b:?}");
                assert_ne!(
                    a.outcome,
                    Outcome::Accepted,
                    "key {k}: delivered again after an accept: {b:?}"
                );
            } else {
                assert_eq!(
                    a.outcome,
                    Outcome::Accepted,
                    "key {k}: the next record came before this one was accepted: {a:?} then {b:?}"
                );
            }
        }
    }
    let redelivered = handled.iter().filter(|h| h.delivery_count > 1).count();
    eprintln!(
        "{WORKERS} workers: {RECORDS} records of {KEYS} keys accepted in {took:?}; {} deliveries: {} released, {} dropped, \
         {} accepts and {} releases refused, {redelivered} redeliveries; {answered_out_of_order} accepts answered after the next record's",
        handled.len(),
        count(Outcome::Released),
        count(Outcome::Dropped),
        count(Outcome::AcceptRefused),
        count(Outcome::ReleaseRefused),
    );
    // The choices exercised every path.
    assert!(
        count(Outcome::Released) > 0 && count(Outcome::Dropped) > 0,
        "no release or no drop"
    );
    let d = cli_json(&addr, &["queue", "describe", GROUP]);
    assert_all_done(&addr);
    for p in d["partitions"].as_array().expect("partitions") {
        assert_eq!(p["archived"].as_u64(), Some(0), "a record was dead-lettered: {d}");
    }
}

#[test]
fn given_records_delayed_by_a_header_when_a_cli_worker_consumes_should_print_none_before_it_is_due() {
    const EACH: usize = 20;
    const DELAY: Duration = Duration::from_secs(3);
    /// A due record is printed within this long (the coordinator wakes its fetches when
    /// the first delayed record is due).
    const DUE_DEADLINE: Duration = Duration::from_secs(10);
    let broker = start_broker();
    let addr = broker.addr().to_string();
    let dir = tempfile::tempdir().expect("temp dir");
    let total = Arc::new(AtomicUsize::new(0));
    // Started first, so that its join is not part of the delay.
    let args = ["--from", "earliest", "--idle-timeout", "6s"];
    let mut worker = WorkerProcess::spawn("worker", &addr, &args, dir.path(), &total);
    poll_for(EXIT_DEADLINE, || {
        let out = cli(&addr, &["queue", "describe", GROUP, "--output", "json"], "");
        let d: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (d["members"].as_array()?.len() == 1).then_some(())
    })
    .unwrap_or_else(|| panic!("the worker never joined:\n{}", worker.stderr()));
    // Delayed and immediate records interleaved in the same batches.
    let deliver_at = unix_millis() + DELAY.as_millis() as i64;
    let records = (0..2 * EACH)
        .map(|i| {
            let r = ProducerRecord::new(TOPIC, format!("job-{i}")).partition(i as i32 % PARTITIONS);
            if i.is_multiple_of(2) {
                r.header(DELIVER_AT, deliver_at.to_string())
            } else {
                r
            }
        })
        .collect();
    let produced = runtime().block_on(produce(&addr, records));
    poll_for(DELAY + DUE_DEADLINE, || {
        (total.load(Ordering::SeqCst) >= 2 * EACH).then_some(())
    })
    .unwrap_or_else(|| panic!("only {} of {} records printed", total.load(Ordering::SeqCst), 2 * EACH));
    let status = worker.wait(EXIT_DEADLINE);
    assert!(status.success(), "the worker failed: {status}\n{}", worker.stderr());

    let printed = worker.printed();
    let at: BTreeMap<(i32, u64), usize> = produced.iter().enumerate().map(|(i, at)| (*at, i)).collect();
    let mut seen = BTreeSet::new();
    for p in &printed {
        let i = *at
            .get(&(p.partition, p.offset))
            .unwrap_or_else(|| panic!("printed a record never produced: {:?}", p.line));
        assert!(seen.insert(i), "job-{i} printed twice: {:?}", p.line);
        assert_eq!(
            p.line["value"].as_str(),
            Some(format!("job-{i}").as_str()),
            "{:?}",
            p.line
        );
        assert_eq!(p.delivery_count, 1, "job-{i} was delivered before: {:?}", p.line);
        if i.is_multiple_of(2) {
            assert_eq!(
                p.line["headers"][DELIVER_AT].as_str(),
                Some(deliver_at.to_string().as_str()),
                "{:?}",
                p.line
            );
            assert!(
                p.read_at_ms >= deliver_at,
                "job-{i} printed {} ms before it was due",
                deliver_at - p.read_at_ms
            );
            assert!(
                p.read_at_ms <= deliver_at + DUE_DEADLINE.as_millis() as i64,
                "job-{i} printed {} ms after it was due",
                p.read_at_ms - deliver_at
            );
        } else {
            // The delayed records hold nothing back: the others go at once.
            assert!(
                p.read_at_ms < deliver_at,
                "job-{i} (not delayed) printed only {} ms after the delayed records were due",
                p.read_at_ms - deliver_at
            );
        }
    }
    let first_delayed = printed
        .iter()
        .filter(|p| p.line["headers"][DELIVER_AT].is_string())
        .map(|p| p.read_at_ms)
        .min();
    eprintln!(
        "the delayed records were printed from {} ms after they were due",
        first_delayed.expect("delayed records printed") - deliver_at
    );
    assert_all_done(&addr);
}
