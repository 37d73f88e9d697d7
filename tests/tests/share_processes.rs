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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::{BrokerProcess, cli, cli_bin, cli_json, poll_for, runtime};

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";
const PARTITIONS: i32 = 3;
/// Producer batches of about this many bytes: share fetches ship whole stored batches, so
/// small ones keep what a worker holds close to what it asked for.
const BATCH_BYTES: usize = 4096;
/// How long a worker process may take to exit once it should (its idle timeout included).
const EXIT_DEADLINE: Duration = Duration::from_secs(40);

/// One line a worker printed, with when it was read.
#[derive(Debug, Clone)]
struct Printed {
    partition: i32,
    offset: u64,
    delivery_count: u64,
    line: serde_json::Value,
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
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                        continue;
                    };
                    let p = Printed {
                        partition: v["partition"].as_i64().expect("partition") as i32,
                        offset: v["offset"].as_u64().expect("offset"),
                        delivery_count: v["delivery_count"].as_u64().expect("delivery_count"),
                        line: v,
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
    assert!(missing.is_empty(), "records never printed: {missing:?}");
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
