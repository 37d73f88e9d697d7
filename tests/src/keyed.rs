//! Keyed writes and what a compacted topic must give back for them: the model of
//! acknowledged writes (the latest value per key, by offset), a reader that returns keys,
//! values and tombstones, and the comparison of the two. Shared by the compaction tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_client::{Client, ConsumerConfig, Producer, ProducerRecord, StartAt};

/// A write the broker acknowledged: `value` `None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    pub partition: i32,
    pub offset: u64,
    pub key: String,
    pub value: Option<String>,
}

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub partition: i32,
    pub offset: u64,
    pub key: Option<String>,
    pub value: Option<String>,
}

/// Acknowledged writes, shared between the tasks that produce.
#[derive(Debug, Clone, Default)]
pub struct Acked(Arc<Mutex<Vec<Written>>>);

impl Acked {
    pub fn push(&self, w: Written) {
        self.0.lock().expect("acked lock").push(w);
    }

    pub fn all(&self) -> Vec<Written> {
        self.0.lock().expect("acked lock").clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("acked lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The latest acknowledged write per (partition, key): what a compacted topic must keep.
    pub fn model(&self) -> BTreeMap<(i32, String), Written> {
        latest_written(&self.all())
    }
}

/// The write with the highest offset per (partition, key).
pub fn latest_written(writes: &[Written]) -> BTreeMap<(i32, String), Written> {
    let mut out: BTreeMap<(i32, String), Written> = BTreeMap::new();
    for w in writes {
        let slot = out.entry((w.partition, w.key.clone())).or_insert_with(|| w.clone());
        if w.offset >= slot.offset {
            *slot = w.clone();
        }
    }
    out
}

/// The live keys of a model: key → value, tombstoned keys left out.
pub fn live(model: &BTreeMap<(i32, String), Written>) -> BTreeMap<String, String> {
    model
        .values()
        .filter_map(|w| Some((w.key.clone(), w.value.clone()?)))
        .collect()
}

/// A record with `key` and `value` (`None`: a tombstone).
pub fn record(topic: &str, key: &str, value: Option<&str>) -> ProducerRecord {
    let mut r = ProducerRecord::new(topic, Vec::<u8>::new()).key(key.to_string());
    r.value = value.map(|v| bytes::Bytes::from(v.to_string()));
    r
}

/// Sends `writes` through `producer` and waits for every acknowledgement, which must come
/// (the caller's producer has acks=all, so each carries its offset).
pub async fn produce_all(producer: &Producer, topic: &str, writes: &[(String, Option<String>)], acked: &Acked) {
    let mut deliveries = Vec::with_capacity(writes.len());
    for (key, value) in writes {
        let delivery = producer
            .send(record(topic, key, value.as_deref()))
            .await
            .expect("queue a record");
        deliveries.push((key.clone(), value.clone(), delivery));
    }
    producer.flush().await.expect("flush");
    for (key, value, delivery) in deliveries {
        let written = tokio::time::timeout(Duration::from_secs(60), delivery)
            .await
            .expect("acknowledged in time")
            .unwrap_or_else(|e| panic!("write of key {key} failed: {e}"));
        acked.push(Written {
            partition: written.partition,
            offset: written.offset.expect("acks=all reports offsets"),
            key,
            value,
        });
    }
}

/// How long reading a topic back may take.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// Reads every partition of `topic` from its start to the high watermark it has when the
/// read starts, asking `bootstrap`, keys, values and tombstones included.
pub async fn read_keyed(bootstrap: &str, topic: &str) -> Vec<Read> {
    let client = Client::connect(bootstrap).await.expect("connect");
    let description = client.admin().describe_topic(topic).await.expect("describe");
    let ends: HashMap<(String, i32), u64> = description
        .partitions
        .iter()
        .map(|p| ((topic.to_string(), p.partition), p.high_watermark))
        .collect();
    let config = ConsumerConfig::default().max_wait(Duration::from_millis(100));
    let mut consumer = client.consumer(config);
    consumer.assign_all(topic, StartAt::Earliest).await.expect("assign");
    let mut stream = consumer.stream();
    let mut out = Vec::new();
    tokio::time::timeout(READ_DEADLINE, async {
        while let Some(r) = stream.next_until(&ends).await {
            let r = r.unwrap_or_else(|e| panic!("reading {topic} back failed: {e}"));
            if r.offset < ends[&(topic.to_string(), r.partition)] {
                out.push(of(&r));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("reading {topic} back to its high watermark took over {READ_DEADLINE:?}"));
    out
}

/// A consumed record as a [`Read`] (keys and values are UTF-8 in these tests).
pub fn of(r: &conveyor_client::ConsumerRecord) -> Read {
    let text = |b: &Option<bytes::Bytes>| {
        b.as_ref()
            .map(|b| String::from_utf8(b.to_vec()).expect("keys and values are UTF-8"))
    };
    Read {
        partition: r.partition,
        offset: r.offset,
        key: text(&r.key),
        value: text(&r.value),
    }
}

/// `conveyor consume TOPIC START... --output json` asked of `addr`, which must succeed:
/// each record printed, with its timestamp.
pub fn consume_json(addr: &str, topic: &str, start: &[&str]) -> Vec<(Read, i64)> {
    let mut args = vec!["consume", topic];
    args.extend_from_slice(start);
    args.extend_from_slice(&["--output", "json"]);
    let text = crate::stdout(&crate::cli(addr, &args, ""));
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let read = Read {
                partition: v["partition"].as_i64().expect("partition") as i32,
                offset: v["offset"].as_u64().expect("offset"),
                key: v["key"].as_str().map(str::to_string),
                value: match &v["value"] {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => panic!("value {other} in {line}"),
                },
            };
            (read, v["timestamp"].as_i64().expect("timestamp"))
        })
        .collect()
}

/// The last record read per (partition, key).
pub fn latest_read(reads: &[Read]) -> BTreeMap<(i32, String), Read> {
    let mut out = BTreeMap::new();
    for r in reads {
        let key = r
            .key
            .clone()
            .unwrap_or_else(|| panic!("a keyless record was read: {r:?}"));
        out.insert((r.partition, key), r.clone());
    }
    out
}

/// Checks what was read from a compacted topic against the model of acknowledged writes,
/// and returns every problem found (empty: all good):
/// - offsets strictly increase within each partition, and every record has a key;
/// - each live key's last record read is the model's latest write, at its offset;
/// - a deleted key is absent, or its last record read is the model's tombstone, at its offset;
/// - no key is read that was never acknowledged.
pub fn compare(model: &BTreeMap<(i32, String), Written>, reads: &[Read]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut last: HashMap<i32, u64> = HashMap::new();
    for r in reads {
        if let Some(prev) = last.insert(r.partition, r.offset)
            && r.offset <= prev
        {
            problems.push(format!(
                "partition {}: offset {} read after {prev}",
                r.partition, r.offset
            ));
        }
        if r.key.is_none() {
            problems.push(format!("keyless record read: {r:?}"));
        }
    }
    let reads: Vec<Read> = reads.iter().filter(|r| r.key.is_some()).cloned().collect();
    let got = latest_read(&reads);
    for (key, w) in model {
        match (got.get(key), &w.value) {
            (None, None) => {}
            (None, Some(v)) => problems.push(format!(
                "partition {} key {}: acknowledged value {v:?} at offset {} is missing",
                key.0, key.1, w.offset
            )),
            (Some(r), _) if r.value != w.value || r.offset != w.offset => problems.push(format!(
                "partition {} key {}: read {:?} at offset {}, the latest acknowledged write is {:?} at offset {}",
                key.0, key.1, r.value, r.offset, w.value, w.offset
            )),
            (Some(_), _) => {}
        }
    }
    for (key, r) in &got {
        if !model.contains_key(key) {
            problems.push(format!("never acknowledged: {r:?}"));
        }
    }
    problems
}

/// Records read that are not, key and value, the write acknowledged at their offset: a
/// compaction that moved, altered or invented a record.
pub fn not_as_written(acked: &[Written], reads: &[Read]) -> Vec<String> {
    let at: HashMap<(i32, u64), &Written> = acked.iter().map(|w| ((w.partition, w.offset), w)).collect();
    reads
        .iter()
        .filter(|r| {
            at.get(&(r.partition, r.offset))
                .is_none_or(|w| r.key.as_deref() != Some(w.key.as_str()) || r.value != w.value)
        })
        .map(|r| {
            format!(
                "{r:?} is not the write acknowledged there ({:?})",
                at.get(&(r.partition, r.offset))
            )
        })
        .collect()
}

/// Panics with the problems [`compare`] finds, naming `what` was read.
pub fn assert_matches_model(what: &str, acked: &Acked, reads: &[Read]) {
    let model = acked.model();
    let mut problems = compare(&model, reads);
    problems.extend(not_as_written(&acked.all(), reads));
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s) in {} records read against {} keys acknowledged:\n  {}",
        problems.len(),
        reads.len(),
        model.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n  ")
    );
}

/// A small deterministic pseudo-random sequence (xorshift64*), so that failures repeat.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(offset: u64, key: &str, value: Option<&str>) -> Written {
        Written {
            partition: 0,
            offset,
            key: key.into(),
            value: value.map(str::to_string),
        }
    }

    fn r(offset: u64, key: &str, value: Option<&str>) -> Read {
        Read {
            partition: 0,
            offset,
            key: Some(key.into()),
            value: value.map(str::to_string),
        }
    }

    #[test]
    fn reports_stale_lost_revived_moved_and_reordered_records() {
        let writes = [
            w(0, "a", Some("a0")),
            w(1, "b", Some("b0")),
            w(2, "a", Some("a1")),
            w(3, "b", None),
            w(4, "c", Some("c0")),
        ];
        let model = latest_written(&writes);
        assert_eq!(
            live(&model),
            BTreeMap::from([("a".to_string(), "a1".to_string()), ("c".to_string(), "c0".to_string())])
        );
        let compacted = [r(2, "a", Some("a1")), r(3, "b", None), r(4, "c", Some("c0"))];
        assert!(compare(&model, &compacted).is_empty());
        assert!(not_as_written(&writes, &compacted).is_empty());
        let tombstone_dropped = [r(2, "a", Some("a1")), r(4, "c", Some("c0"))];
        assert!(compare(&model, &tombstone_dropped).is_empty());
        let uncompacted: Vec<Read> = writes.iter().map(|x| r(x.offset, &x.key, x.value.as_deref())).collect();
        assert!(compare(&model, &uncompacted).is_empty());

        // The latest value of a lost; b's deleted value back; c's record moved; out of order.
        let stale = [r(0, "a", Some("a0")), r(1, "b", Some("b0")), r(4, "c", Some("c0"))];
        assert_eq!(compare(&model, &stale).len(), 2, "{:?}", compare(&model, &stale));
        let lost = [r(2, "a", Some("a1"))];
        assert_eq!(compare(&model, &lost).len(), 1);
        let moved = [r(2, "a", Some("a1")), r(5, "c", Some("c0"))];
        assert_eq!(compare(&model, &moved).len(), 1);
        assert_eq!(not_as_written(&writes, &moved).len(), 1);
        let reordered = [r(4, "c", Some("c0")), r(2, "a", Some("a1"))];
        assert_eq!(compare(&model, &reordered).len(), 1);
        let altered = [r(2, "a", Some("a2")), r(4, "c", Some("c0"))];
        assert_eq!(not_as_written(&writes, &altered).len(), 1);
        let unknown = [r(2, "a", Some("a1")), r(4, "c", Some("c0")), r(9, "z", Some("z"))];
        assert_eq!(compare(&model, &unknown).len(), 1);
    }
}
