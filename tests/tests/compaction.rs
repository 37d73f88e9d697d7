//! Key-based compaction against one real broker: `cleanup.policy=compact` topics keep the
//! latest record per key, and tombstones until `delete.retention.ms` after the pass that
//! first reached them. Through the CLI (overwrites and `--null-marker` tombstones, `topic
//! compact --wait`, describe's dirty ratio and last compaction, reads from removed offsets
//! and from a time) and the client (produce and fetch while passes run); bad configs, keyless
//! records and compaction of a delete-only topic refused with nothing changed; the background
//! cleaner, `min.compaction.lag.ms`, `max.compaction.lag.ms`, one partition, and no `--wait`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use conveyor_client::proto::{ErrorCode, ReplicaCompaction};
use conveyor_client::{Client, ClientError, ConsumerConfig, ProducerConfig, StartAt};
use conveyor_storage::unix_millis;
use conveyor_tests::keyed::{Acked, Read, Rng, assert_matches_model, consume_json, produce_all, read_keyed, record};
use conveyor_tests::{BrokerProcess, cli, cli_json, poll_for, runtime, stdout};
use futures::StreamExt;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(60);

/// Small segments so that they roll (only sealed segments are compacted), and batches that
/// fit them.
const SMALL_SEGMENTS: [&str; 4] = ["--config", "segment.bytes=4096", "--config", "max.message.bytes=4096"];

/// A broker whose background cleaner is off: only `topic compact` compacts, so what a pass
/// reports does not depend on when the cleaner last looked.
fn broker_without_cleaner() -> BrokerProcess {
    BrokerProcess::start_with_config("[cleaner]\nthreads = 0\n")
}

fn create(addr: &str, topic: &str, configs: &[&str]) {
    let mut args = vec!["topic", "create", topic];
    args.extend_from_slice(&SMALL_SEGMENTS);
    for c in configs {
        args.extend_from_slice(&["--config", c]);
    }
    stdout(&cli(addr, &args, ""));
}

fn describe(addr: &str, topic: &str) -> Value {
    cli_json(addr, &["topic", "describe", topic])
}

/// `topic compact TOPIC --wait --output json`: the one replica's report.
fn compact_cli(addr: &str, topic: &str) -> Value {
    let out = cli_json(addr, &["topic", "compact", topic, "--wait"]);
    assert_eq!(out["topic"], topic, "{out}");
    let replicas = out["replicas"].as_array().expect("replicas");
    assert_eq!(replicas.len(), 1, "one replica on one broker: {out}");
    let r = replicas[0].clone();
    assert_eq!(
        (&r["partition"], &r["broker"]),
        (&Value::from(0), &Value::from(1)),
        "{out}"
    );
    assert_eq!(r["outcome"], "compacted", "{out}");
    r
}

/// `consume TOPIC --from-beginning --output json`, one record per line.
fn consume_cli(addr: &str, topic: &str) -> Vec<Read> {
    consume_json(addr, topic, &["--from-beginning"])
        .into_iter()
        .map(|(r, _)| r)
        .collect()
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} in {v}"))
}

#[test]
fn given_overwrites_and_tombstones_from_the_cli_when_compacted_should_keep_exactly_the_latest_value_per_key() {
    let broker = broker_without_cleaner();
    let addr = broker.addr();
    create(addr, "prices", &["cleanup.policy=compact"]);
    let before = describe(addr, "prices");
    assert_eq!(before["config"]["cleanup.policy"], "compact", "{before}");
    let p = &before["partitions"][0];
    assert!(
        p["dirty_ratio"].is_null() && p["last_compaction_ms"].is_null(),
        "nothing is known before a pass: {before}"
    );

    // 24 runs of the CLI, 40 lines each, over 20 keys; one line in 8 deletes its key. Some
    // keys end deleted, one comes back after a delete.
    let mut rng = Rng::new(7);
    let mut model: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut records = 0;
    for round in 0..24 {
        let mut lines: Vec<(String, Option<String>)> = (0..40)
            .map(|i| {
                let key = format!("k{:02}", rng.below(20));
                let value = (rng.below(8) != 0).then(|| format!("v{round}-{i}"));
                (key, value)
            })
            .collect();
        match round {
            22 => lines.push(("k03".into(), None)),
            23 => lines.extend([
                ("k00".into(), None),
                ("k01".into(), None),
                ("k02".into(), None),
                ("k03".into(), Some("back".into())),
            ]),
            _ => {}
        }
        let input: String = lines
            .iter()
            .map(|(k, v)| format!("{k}:{}\n", v.as_deref().unwrap_or("NULL")))
            .collect();
        let out = stdout(&cli(
            addr,
            &["produce", "prices", "--key-separator", ":", "--null-marker", "NULL"],
            &input,
        ));
        assert!(
            out.contains(&format!("{} record(s) acknowledged", lines.len())),
            "{out}"
        );
        records += lines.len();
        model.extend(lines);
    }
    // Filler under keys of its own, so that every record above sits in a sealed segment.
    let filler = "x".repeat(60);
    for run in 0..3 {
        let input: String = (0..40).map(|i| format!("fill-{run}-{i}:{filler}\n")).collect();
        stdout(&cli(addr, &["produce", "prices", "--key-separator", ":"], &input));
        records += 40;
        model.extend((0..40).map(|i| (format!("fill-{run}-{i}"), Some(filler.clone()))));
    }
    let uncompacted = consume_json(addr, "prices", &["--from-beginning"]);
    assert_eq!(uncompacted.len(), records, "every record is there before compaction");

    let started_ms = unix_millis();
    let report = compact_cli(addr, "prices");
    let finished_ms = unix_millis();
    println!("compaction: {report}");
    assert!(
        u64_of(&report, "records_after") < u64_of(&report, "records_before"),
        "{report}"
    );
    assert!(
        u64_of(&report, "bytes_after") < u64_of(&report, "bytes_before"),
        "{report}"
    );
    assert!(
        u64_of(&report, "segments_after") <= u64_of(&report, "segments_before"),
        "{report}"
    );
    assert_eq!(
        u64_of(&report, "tombstones_dropped"),
        0,
        "tombstones stay for delete.retention.ms: {report}"
    );

    let read = consume_cli(addr, "prices");
    check_latest_per_key("after the first pass", &model, &read);
    // The 20 keys were all in sealed segments: each is there exactly once, a deleted key as
    // its tombstone (kept for a day by default).
    for key in model.keys().filter(|k| k.starts_with('k')) {
        let copies: Vec<&Read> = read.iter().filter(|r| r.key.as_ref() == Some(key)).collect();
        assert_eq!(copies.len(), 1, "key {key}: {copies:?}");
        assert_eq!(copies[0].value, model[key], "key {key}");
    }
    for deleted in ["k00", "k01", "k02"] {
        assert_eq!(model[deleted], None);
    }
    assert_eq!(model["k03"].as_deref(), Some("back"));
    assert!(read.len() < records, "{} of {records} records left", read.len());
    check_positions_and_times(addr, &uncompacted, &read);

    let after = describe(addr, "prices");
    let p = &after["partitions"][0];
    let last = p["last_compaction_ms"].as_i64().unwrap_or_else(|| panic!("{after}"));
    assert!(
        (started_ms..=finished_ms).contains(&last),
        "last compaction {last} within the pass [{started_ms}, {finished_ms}]"
    );
    assert_eq!(
        p["dirty_ratio"].as_f64(),
        Some(0.0),
        "nothing written since the pass: {after}"
    );
    let text = stdout(&cli(addr, &["topic", "describe", "prices"], ""));
    assert!(
        text.contains("DIRTY RATIO") && text.contains("LAST COMPACTED") && text.contains("0.00"),
        "{text}"
    );

    // A second pass finds nothing more to remove, and changes nothing that is read.
    let again = compact_cli(addr, "prices");
    assert_eq!(
        u64_of(&again, "records_after"),
        u64_of(&again, "records_before"),
        "{again}"
    );
    assert_eq!(
        consume_cli(addr, "prices"),
        read,
        "a pass over a compacted log changes nothing"
    );
}

/// What stays keeps its offset, key, value and timestamp (the batch of a tombstone gets a
/// delete horizon as its base timestamp); a read from an offset compaction removed starts at
/// the next record kept; a read from a time starts at the first record kept at or after it.
fn check_positions_and_times(addr: &str, before: &[(Read, i64)], after: &[Read]) {
    let was: BTreeMap<u64, &(Read, i64)> = before.iter().map(|rt| (rt.0.offset, rt)).collect();
    let with_times = consume_json(addr, "prices", &["--from-beginning"]);
    let kept: Vec<&Read> = with_times.iter().map(|(r, _)| r).collect();
    assert_eq!(kept, after.iter().collect::<Vec<_>>());
    for (r, ts) in &with_times {
        let (old, old_ts) = was[&r.offset];
        assert_eq!((r, ts), (old, old_ts), "offset {} changed in compaction", r.offset);
    }
    // Segments left with no record at the start of the log are deleted: offsets there are
    // out of range, as after retention. The removed offsets still in the log are read here.
    let start = u64_of(&describe(addr, "prices")["partitions"][0], "log_start_offset");
    let removed: Vec<u64> = before
        .iter()
        .map(|(r, _)| r.offset)
        .filter(|o| *o >= start && !after.iter().any(|r| r.offset == *o))
        .collect();
    assert!(
        removed.len() > 100,
        "{} removed after the log start {start}",
        removed.len()
    );
    for &from in [removed[0], removed[removed.len() / 2], removed[removed.len() - 1]].iter() {
        let offset = from.to_string();
        let got = consume_json(addr, "prices", &["--partition", "0", "--offset", &offset]);
        let expected: Vec<&Read> = after.iter().filter(|r| r.offset > from).collect();
        let got: Vec<&Read> = got.iter().map(|(r, _)| r).collect();
        assert_eq!(got, expected, "a read from removed offset {from}");
    }
    let middle = with_times[with_times.len() / 2].1;
    let from_time = consume_json(addr, "prices", &["--from-time", &middle.to_string()]);
    let first = with_times.iter().position(|(_, ts)| *ts >= middle).expect("a record");
    assert_eq!(from_time, with_times[first..].to_vec(), "a read from time {middle}");
}

/// The last record read per key equals `model`'s value; a deleted key is absent or a
/// tombstone; no other key; offsets strictly increase.
fn check_latest_per_key(what: &str, model: &BTreeMap<String, Option<String>>, read: &[Read]) {
    for pair in read.windows(2) {
        assert!(pair[0].offset < pair[1].offset, "{what}: {pair:?}");
    }
    let mut got: BTreeMap<String, Option<String>> = BTreeMap::new();
    for r in read {
        got.insert(r.key.clone().expect("every record has a key"), r.value.clone());
    }
    for (key, value) in &got {
        let expected = model.get(key).unwrap_or_else(|| panic!("{what}: unknown key {key}"));
        assert_eq!(value, expected, "{what}: key {key}");
    }
    for (key, value) in model {
        if value.is_some() {
            assert_eq!(got.get(key), Some(value), "{what}: key {key}");
        }
    }
}

#[test]
fn given_delete_retention_elapsed_should_drop_tombstones_on_a_later_pass_and_never_bring_back_the_value() {
    let broker = broker_without_cleaner();
    let addr = broker.addr();
    create(addr, "sessions", &["cleanup.policy=compact", "delete.retention.ms=0"]);
    let rt = runtime();
    let acked = Acked::default();
    rt.block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let producer = client
            .producer(ProducerConfig::default().batch_size(1024))
            .expect("producer");
        let values: Vec<(String, Option<String>)> =
            (0..30).map(|i| (format!("s{i}"), Some(format!("open-{i}")))).collect();
        produce_all(&producer, "sessions", &values, &acked).await;
        let deletes: Vec<(String, Option<String>)> = (0..10).map(|i| (format!("s{i}"), None)).collect();
        produce_all(&producer, "sessions", &deletes, &acked).await;
        let filler: Vec<(String, Option<String>)> =
            (0..120).map(|i| (format!("fill-{i}"), Some("y".repeat(80)))).collect();
        produce_all(&producer, "sessions", &filler, &acked).await;
    });
    let nulls = |reads: &[Read]| reads.iter().filter(|r| r.value.is_none()).count();

    let first = compact_cli(addr, "sessions");
    assert_eq!(u64_of(&first, "tombstones_dropped"), 0, "{first}");
    let read = rt.block_on(read_keyed(addr, "sessions"));
    assert_matches_model("after the first pass", &acked, &read);
    assert_eq!(
        nulls(&read),
        10,
        "the first pass that reaches a tombstone keeps it: {read:?}"
    );
    assert!(read.iter().all(|r| r.key.as_deref() != Some("s0") || r.value.is_none()));

    // delete.retention.ms=0: the horizon the first pass gave them has passed.
    let second = compact_cli(addr, "sessions");
    assert_eq!(u64_of(&second, "tombstones_dropped"), 10, "{second}");
    let read = rt.block_on(read_keyed(addr, "sessions"));
    assert_matches_model("after the second pass", &acked, &read);
    assert_eq!(nulls(&read), 0, "{read:?}");
    let keys: Vec<&str> = read
        .iter()
        .filter_map(|r| r.key.as_deref())
        .filter(|k| k.starts_with('s'))
        .collect();
    let expected: Vec<String> = (10..30).map(|i| format!("s{i}")).collect();
    assert_eq!(keys, expected, "the deleted sessions are gone, the others stay");
}

/// The error of a CLI run that must fail, with nothing on standard output.
fn cli_error(addr: &str, args: &[&str], stdin: &str) -> String {
    let out = cli(addr, args, stdin);
    assert!(
        !out.status.success(),
        "conveyor {args:?} should fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn broker_code(e: &ClientError) -> tonic::Code {
    match e {
        ClientError::Broker { code, .. } => *code,
        other => panic!("expected a broker error, got {other}"),
    }
}

#[test]
fn given_bad_compaction_input_should_refuse_it_clearly_and_change_nothing() {
    let broker = broker_without_cleaner();
    let addr = broker.addr();
    let bad_creates: [(&[&str], &[&str]); 6] = [
        (&["cleanup.policy=shred"], &["cleanup.policy", "shred"]),
        (
            &["min.cleanable.dirty.ratio=1.5"],
            &["min.cleanable.dirty.ratio", "from 0 to 1"],
        ),
        (
            &["min.compaction.lag.ms=-1"],
            &["min.compaction.lag.ms", "must not be negative"],
        ),
        (
            &["delete.retention.ms=-5"],
            &["delete.retention.ms", "must not be negative"],
        ),
        (
            &["max.compaction.lag.ms=0"],
            &["max.compaction.lag.ms", "must be positive"],
        ),
        (
            &["min.compaction.lag.ms=1000", "max.compaction.lag.ms=500"],
            &["max.compaction.lag.ms", "min.compaction.lag.ms"],
        ),
    ];
    for (i, (configs, needles)) in bad_creates.iter().enumerate() {
        let name = format!("bad-{i}");
        let mut args = vec!["topic", "create", name.as_str()];
        for c in *configs {
            args.extend_from_slice(&["--config", c]);
        }
        let err = cli_error(addr, &args, "");
        for needle in *needles {
            assert!(
                err.contains(needle),
                "create with {configs:?}: {err} should name {needle}"
            );
        }
        assert!(err.contains("invalid"), "{err}");
    }
    let listed = cli_json(addr, &["topic", "list"]);
    assert_eq!(listed, Value::Array(vec![]), "no topic was created: {listed}");

    // A compacting topic refuses bad changes and keeps its config.
    create(addr, "keyed", &["cleanup.policy=compact,delete"]);
    stdout(&cli(addr, &["produce", "keyed", "--key-separator", ":"], "a:1\nb:2\n"));
    let before = describe(addr, "keyed");
    assert_eq!(before["config"]["cleanup.policy"], "compact,delete", "{before}");
    for (change, needle) in [
        ("cleanup.policy=shred", "cleanup.policy"),
        ("min.cleanable.dirty.ratio=1.5", "min.cleanable.dirty.ratio"),
        ("min.cleanable.dirty.ratio=-0.1", "min.cleanable.dirty.ratio"),
        ("delete.retention.ms=-5", "delete.retention.ms"),
        ("min.compaction.lag.ms=-1", "min.compaction.lag.ms"),
        ("max.compaction.lag.ms=0", "max.compaction.lag.ms"),
    ] {
        let err = cli_error(addr, &["topic", "alter", "keyed", "--config", change], "");
        assert!(err.contains(needle), "alter {change}: {err}");
        let now = describe(addr, "keyed");
        assert_eq!(now["config"], before["config"], "alter {change} changed the config");
    }
    // A good change goes through (so the refusals above were not of every change).
    let altered = cli_json(
        addr,
        &["topic", "alter", "keyed", "--config", "min.cleanable.dirty.ratio=0.25"],
    );
    assert_eq!(altered["config"]["min.cleanable.dirty.ratio"], "0.25", "{altered}");

    // A record without a key has no place in a compacted topic.
    let end = |d: &Value| {
        (
            u64_of(&d["partitions"][0], "high_watermark"),
            u64_of(&d["partitions"][0], "log_end_offset"),
        )
    };
    let before = end(&describe(addr, "keyed"));
    let err = cli_error(addr, &["produce", "keyed"], "no key here\nnor here\n");
    assert!(err.contains("has no key"), "{err}");
    assert!(err.contains("keyed"), "{err}");
    let err = cli_error(addr, &["produce", "keyed", "--key-separator", ":"], "no separator\n");
    assert!(err.contains("has no key"), "{err}");
    assert_eq!(end(&describe(addr, "keyed")), before, "nothing was appended");
    let rt = runtime();
    rt.block_on(async {
        let client = Client::connect(addr).await.expect("connect");
        let producer = client.producer(ProducerConfig::default()).expect("producer");
        let mut keyless = record("keyed", "k", Some("v"));
        keyless.key = None;
        let e = producer
            .send(keyless)
            .await
            .expect("queued")
            .await
            .expect_err("a keyless record");
        assert_eq!(e.code(), Some(ErrorCode::InvalidRequest), "{e}");
        assert!(e.to_string().contains("has no key"), "{e}");
    });
    assert_eq!(end(&describe(addr, "keyed")), before, "nothing was appended");
    // Keyed records still go in, tombstones included.
    stdout(&cli(
        addr,
        &["produce", "keyed", "--key-separator", ":", "--null-marker", "NULL"],
        "c:3\na:NULL\n",
    ));
    let after = end(&describe(addr, "keyed"));
    assert!(after.0 >= before.0 + 2, "{before:?} -> {after:?}");

    // Compaction of a topic that does not compact is refused, and nothing changes.
    stdout(&cli(addr, &["topic", "create", "plain"], ""));
    stdout(&cli(addr, &["produce", "plain"], "one\ntwo\nthree\n"));
    let plain_before = describe(addr, "plain");
    let err = cli_error(addr, &["topic", "compact", "plain", "--wait"], "");
    assert!(err.contains("cleanup.policy") && err.contains("not compacted"), "{err}");
    rt.block_on(async {
        let admin = Client::connect(addr).await.expect("connect").admin();
        let e = admin.compact_topic("plain", None, true).await.expect_err("delete-only");
        assert_eq!(broker_code(&e), tonic::Code::FailedPrecondition, "{e}");
        assert!(e.to_string().contains("cleanup.policy"), "{e}");
        let e = admin
            .compact_topic("nosuch", None, true)
            .await
            .expect_err("unknown topic");
        assert_eq!(broker_code(&e), tonic::Code::NotFound, "{e}");
        assert!(e.to_string().contains("nosuch"), "{e}");
        let e = admin
            .compact_topic("keyed", Some(5), true)
            .await
            .expect_err("no such partition");
        assert_eq!(broker_code(&e), tonic::Code::NotFound, "{e}");
        assert!(e.to_string().contains("no partition 5"), "{e}");
    });
    let plain_after = describe(addr, "plain");
    assert_eq!(plain_after, plain_before, "the refused compaction changed nothing");
    assert!(plain_after["partitions"][0]["last_compaction_ms"].is_null());
    let values = stdout(&cli(addr, &["consume", "plain", "--from-beginning"], ""));
    assert_eq!(values, "one\ntwo\nthree\n");
}

/// Every outcome of a `compact_topic(.., wait)` must be a pass or nothing to do; returns how
/// many passes removed records.
fn passes_that_removed(rows: &[ReplicaCompaction]) -> usize {
    for r in rows {
        assert!(
            r.outcome == "compacted" || r.outcome.starts_with("nothing to compact"),
            "{r:?}"
        );
    }
    rows.iter().filter(|r| r.records_after < r.records_before).count()
}

#[test]
fn given_produce_and_fetch_during_compaction_passes_should_keep_the_latest_acknowledged_value_per_key() {
    // The background cleaner runs too: `topic compact` then waits for its passes.
    let broker = BrokerProcess::start_with_config("[cleaner]\ncheck_interval = \"100ms\"\n");
    let addr = broker.addr().to_string();
    create(&addr, "live", &["cleanup.policy=compact"]);
    let rt = runtime();
    let acked = Acked::default();
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));

    let compactor = {
        let (addr, done) = (addr.clone(), Arc::clone(&done));
        rt.spawn(async move {
            let admin = Client::connect(&addr).await.expect("connect").admin();
            let (mut passes, mut removed) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                let rows = admin.compact_topic("live", None, true).await.expect("compact");
                removed += passes_that_removed(&rows);
                passes += 1;
            }
            (passes, removed)
        })
    };
    let reader = {
        let (addr, done, seen) = (addr.clone(), Arc::clone(&done), Arc::clone(&seen));
        rt.spawn(async move {
            let client = Client::connect(&addr).await.expect("connect");
            let mut consumer = client.consumer(ConsumerConfig::default().max_wait(Duration::from_millis(50)));
            consumer.assign("live", 0, StartAt::Earliest);
            let mut stream = consumer.stream();
            let mut reads = Vec::new();
            loop {
                match tokio::time::timeout(Duration::from_millis(200), stream.next()).await {
                    Ok(Some(r)) => {
                        let r = r.unwrap_or_else(|e| panic!("a fetch during compaction failed: {e}"));
                        seen.fetch_max(r.offset, Ordering::SeqCst);
                        reads.push(conveyor_tests::keyed::of(&r));
                    }
                    Ok(None) => panic!("the consumer's stream ended"),
                    Err(_) if done.load(Ordering::SeqCst) => return reads,
                    Err(_) => {}
                }
            }
        })
    };

    rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        let producer = client
            .producer(
                ProducerConfig::default()
                    .batch_size(1024)
                    .linger(Duration::from_millis(2)),
            )
            .expect("producer");
        assert!(ProducerConfig::default().idempotence);
        let mut rng = Rng::new(42);
        for chunk in 0..20 {
            let writes: Vec<(String, Option<String>)> = (0..200)
                .map(|i| {
                    let key = format!("key-{}", rng.below(64));
                    let value = (rng.below(6) != 0).then(|| format!("{key}@{chunk}.{i}"));
                    (key, value)
                })
                .collect();
            produce_all(&producer, "live", &writes, &acked).await;
        }
    });
    let last = acked.all().iter().map(|w| w.offset).max().expect("writes");
    let caught_up = poll_for(DEADLINE, || (seen.load(Ordering::SeqCst) >= last).then_some(()));
    done.store(true, Ordering::SeqCst);
    assert!(
        caught_up.is_some(),
        "the consumer reached {} of {last}",
        seen.load(Ordering::SeqCst)
    );
    let (passes, removed) = rt.block_on(compactor).expect("compactor");
    let live_reads = rt.block_on(reader).expect("reader");
    println!(
        "{} writes acknowledged, {passes} compact calls, {removed} removed records",
        acked.len()
    );
    assert!(removed >= 1, "no pass removed anything in {passes} calls");
    // Read while passes ran, the log still ends with each key's latest value.
    assert_matches_model("the consumer that read during compaction", &acked, &live_reads);

    let rows = rt.block_on(async {
        let admin = Client::connect(&addr).await.expect("connect").admin();
        admin.compact_topic("live", None, true).await.expect("compact")
    });
    passes_that_removed(&rows);
    let read = rt.block_on(read_keyed(&addr, "live"));
    assert_matches_model("a read from the beginning", &acked, &read);
    assert!(
        read.len() * 4 < acked.len(),
        "{} records left of {} written over 64 keys",
        read.len(),
        acked.len()
    );
}

#[test]
fn given_a_dirty_compacted_topic_the_background_cleaner_should_compact_it_unasked() {
    let broker = BrokerProcess::start_with_config("[cleaner]\ncheck_interval = \"200ms\"\n");
    let addr = broker.addr().to_string();
    create(
        &addr,
        "auto",
        &["cleanup.policy=compact", "min.cleanable.dirty.ratio=0.01"],
    );
    // The same records under cleanup.policy=delete: the size an uncompacted log has.
    create(&addr, "kept", &[]);
    let started_ms = unix_millis();
    let rt = runtime();
    let acked = Acked::default();
    let mut writes = Vec::new();
    let mut rng = Rng::new(3);
    for i in 0..1500 {
        let key = format!("sensor-{}", rng.below(20));
        writes.push((key.clone(), Some(format!("{key} reading {i}"))));
    }
    rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        let producer = client
            .producer(ProducerConfig::default().batch_size(1024))
            .expect("producer");
        produce_all(&producer, "auto", &writes, &acked).await;
        produce_all(&producer, "kept", &writes, &Acked::default()).await;
    });
    let uncompacted = u64_of(&describe(&addr, "kept")["partitions"][0], "size_bytes");
    let compacted = poll_for(DEADLINE, || {
        let d = describe(&addr, "auto");
        let p = &d["partitions"][0];
        let size = p["size_bytes"].as_u64()?;
        let last = p["last_compaction_ms"].as_i64()?;
        // Every early record was superseded: the segments left empty are deleted.
        let start = p["log_start_offset"].as_u64()?;
        (size < uncompacted / 2 && start > 0).then(|| (d.clone(), last))
    });
    let (d, last) = compacted.unwrap_or_else(|| {
        panic!(
            "the cleaner did not compact within {DEADLINE:?}: {} (uncompacted {uncompacted} bytes)",
            describe(&addr, "auto")
        )
    });
    println!("compacted unasked: {d}");
    assert!((started_ms..=unix_millis()).contains(&last), "last compaction {last}");
    let ratio = d["partitions"][0]["dirty_ratio"].as_f64().expect("dirty ratio");
    assert!((0.0..=1.0).contains(&ratio), "{ratio}");
    let passes = broker.scrape_metrics().lines().find_map(|l| {
        l.strip_prefix("conveyor_cleaner_passes_total ")?
            .trim()
            .parse::<f64>()
            .ok()
    });
    assert!(passes.is_some_and(|n| n >= 1.0), "cleaner passes: {passes:?}");
    let read = rt.block_on(read_keyed(&addr, "auto"));
    assert_matches_model("the topic the cleaner compacted", &acked, &read);
    assert!(read.len() < writes.len() / 2, "{} of {} left", read.len(), writes.len());
    // The delete-only topic was left alone.
    let kept = rt.block_on(read_keyed(&addr, "kept"));
    assert_eq!(kept.len(), writes.len());
    assert!(describe(&addr, "kept")["partitions"][0]["last_compaction_ms"].is_null());
}

/// `rounds` overwrites of `keys` keys through `producer`, acknowledged into `acked`.
async fn overwrite(producer: &conveyor_client::Producer, topic: &str, keys: usize, rounds: usize, acked: &Acked) {
    let writes: Vec<(String, Option<String>)> = (0..rounds)
        .flat_map(|round| (0..keys).map(move |k| (format!("key-{k}"), Some(format!("{k} in round {round}")))))
        .collect();
    produce_all(producer, topic, &writes, acked).await;
}

#[test]
fn given_compaction_lags_should_hold_back_young_records_and_compact_overdue_ones() {
    let broker = BrokerProcess::start_with_config("[cleaner]\ncheck_interval = \"200ms\"\n");
    let addr = broker.addr().to_string();
    // Sealed segments, but every record younger than an hour: nothing may be compacted.
    create(
        &addr,
        "young",
        &["cleanup.policy=compact", "min.compaction.lag.ms=3600000"],
    );
    // One big active segment: without max.compaction.lag.ms it would never be compacted.
    stdout(&cli(
        &addr,
        &[
            "topic",
            "create",
            "overdue",
            "--config",
            "cleanup.policy=compact",
            "--config",
            "max.compaction.lag.ms=1000",
        ],
        "",
    ));
    let rt = runtime();
    let (young, overdue) = (Acked::default(), Acked::default());
    rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        let producer = client
            .producer(ProducerConfig::default().batch_size(1024))
            .expect("producer");
        overwrite(&producer, "young", 10, 40, &young).await;
        overwrite(&producer, "overdue", 10, 40, &overdue).await;
    });

    let out = cli_json(&addr, &["topic", "compact", "young", "--wait"]);
    let row = &out["replicas"][0];
    assert!(
        row["outcome"]
            .as_str()
            .is_some_and(|o| o.starts_with("nothing to compact")),
        "{out}"
    );
    assert_eq!(
        rt.block_on(read_keyed(&addr, "young")).len(),
        400,
        "nothing was compacted"
    );
    let altered = cli_json(
        &addr,
        &["topic", "alter", "young", "--config", "min.compaction.lag.ms=0"],
    );
    assert_eq!(altered["config"]["min.compaction.lag.ms"], "0", "{altered}");
    // (The background cleaner may get there first: what the read returns is what counts.)
    compact_cli(&addr, "young");
    let read = rt.block_on(read_keyed(&addr, "young"));
    assert_matches_model("after min.compaction.lag.ms was lowered", &young, &read);
    assert!(read.len() < 400, "{}", read.len());

    // The cleaner rolls the overdue active segment and compacts it: one record per key.
    let compacted = poll_for(DEADLINE, || {
        let read = rt.block_on(read_keyed(&addr, "overdue"));
        (read.len() == 10).then_some(read)
    });
    let read = compacted.unwrap_or_else(|| panic!("not compacted: {}", describe(&addr, "overdue")));
    assert_matches_model("the overdue topic", &overdue, &read);
    assert!(describe(&addr, "overdue")["partitions"][0]["last_compaction_ms"].is_i64());
}

#[test]
fn given_one_partition_named_should_compact_only_it_and_without_wait_should_start_a_pass() {
    let broker = broker_without_cleaner();
    let addr = broker.addr().to_string();
    let mut args = vec![
        "topic",
        "create",
        "multi",
        "--partitions",
        "2",
        "--config",
        "cleanup.policy=compact",
    ];
    args.extend_from_slice(&SMALL_SEGMENTS);
    stdout(&cli(&addr, &args, ""));
    let rt = runtime();
    let acked = Acked::default();
    rt.block_on(async {
        let client = Client::connect(&addr).await.expect("connect");
        let producer = client
            .producer(ProducerConfig::default().batch_size(1024))
            .expect("producer");
        for partition in [0, 1] {
            let mut deliveries = Vec::new();
            for round in 0..60 {
                for k in 0..8 {
                    let r = record("multi", &format!("p{partition}-{k}"), Some(&format!("{round}")));
                    deliveries.push((k, round, producer.send(r.partition(partition)).await.expect("send")));
                }
            }
            for (k, round, d) in deliveries {
                let w = d.await.expect("acknowledged");
                acked.push(conveyor_tests::keyed::Written {
                    partition: w.partition,
                    offset: w.offset.expect("offset"),
                    key: format!("p{partition}-{k}"),
                    value: Some(format!("{round}")),
                });
            }
        }
    });
    let last = |d: &Value, p: usize| d["partitions"][p]["last_compaction_ms"].clone();

    let out = cli_json(&addr, &["topic", "compact", "multi", "--partition", "1", "--wait"]);
    let rows = out["replicas"].as_array().expect("replicas");
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(
        (&rows[0]["partition"], &rows[0]["outcome"]),
        (&Value::from(1), &Value::from("compacted"))
    );
    let d = describe(&addr, "multi");
    assert!(
        last(&d, 0).is_null() && last(&d, 1).is_i64(),
        "only partition 1 was compacted: {d}"
    );
    let read = rt.block_on(read_keyed(&addr, "multi"));
    assert_matches_model("both partitions", &acked, &read);
    let count = |read: &[Read], p: i32| read.iter().filter(|r| r.partition == p).count();
    assert_eq!(count(&read, 0), 480, "partition 0 is untouched");
    let compacted_1 = count(&read, 1);
    assert!(compacted_1 < 480, "{compacted_1}");

    // Without --wait the pass starts and the command returns; the pass then shows.
    let out = cli_json(&addr, &["topic", "compact", "multi", "--partition", "0"]);
    let outcome = out["replicas"][0]["outcome"].as_str().unwrap_or_default().to_string();
    assert!(
        ["started", "already compacting", "already requested"].contains(&outcome.as_str()),
        "{out}"
    );
    let table = stdout(&cli(&addr, &["topic", "compact", "multi", "--partition", "0"], ""));
    assert!(table.contains("OUTCOME"), "{table}");
    let seen = poll_for(DEADLINE, || last(&describe(&addr, "multi"), 0).as_i64());
    assert!(seen.is_some(), "the pass asked without --wait never finished");
    let read = rt.block_on(read_keyed(&addr, "multi"));
    assert_matches_model("after the pass asked without --wait", &acked, &read);
    assert!(count(&read, 0) < 480, "{}", count(&read, 0));
    assert_eq!(count(&read, 1), compacted_1, "partition 1 had nothing new to compact");
}
