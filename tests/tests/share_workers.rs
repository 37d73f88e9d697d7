//! Share group workers against real brokers: many members splitting one topic's records,
//! members that vanish holding records, and a share coordinator SIGKILLed under load.
//!
//! Each worker is one [`RawMember`] driven by a task of its own: it fetches up to
//! [`FETCH_RECORDS`] records (waiting up to [`FETCH_WAIT`]), accepts every record it gets
//! on its next fetch, and notes what it was handed and which of its accepts the coordinator
//! answered as applied. The workers share a [`Board`]: the records accepted so far, and the
//! deliveries of a record after an accept of it was answered (which must never happen).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_client::proto::*;
use conveyor_client::{Client, ProducerConfig, ProducerRecord};
use conveyor_tests::cluster::Cluster;
use conveyor_tests::share_raw::{Acquired, RawMember, acks_of, find_share_coordinator, try_shares};
use conveyor_tests::{BrokerProcess, cli, runtime};

const TOPIC: &str = "jobs";
const GROUP: &str = "workers";
const PARTITIONS: i32 = 3;
const FETCH_RECORDS: u32 = 200;
const FETCH_WAIT: Duration = Duration::from_millis(500);
/// A fetch or acknowledgement unanswered this long failed (its outcome unknown).
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// Producer batches of about this many bytes hold about 200 records: records are acquired
/// as whole stored batches, so a fetch gets about what it asks for.
const BATCH_BYTES: usize = 4096;
/// The lock of an acquired record: far longer than any of these runs needs after a member
/// goes, so a record that comes back soon came back because its holder went.
const LOCK_MS: u32 = 30_000;
/// How long a whole run of workers may take before the test fails.
const RUN_DEADLINE: Duration = Duration::from_secs(150);

fn value(i: usize) -> String {
    format!("job-{i}")
}

/// Produces `n` records (value `job-<i>`, partition `i % 3`) in small batches; returns
/// which record each (partition, offset) holds.
async fn produce(bootstrap: &str, n: usize) -> HashMap<(i32, u64), usize> {
    let client = Client::connect(bootstrap).await.expect("connect");
    let producer = client
        .producer(ProducerConfig::default().batch_size(BATCH_BYTES))
        .expect("producer");
    let mut deliveries = Vec::with_capacity(n);
    for i in 0..n {
        let record = ProducerRecord::new(TOPIC, value(i)).partition(i as i32 % PARTITIONS);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    let mut at = HashMap::with_capacity(n);
    for (i, d) in deliveries.into_iter().enumerate() {
        let m = d.await.expect("delivered");
        at.insert((m.partition, m.offset.expect("an acks=all delivery has its offset")), i);
    }
    at
}

fn settings() -> ShareGroupSettings {
    ShareGroupSettings {
        auto_offset_reset: Some("earliest".into()),
        lock_duration_ms: Some(LOCK_MS),
        ..Default::default()
    }
}

/// What the workers share.
struct Board {
    /// Records in the topic.
    total: usize,
    /// Records whose accept the coordinator answered as applied, by any worker.
    accepted: Mutex<HashSet<(i32, u64)>>,
    /// Their number.
    accepted_count: AtomicUsize,
    /// Set when the run is over: workers send the acknowledgements they owe and stop.
    finished: AtomicBool,
    /// Deliveries of a record after an accept of it was answered: (worker, record).
    again_after_accept: Mutex<Vec<(String, i32, u64)>>,
    deadline: Instant,
}

impl Board {
    fn new(total: usize) -> Arc<Board> {
        Arc::new(Board {
            total,
            accepted: Mutex::default(),
            accepted_count: AtomicUsize::new(0),
            finished: AtomicBool::new(false),
            again_after_accept: Mutex::default(),
            deadline: Instant::now() + RUN_DEADLINE,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted_count.load(Ordering::SeqCst)
    }

    fn over(&self) -> bool {
        self.finished.load(Ordering::SeqCst) || self.accepted() >= self.total
    }
}

/// What one worker saw.
#[derive(Debug, Default)]
struct Tally {
    id: String,
    /// Every record handed to it, with when.
    delivered: Vec<(Acquired, Instant)>,
    /// Records whose accept it sent and the coordinator answered as applied.
    accepted: Vec<(i32, u64)>,
    /// Acknowledgement results other than applied.
    refused: Vec<ShareAckResult>,
    /// Records whose accept was sent in a request that failed (applied or not: unknown).
    uncertain: Vec<(i32, u64)>,
    /// When it vanished, and the records it held then (acquired, not acknowledged).
    vanished: Option<(Instant, Vec<(i32, u64)>)>,
    /// Accepts with tokens of an earlier coordinator, refused at a new one.
    old_tokens_refused: usize,
    /// Accepts sent again after joining again (tokens of an earlier session), refused.
    refused_after_rejoin: usize,
    rejoins: usize,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Works until every record is accepted (or the run is declared over).
    Finish,
    /// Once this many records are accepted in all, vanishes after a fetch that handed it
    /// records, before acknowledging them: its session (and connection) is dropped.
    VanishAfter(usize),
}

struct Worker {
    id: String,
    member: RawMember,
    board: Arc<Board>,
    role: Role,
    /// A cluster's client addresses: a failed request makes the worker join again through
    /// them. `None`: a failed request fails the test.
    cluster: Option<Vec<String>>,
    /// Requests started and answered (or failed), to wait out those in flight.
    started: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
}

impl Worker {
    fn new(member: RawMember, board: &Arc<Board>, role: Role, cluster: Option<Vec<String>>) -> Worker {
        Worker {
            id: member.id.clone(),
            member,
            board: Arc::clone(board),
            role,
            cluster,
            started: Arc::default(),
            answered: Arc::default(),
        }
    }

    async fn run(mut self) -> Tally {
        let mut t = Tally {
            id: self.id.clone(),
            ..Default::default()
        };
        // Records acquired and not yet acknowledged: accepted with the next request.
        let mut held: Vec<Acquired> = Vec::new();
        loop {
            let over = self.board.over();
            if over && held.is_empty() {
                return t;
            }
            assert!(
                Instant::now() < self.board.deadline,
                "{}: the run's deadline passed with {} of {} records accepted",
                self.id,
                self.board.accepted(),
                self.board.total
            );
            let acks = acks_of(&held, ShareAckKind::Accept);
            let sent = acks.len();
            self.started.fetch_add(1, Ordering::SeqCst);
            let answer = if over {
                tokio::time::timeout(RPC_TIMEOUT, self.member.ack(acks))
                    .await
                    .map(|r| r.map(|results| (Vec::new(), results)))
            } else {
                tokio::time::timeout(RPC_TIMEOUT, self.member.fetch(FETCH_RECORDS, FETCH_WAIT, acks)).await
            };
            self.answered.fetch_add(1, Ordering::SeqCst);
            let answer = answer.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in time")));
            match answer {
                Ok((records, results)) => {
                    assert_eq!(results.len(), sent, "{}: one result per acknowledgement", self.id);
                    self.settle(&mut t, &held, &results);
                    held.clear();
                    self.note_delivered(&mut t, &records);
                    if let Role::VanishAfter(n) = self.role
                        && !records.is_empty()
                        && self.board.accepted() >= n
                    {
                        let holding = records.iter().map(|r| (r.partition, r.offset)).collect();
                        t.vanished = Some((Instant::now(), holding));
                        // Returning drops the member: its session stream and connection end.
                        return t;
                    }
                    held = records;
                }
                Err(e) => {
                    let Some(addrs) = self.cluster.clone() else {
                        panic!("{}: a request failed: {e:?}", self.id);
                    };
                    t.uncertain.extend(held.iter().map(|r| (r.partition, r.offset)));
                    let stale = std::mem::take(&mut held);
                    self.rejoin(&addrs, &mut t, stale).await;
                }
            }
        }
    }

    /// Notes the results of acknowledging `sent`.
    fn settle(&self, t: &mut Tally, sent: &[Acquired], results: &[ShareAckResult]) {
        for r in results {
            let covered = sent
                .iter()
                .filter(|a| a.partition == r.partition && r.first_offset <= a.offset && a.offset <= r.last_offset);
            if r.error != 0 {
                t.refused.push(r.clone());
                continue;
            }
            let mut accepted = self.board.accepted.lock().expect("board");
            for a in covered {
                t.accepted.push((a.partition, a.offset));
                if accepted.insert((a.partition, a.offset)) {
                    self.board.accepted_count.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn note_delivered(&self, t: &mut Tally, records: &[Acquired]) {
        let now = Instant::now();
        let accepted = self.board.accepted.lock().expect("board");
        for r in records {
            if accepted.contains(&(r.partition, r.offset)) {
                self.board
                    .again_after_accept
                    .lock()
                    .expect("board")
                    .push((self.id.clone(), r.partition, r.offset));
            }
            t.delivered.push((r.clone(), now));
        }
    }

    /// Joins again at the group's coordinator, then accepts `stale` (acquired before the
    /// failure) there: a new coordinator must refuse those tokens.
    async fn rejoin(&mut self, addrs: &[String], t: &mut Tally, stale: Vec<Acquired>) {
        t.rejoins += 1;
        let old = self.member.addr.clone();
        self.member = RawMember::join_following(
            addrs,
            GROUP,
            &self.id,
            "",
            ShareGroupSettings::default(),
            self.board.deadline,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: join again refused: {e:?}", self.id));
        if stale.is_empty() {
            return;
        }
        let acks = acks_of(&stale, ShareAckKind::Accept);
        let Ok(Ok(results)) = tokio::time::timeout(RPC_TIMEOUT, self.member.ack(acks)).await else {
            // The next fetch fails too and joins again; the records stay uncertain.
            return;
        };
        if self.member.addr != old {
            for r in &results {
                assert_eq!(
                    r.error,
                    ErrorCode::StaleDelivery as i32,
                    "{}: a token of the coordinator at {old} was taken by the new one at {}: {r:?}",
                    self.id,
                    self.member.addr
                );
            }
            t.old_tokens_refused += results.len();
        }
        t.refused_after_rejoin += results.iter().filter(|r| r.error != 0).count();
        self.settle(t, &stale, &results);
    }
}

/// A count per record: (partition, offset) → n.
type PerRecord = HashMap<(i32, u64), u32>;

/// How many times each record was delivered and accepted (answered as applied), over all
/// workers; panics on a record that is not the one produced at its offset.
fn counts(tallies: &[Tally], produced: &HashMap<(i32, u64), usize>) -> (PerRecord, PerRecord) {
    let (mut delivered, mut accepted) = (HashMap::new(), HashMap::new());
    for t in tallies {
        for (r, _) in &t.delivered {
            let i = produced
                .get(&(r.partition, r.offset))
                .unwrap_or_else(|| panic!("{}: delivered a record never produced: {r:?}", t.id));
            assert_eq!(r.value.as_deref(), Some(value(*i).as_bytes()), "{}: {r:?}", t.id);
            *delivered.entry((r.partition, r.offset)).or_insert(0) += 1;
        }
        for a in &t.accepted {
            *accepted.entry(*a).or_insert(0) += 1;
        }
    }
    (delivered, accepted)
}

fn start_single(partitions: i32) -> BrokerProcess {
    let broker = BrokerProcess::start();
    let out = cli(
        broker.addr(),
        &["topic", "create", TOPIC, "--partitions", &partitions.to_string()],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    broker
}

async fn join_all(addr: &str, n: usize) -> Vec<RawMember> {
    let mut members = Vec::with_capacity(n);
    for i in 0..n {
        let m = RawMember::join(addr, GROUP, &format!("w{i}"), TOPIC, settings())
            .await
            .expect("join");
        assert_eq!(m.first.partitions, PARTITIONS as u32);
        members.push(m);
    }
    members
}

#[test]
fn eight_workers_accept_every_record_exactly_once_and_share_the_work() {
    const RECORDS: usize = 100_000;
    const WORKERS: usize = 8;
    let broker = start_single(PARTITIONS);
    runtime().block_on(async {
        let began = Instant::now();
        let produced = produce(broker.addr(), RECORDS).await;
        eprintln!("produced {RECORDS} records in {:?}", began.elapsed());
        let board = Board::new(RECORDS);
        let members = join_all(broker.addr(), WORKERS).await;
        let began = Instant::now();
        let tasks: Vec<_> = members
            .into_iter()
            .map(|m| tokio::spawn(Worker::new(m, &board, Role::Finish, None).run()))
            .collect();
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await.expect("a worker failed"));
        }
        eprintln!("{WORKERS} workers accepted {RECORDS} records in {:?}", began.elapsed());

        let (delivered, accepted) = counts(&tallies, &produced);
        let twice: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(twice.is_empty(), "records delivered more than once: {twice:?}");
        let accepted_twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(
            accepted_twice.is_empty(),
            "records accepted more than once: {accepted_twice:?}"
        );
        let missing: Vec<_> = produced.keys().filter(|k| !accepted.contains_key(k)).take(10).collect();
        assert!(missing.is_empty(), "records never accepted: {missing:?}");
        for t in &tallies {
            assert!(
                t.refused.is_empty(),
                "{}: accepts refused: {:?}",
                t.id,
                &t.refused[..t.refused.len().min(5)]
            );
        }
        // Evenly split each would get 12.5%; 1% only fails when some workers are starved.
        let shares: BTreeMap<&str, usize> = tallies.iter().map(|t| (t.id.as_str(), t.accepted.len())).collect();
        eprintln!("accepted per worker: {shares:?}");
        for (id, n) in &shares {
            assert!(
                *n >= RECORDS / 100,
                "{id} accepted only {n} of {RECORDS} records: {shares:?}"
            );
        }
        let d = describe(&[broker.addr().to_string()], board.deadline).await;
        for p in &d.partitions {
            assert_eq!(Some(p.start_offset), p.log_end_offset, "every record done: {d:?}");
            assert_eq!((p.available, p.acquired), (0, 0), "{d:?}");
        }
    });
}

#[test]
fn records_held_by_workers_that_vanish_come_back_at_once_to_the_others() {
    const RECORDS: usize = 20_000;
    const WORKERS: usize = 8;
    const VANISHING: usize = 4;
    let broker = start_single(PARTITIONS);
    runtime().block_on(async {
        let produced = produce(broker.addr(), RECORDS).await;
        let board = Board::new(RECORDS);
        let members = join_all(broker.addr(), WORKERS).await;
        let began = Instant::now();
        let (mut vanishing, mut staying) = (Vec::new(), Vec::new());
        for (i, m) in members.into_iter().enumerate() {
            if i < VANISHING {
                let role = Role::VanishAfter(RECORDS * 3 / 10);
                vanishing.push(tokio::spawn(Worker::new(m, &board, role, None).run()));
            } else {
                staying.push(tokio::spawn(Worker::new(m, &board, Role::Finish, None).run()));
            }
        }
        let mut tallies = Vec::new();
        for task in vanishing {
            tallies.push(task.await.expect("a vanishing worker failed"));
        }
        let last_gone = tallies
            .iter()
            .map(|t| t.vanished.as_ref().expect("vanished").0)
            .max()
            .expect("vanishing workers");
        let accepted_then = board.accepted();
        for task in staying {
            tallies.push(task.await.expect("a worker failed"));
        }
        let after = last_gone.elapsed();
        eprintln!(
            "{VANISHING} workers vanished {:?} into the run with {accepted_then} of {RECORDS} accepted; the rest finished {after:?} later",
            last_gone - began
        );

        let (delivered, accepted) = counts(&tallies, &produced);
        // Record → how many vanished workers held it (a record one released may have gone
        // to another about to vanish).
        let mut held: HashMap<(i32, u64), u32> = HashMap::new();
        for t in &tallies[..VANISHING] {
            let (_, holding) = t.vanished.as_ref().expect("vanished");
            assert!(
                t.accepted.iter().all(|a| !holding.contains(a)),
                "{} accepted a record it held when it vanished",
                t.id
            );
            for r in holding {
                *held.entry(*r).or_insert(0) += 1;
            }
        }
        eprintln!("the vanished workers held {} records", held.len());
        let missing: Vec<_> = produced.keys().filter(|k| !accepted.contains_key(k)).take(10).collect();
        assert!(missing.is_empty(), "records never accepted: {missing:?}");
        let accepted_twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(accepted_twice.is_empty(), "records accepted more than once: {accepted_twice:?}");
        for (r, n) in &delivered {
            let holders = held.get(r).copied().unwrap_or(0);
            assert_eq!(
                *n,
                holders + 1,
                "{r:?} was delivered {n} times; {holders} vanished workers held it"
            );
        }
        for t in &tallies {
            assert!(t.refused.is_empty(), "{}: accepts refused: {:?}", t.id, &t.refused[..t.refused.len().min(5)]);
        }
        // Their locks last 30 s: back well before that means back because their holder went.
        assert!(
            after < Duration::from_secs(25),
            "the run finished {after:?} after the workers vanished: their records waited for their locks"
        );
    });
}

/// The group's description from its coordinator among `addrs`, retried while it moves.
async fn describe(addrs: &[String], deadline: Instant) -> ShareGroupDescription {
    loop {
        let at = find_share_coordinator(addrs, GROUP, deadline).await;
        let asked = tokio::time::timeout(RPC_TIMEOUT, async {
            try_shares(&at)
                .await?
                .describe_share_group(DescribeShareGroupRequest { group: GROUP.into() })
                .await
        })
        .await;
        match asked {
            Ok(Ok(d)) => return d.into_inner(),
            other => assert!(
                Instant::now() < deadline,
                "no description of '{GROUP}' from {at}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_offsets(d: &ShareGroupDescription) -> BTreeMap<i32, u64> {
    d.partitions.iter().map(|p| (p.partition, p.start_offset)).collect()
}

#[test]
fn share_coordinator_sigkilled_mid_stream_redelivers_nothing_acknowledged() {
    const RECORDS: usize = 20_000;
    const WORKERS: usize = 4;
    const KILL_AFTER: usize = 3_000;
    let mut cluster = Cluster::start(3, &[]);
    cluster.create_topic(TOPIC, PARTITIONS as u32, 3, &[]);
    let addrs: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| cluster.broker(*id).addr().to_string())
        .collect();
    runtime().block_on(async {
        let produced = produce(&cluster.bootstrap(), RECORDS).await;
        let board = Board::new(RECORDS);
        let mut workers = Vec::new();
        for i in 0..WORKERS {
            let m = RawMember::join_following(&addrs, GROUP, &format!("w{i}"), TOPIC, settings(), board.deadline)
                .await
                .expect("join");
            workers.push(Worker::new(m, &board, Role::Finish, Some(addrs.clone())));
        }
        let in_flight: Vec<_> = workers
            .iter()
            .map(|w| (Arc::clone(&w.started), Arc::clone(&w.answered)))
            .collect();
        let tasks: Vec<_> = workers.into_iter().map(|w| tokio::spawn(w.run())).collect();

        // Some thousands accepted, then the coordinator's state as it answered them.
        while board.accepted() < KILL_AFTER {
            assert!(Instant::now() < board.deadline, "only {} accepted", board.accepted());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let coordinator = find_share_coordinator(&addrs, GROUP, board.deadline).await;
        let before = describe(std::slice::from_ref(&coordinator), board.deadline).await;
        // Every acknowledgement the description shows was applied by a request started
        // before it was answered: once those are answered, it is committed.
        let started: Vec<u64> = in_flight.iter().map(|(s, _)| s.load(Ordering::SeqCst)).collect();
        for ((_, answered), s) in in_flight.iter().zip(&started) {
            while answered.load(Ordering::SeqCst) < *s {
                assert!(Instant::now() < board.deadline, "requests in flight never answered");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Then killed just after an accept is answered, while others are on their way: an
        // answer sent before its records were committed would show as a delivery again.
        let answered_before = board.accepted();
        while board.accepted() < answered_before + KILL_AFTER / 10 {
            assert!(Instant::now() < board.deadline, "accepts stopped before the kill");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let victim = cluster
            .ids()
            .into_iter()
            .find(|id| cluster.broker(*id).addr() == coordinator)
            .expect("the coordinator is a cluster broker");
        let accepted_at_kill = board.accepted();
        cluster.broker_mut(victim).kill();
        let killed = Instant::now();
        eprintln!("killed broker {victim} (the coordinator) with {accepted_at_kill} of {RECORDS} accepted");

        let survivors: Vec<String> = addrs.iter().filter(|a| **a != coordinator).cloned().collect();
        let after = describe(&survivors, board.deadline).await;
        eprintln!("a new coordinator answered {:?} after the kill", killed.elapsed());
        let (was, is) = (start_offsets(&before), start_offsets(&after));
        for (p, start) in &was {
            assert!(
                is.get(p).is_some_and(|now| now >= start),
                "partition {p}: start offset {start} before the kill, {:?} at the new coordinator",
                is.get(p)
            );
        }
        // Delivery resumes until every record is done.
        loop {
            let d = describe(&survivors, board.deadline).await;
            let done = d.partitions.len() == PARTITIONS as usize
                && d.partitions
                    .iter()
                    .all(|p| Some(p.start_offset) == p.log_end_offset && p.available == 0 && p.acquired == 0);
            if done {
                break;
            }
            assert!(Instant::now() < board.deadline, "records left undone: {d:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        board.finished.store(true, Ordering::SeqCst);
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await.expect("a worker failed"));
        }
        eprintln!(
            "every record done {:?} after the kill; {} accepted after it",
            killed.elapsed(),
            board.accepted() - accepted_at_kill
        );

        let again = board.again_after_accept.lock().expect("board").clone();
        assert!(
            again.is_empty(),
            "{} records delivered again after an accept of them was answered: {:?}",
            again.len(),
            &again[..again.len().min(10)]
        );
        let (delivered, accepted) = counts(&tallies, &produced);
        let accepted_twice: Vec<_> = accepted.iter().filter(|(_, n)| **n > 1).take(10).collect();
        assert!(accepted_twice.is_empty(), "records accepted more than once: {accepted_twice:?}");
        let uncertain: HashSet<(i32, u64)> = tallies.iter().flat_map(|t| t.uncertain.iter().copied()).collect();
        let missing: Vec<_> = produced
            .keys()
            .filter(|k| !accepted.contains_key(k) && !uncertain.contains(k))
            .take(10)
            .collect();
        assert!(missing.is_empty(), "records neither accepted nor in an accept cut off by the kill: {missing:?}");
        assert!(board.accepted() > accepted_at_kill, "nothing accepted after the kill");
        let rejoins: usize = tallies.iter().map(|t| t.rejoins).sum();
        let old_tokens: usize = tallies.iter().map(|t| t.old_tokens_refused).sum();
        assert!(rejoins >= WORKERS, "every worker joins the new coordinator: {rejoins} rejoins");
        assert!(old_tokens > 0, "no accept with an old token reached the new coordinator");
        let redelivered = delivered.values().filter(|n| **n > 1).count();
        eprintln!(
            "{rejoins} rejoins; {old_tokens} accepts with old tokens refused; {} accepts cut off by the kill; {redelivered} records delivered more than once",
            uncertain.len()
        );
        for t in &tallies {
            // Only acknowledgements with tokens of an earlier session may be refused.
            assert_eq!(
                t.refused.len(),
                t.refused_after_rejoin,
                "{}: refused accepts: {:?}",
                t.id,
                &t.refused[..t.refused.len().min(5)]
            );
        }
    });
}
