//! Consumer group members driven in-process through the Rust client's `GroupConsumer`, and
//! producers that feed them.
//!
//! - [`Member`]: consumes in its own tokio task and records every record it is handed (with
//!   when it got it) and every assignment event; the test thread reads those, asks the
//!   member for its own view ([`Snapshot`]), and stops it.
//! - [`stop_and_close`]: stops members, then closes them (commit, leave).
//! - [`SteadyProducer`]: writes one record to every partition per round until stopped.
//! - [`produce`]: writes a range of numbered records across the partitions and waits for
//!   their acknowledgements.
//!
//! # Thread-safety
//! A member's records and events sit behind a mutex its task holds only to push one entry;
//! the test thread takes it to read them.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_client::{
    AssignmentEvent, Client, ConsumerConfig, GroupConfig, GroupConsumer, ProducerConfig, ProducerRecord,
};
use futures::StreamExt;
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, mpsc, oneshot};

/// How long a member may take to stop, close, or answer the test.
pub const MEMBER_DEADLINE: Duration = Duration::from_secs(20);
/// A steady producer stops by itself after this long, whatever the test does.
pub const PRODUCE_LIMIT: Duration = Duration::from_secs(50);

/// One record a member was handed.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub partition: i32,
    pub offset: u64,
    /// When the member's task got it from the stream.
    pub at: Instant,
    pub value: Option<Bytes>,
}

/// Everything a member's task saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub records: Vec<Delivery>,
    /// With when the member's task received each.
    pub events: Vec<(Instant, AssignmentEvent)>,
    /// Errors the stream or the event channel yielded, and the stream ending.
    pub errors: Vec<String>,
}

/// A member's own view of its membership, asked of its task.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub member_id: Option<String>,
    /// Partitions of the member's topic it delivers now.
    pub assignment: BTreeSet<i32>,
    /// Next offset to hand out, per assigned partition (`None`: not started).
    pub positions: BTreeMap<i32, Option<u64>>,
}

#[derive(Debug)]
enum Ask {
    Snapshot(oneshot::Sender<Snapshot>),
    Stop,
}

/// A group member subscribed to one topic, consuming in its own task.
#[derive(Debug)]
pub struct Member {
    name: String,
    seen: Arc<Mutex<Seen>>,
    asks: mpsc::Sender<Ask>,
    task: tokio::task::JoinHandle<GroupConsumer>,
}

impl Member {
    /// Subscribes to `topic` in `group` through a client of its own on `bootstrap`, and
    /// starts consuming.
    pub fn start(rt: &Runtime, name: &str, bootstrap: &str, topic: &str, group: &str, config: GroupConfig) -> Member {
        let consumer = rt.block_on(async {
            let client = Client::connect(bootstrap).await.expect("connect");
            client
                .consumer(ConsumerConfig::default().max_wait(Duration::from_millis(100)))
                .subscribe(&[topic], group, config)
                .expect("subscribe")
        });
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (asks, asked) = mpsc::channel(4);
        let task = rt.spawn(consume(consumer, topic.to_string(), Arc::clone(&seen), asked));
        Member {
            name: name.to_string(),
            seen,
            asks,
            task,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the member saw so far.
    pub fn seen(&self) -> MutexGuard<'_, Seen> {
        lock(&self.seen)
    }

    /// The member's assignment, positions and id, as it sees them now.
    pub fn snapshot(&self, rt: &Runtime) -> Snapshot {
        rt.block_on(async {
            let (reply, answer) = oneshot::channel();
            self.asks.send(Ask::Snapshot(reply)).await.expect("member task alive");
            tokio::time::timeout(MEMBER_DEADLINE, answer)
                .await
                .expect("member answers")
                .expect("member task alive")
        })
    }

    /// Stops consuming; returns the consumer, still a member, and what it saw.
    fn stop(self, rt: &Runtime) -> (String, GroupConsumer, Seen) {
        let consumer = rt.block_on(async {
            self.asks.send(Ask::Stop).await.expect("member task alive");
            tokio::time::timeout(MEMBER_DEADLINE, self.task)
                .await
                .expect("member stops")
                .expect("member task")
        });
        let seen = std::mem::take(&mut *lock(&self.seen));
        (self.name, consumer, seen)
    }
}

fn lock(seen: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    seen.lock().expect("seen lock")
}

/// Stops every member, and only then closes them (commit, leave; each must succeed): one
/// leaving moves its partitions to the others, which is not what a test watched them for.
/// Returns what each saw.
pub fn stop_and_close(rt: &Runtime, members: Vec<Member>) -> Vec<Seen> {
    let stopped: Vec<(String, GroupConsumer, Seen)> = members.into_iter().map(|m| m.stop(rt)).collect();
    stopped
        .into_iter()
        .map(|(name, consumer, seen)| {
            rt.block_on(async { tokio::time::timeout(MEMBER_DEADLINE, consumer.close()).await })
                .unwrap_or_else(|_| panic!("{name} closes within {MEMBER_DEADLINE:?}"))
                .unwrap_or_else(|e| panic!("{name} closes: {e}"));
            seen
        })
        .collect()
}

/// A member's task: hands every record and event to `seen` until asked to stop, and then
/// gives the consumer back.
async fn consume(
    mut consumer: GroupConsumer,
    topic: String,
    seen: Arc<Mutex<Seen>>,
    mut asks: mpsc::Receiver<Ask>,
) -> GroupConsumer {
    let mut events = consumer.events();
    let mut events_open = true;
    let mut stream_open = true;
    loop {
        tokio::select! {
            ask = asks.recv() => match ask {
                Some(Ask::Snapshot(reply)) => {
                    let _ = reply.send(snapshot(&mut consumer, &topic));
                }
                Some(Ask::Stop) | None => break,
            },
            event = events.recv(), if events_open => match event {
                Ok(event) => lock(&seen).events.push((Instant::now(), event)),
                Err(e) => {
                    events_open = false;
                    lock(&seen).errors.push(format!("events: {e}"));
                }
            },
            record = consumer.next(), if stream_open => match record {
                Some(Ok(r)) => lock(&seen).records.push(Delivery {
                    partition: r.partition,
                    offset: r.offset,
                    at: Instant::now(),
                    value: r.value,
                }),
                Some(Err(e)) => lock(&seen).errors.push(format!("stream: {e}")),
                None => {
                    stream_open = false;
                    lock(&seen).errors.push("the stream ended".into());
                }
            },
        }
    }
    // Events sent before the stop are part of what the member saw.
    while events_open {
        match events.try_recv() {
            Ok(event) => lock(&seen).events.push((Instant::now(), event)),
            Err(broadcast::error::TryRecvError::Lagged(n)) => lock(&seen).errors.push(format!("events lagged {n}")),
            Err(_) => events_open = false,
        }
    }
    consumer
}

fn snapshot(consumer: &mut GroupConsumer, topic: &str) -> Snapshot {
    let assignment: BTreeSet<i32> = consumer
        .assignment()
        .iter()
        .filter(|p| p.topic == topic)
        .map(|p| p.partition)
        .collect();
    let positions = assignment.iter().map(|&p| (p, consumer.position(topic, p))).collect();
    Snapshot {
        member_id: consumer.member_id(),
        assignment,
        positions,
    }
}

/// What a steady producer wrote.
#[derive(Debug, Default)]
pub struct Produced {
    /// (partition, offset) → the round that wrote it.
    pub acked: BTreeMap<(i32, u64), u64>,
    pub failed: Vec<String>,
}

/// A task writing one record to each partition per round, its value the round's number,
/// and waiting for the round's acknowledgements before the next; until stopped or
/// [`PRODUCE_LIMIT`] passed.
#[derive(Debug)]
pub struct SteadyProducer {
    stop: Arc<AtomicBool>,
    /// Rounds begun so far.
    rounds: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Produced>,
}

impl SteadyProducer {
    pub fn start(rt: &Runtime, bootstrap: &str, topic: &str, partitions: i32) -> SteadyProducer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let client = rt.block_on(Client::connect(bootstrap)).expect("connect");
        let (s, r, topic) = (Arc::clone(&stop), Arc::clone(&rounds), topic.to_string());
        let task = rt.spawn(async move {
            let producer = client
                .producer(ProducerConfig::default().linger(Duration::from_millis(1)))
                .expect("producer");
            let started = Instant::now();
            let mut produced = Produced::default();
            while !s.load(Ordering::SeqCst) && started.elapsed() < PRODUCE_LIMIT {
                let round = r.fetch_add(1, Ordering::SeqCst);
                let mut deliveries = Vec::new();
                for p in 0..partitions {
                    let record = ProducerRecord::new(topic.as_str(), round.to_string())
                        .key(format!("key-{p}"))
                        .partition(p);
                    match producer.send(record).await {
                        Ok(d) => deliveries.push(d),
                        Err(e) => produced.failed.push(e.to_string()),
                    }
                }
                for d in deliveries {
                    match d.await {
                        Ok(m) => {
                            let offset = m.offset.expect("acks=all gives offsets");
                            produced.acked.insert((m.partition, offset), round);
                        }
                        Err(e) => produced.failed.push(e.to_string()),
                    }
                }
            }
            produced
        });
        SteadyProducer { stop, rounds, task }
    }

    /// Rounds begun so far: a round numbered this or higher begins after this call.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    pub fn stop(self, rt: &Runtime) -> Produced {
        self.stop.store(true, Ordering::SeqCst);
        rt.block_on(self.task).expect("producer task")
    }
}

/// The round a [`SteadyProducer`] wrote `d` in.
pub fn round_of(d: &Delivery) -> u64 {
    let value = d.value.as_deref().expect("a value");
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("the value is the producer's round")
}

/// Writes records numbered `indexes` to `topic`, record i keyed and to partition
/// i mod `partitions`, and returns where they were written once all are acknowledged.
pub async fn produce(client: &Client, topic: &str, indexes: Range<usize>, partitions: i32) -> BTreeSet<(i32, u64)> {
    let producer = client
        .producer(ProducerConfig::default().linger(Duration::from_millis(2)))
        .expect("producer");
    let mut deliveries = Vec::with_capacity(indexes.len());
    for i in indexes {
        let record = ProducerRecord::new(topic, format!("record {i}"))
            .key(format!("key-{i}"))
            .partition((i % partitions as usize) as i32);
        deliveries.push(producer.send(record).await.expect("send"));
    }
    producer.flush().await.expect("flush");
    let mut acked = BTreeSet::new();
    for d in deliveries {
        let m = d.await.expect("acknowledged");
        acked.insert((m.partition, m.offset.expect("acks=all gives offsets")));
    }
    acked
}

/// (partition, offset) handed out more than once over `seen`, with how many times.
pub fn duplicates<'a>(seen: impl IntoIterator<Item = &'a Seen>) -> BTreeMap<(i32, u64), usize> {
    let mut times: BTreeMap<(i32, u64), usize> = BTreeMap::new();
    for s in seen {
        for r in &s.records {
            *times.entry((r.partition, r.offset)).or_default() += 1;
        }
    }
    times.retain(|_, n| *n > 1);
    times
}

/// Every (partition, offset) handed out to any of `members` so far.
pub fn delivered_by(members: &[Member]) -> BTreeSet<(i32, u64)> {
    let mut all = BTreeSet::new();
    for m in members {
        all.extend(m.seen().records.iter().map(|r| (r.partition, r.offset)));
    }
    all
}
