//! Share group delivery against a real broker over the raw `Shares` protocol: locks that
//! expire and are renewed, delivery delays, dead letters, key order, members that leave,
//! and what describe reports.

use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_client::proto::*;
use conveyor_storage::batch::{BatchBuilder, Compression, Header, Record};
use conveyor_storage::unix_millis;
use conveyor_tests::share_raw::{Acquired, RawMember, ack_of};
use conveyor_tests::{BrokerProcess, cli, raw_produce, runtime};

/// How long a record may take to be delivered (again) once it should be.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(15);
/// How long a dead letter may take to be written.
const DEAD_LETTER_DEADLINE: Duration = Duration::from_secs(30);
/// Each fetch of a polling loop waits at most this long.
const FETCH_WAIT: Duration = Duration::from_millis(200);
/// A member that left: its records must come back well within the 30 s default lock.
const LEFT_MEMBER_DEADLINE: Duration = Duration::from_secs(5);

/// Header naming when a record may first be delivered.
const DELIVER_AT: &str = "conveyor-deliver-at";

fn settings(f: impl FnOnce(&mut ShareGroupSettings)) -> ShareGroupSettings {
    let mut s = ShareGroupSettings {
        auto_offset_reset: Some("earliest".into()),
        ..Default::default()
    };
    f(&mut s);
    s
}

fn create_topic(addr: &str, topic: &str, partitions: u32) {
    let out = cli(
        addr,
        &["topic", "create", topic, "--partitions", &partitions.to_string()],
        "",
    );
    assert!(out.status.success(), "{out:?}");
}

/// One record to produce: key, value and headers.
struct Rec {
    key: Option<String>,
    value: String,
    headers: Vec<(&'static str, String)>,
}

fn rec(key: Option<&str>, value: &str) -> Rec {
    Rec {
        key: key.map(str::to_string),
        value: value.to_string(),
        headers: Vec::new(),
    }
}

/// Produces `records` as one batch to partition 0 of `topic`; returns their offsets.
async fn produce(addr: &str, topic: &str, records: &[Rec]) -> (u64, u64) {
    let mut b = BatchBuilder::new(Compression::None);
    for r in records {
        b.push(&Record {
            timestamp: unix_millis(),
            key: r.key.as_ref().map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: Some(Bytes::copy_from_slice(r.value.as_bytes())),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| Header {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: Some(Bytes::from(v.clone())),
                })
                .collect(),
        });
    }
    let batch = b.build().expect("batch");
    let mut client = raw_produce::connect(addr).await;
    raw_produce::send_until_answered(
        &mut client,
        raw_produce::request(topic, Acks::All, batch),
        Duration::from_secs(30),
    )
    .await
    .expect("produced")
}

fn value_of(r: &Acquired) -> String {
    String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned()
}

/// Fetches for `m` (up to 100 records a fetch) until `done` holds for everything fetched
/// so far, or panics after `deadline`.
async fn fetch_until(
    m: &mut RawMember,
    what: &str,
    deadline: Duration,
    done: impl Fn(&[Acquired]) -> bool,
) -> Vec<Acquired> {
    fetch_until_max(m, 100, what, deadline, done).await
}

/// As [`fetch_until`], asking for at most `max` records a fetch.
async fn fetch_until_max(
    m: &mut RawMember,
    max: u32,
    what: &str,
    deadline: Duration,
    done: impl Fn(&[Acquired]) -> bool,
) -> Vec<Acquired> {
    let until = Instant::now() + deadline;
    let mut got = Vec::new();
    while !done(&got) {
        assert!(
            Instant::now() < until,
            "{what}: not within {deadline:?}; fetched {got:?}"
        );
        let (more, _) = m.fetch(max, FETCH_WAIT, Vec::new()).await.expect("fetch");
        got.extend(more);
    }
    got
}

async fn describe(m: &mut RawMember) -> ShareGroupDescription {
    m.client
        .describe_share_group(DescribeShareGroupRequest { group: m.group.clone() })
        .await
        .expect("describe")
        .into_inner()
}

/// Describes `m`'s group until `done` holds (a dead letter is written in the background).
async fn describe_until(m: &mut RawMember, done: impl Fn(&ShareGroupDescription) -> bool) -> ShareGroupDescription {
    let until = Instant::now() + DEAD_LETTER_DEADLINE;
    loop {
        let d = describe(m).await;
        if done(&d) {
            return d;
        }
        assert!(Instant::now() < until, "not within {DEAD_LETTER_DEADLINE:?}: {d:?}");
        tokio::time::sleep(conveyor_tests::POLL_INTERVAL).await;
    }
}

/// The records of `topic` (all partitions, from the start) as `conveyor consume` prints
/// them in JSON, once it exists and holds at least `n`.
fn consume_json(addr: &str, topic: &str, n: usize) -> Vec<serde_json::Value> {
    conveyor_tests::wait_for(&format!("{n} records in {topic}"), DEAD_LETTER_DEADLINE, || {
        let out = cli(addr, &["consume", topic, "--from-beginning", "--output", "json"], "");
        if !out.status.success() {
            return None;
        }
        let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON record per line"))
            .collect();
        (records.len() >= n).then_some(records)
    })
}

fn header<'a>(record: &'a serde_json::Value, key: &str) -> &'a str {
    record["headers"][key]
        .as_str()
        .unwrap_or_else(|| panic!("header {key} missing: {record}"))
}

#[test]
fn given_an_expired_lock_when_fetching_again_should_deliver_anew_and_refuse_the_old_token() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let (offset, _) = produce(&addr, "jobs", &[rec(None, "job-0")]).await;
        let lock = settings(|s| s.lock_duration_ms = Some(1_000));
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", lock)
            .await
            .expect("join a");
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let asked = Instant::now();
        let first = fetch_until(&mut a, "the first delivery", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert_eq!((first.len(), first[0].delivery_count), (1, 1), "{first:?}");
        let again = fetch_until(&mut b, "the delivery after the lock", DELIVERY_DEADLINE, |g| {
            !g.is_empty()
        })
        .await;
        assert!(
            asked.elapsed() >= Duration::from_millis(1_000),
            "delivered again after {:?}, before its lock ended",
            asked.elapsed()
        );
        assert_eq!(
            (again.len(), again[0].offset, again[0].delivery_count),
            (1, offset, 2),
            "{again:?}"
        );
        assert_ne!(again[0].token, first[0].token, "a new delivery, a new token");

        let results = a.ack(vec![ack_of(&first[0], ShareAckKind::Accept)]).await.expect("ack");
        assert_eq!(results[0].error, ErrorCode::StaleDelivery as i32, "{results:?}");
        assert!(results[0].message.contains("nothing was changed"), "{results:?}");
        let d = describe(&mut a).await;
        let p = &d.partitions[0];
        assert_eq!((p.acquired, p.acknowledged, p.start_offset), (1, 0, offset), "{d:?}");
        let held: Vec<_> = d.members.iter().map(|m| (m.member_id.as_str(), m.acquired)).collect();
        assert_eq!(held, vec![("a", 0), ("b", 1)]);

        let results = b.ack(vec![ack_of(&again[0], ShareAckKind::Accept)]).await.expect("ack");
        assert_eq!(results[0].error, 0, "{results:?}");
        assert_eq!(describe(&mut a).await.partitions[0].start_offset, offset + 1);
    });
}

#[test]
fn given_renewals_when_past_the_lock_duration_should_keep_the_record_locked() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let (offset, _) = produce(&addr, "jobs", &[rec(None, "job-0")]).await;
        let lock = settings(|s| s.lock_duration_ms = Some(1_000));
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", lock)
            .await
            .expect("join a");
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let got = fetch_until(&mut a, "the delivery", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        let delivered = Instant::now();
        let mut lock_end = 0;
        // b's fetches wait out the time between renewals (and find nothing).
        for wait in [500, 500, 600] {
            let (stolen, _) = b
                .fetch(10, Duration::from_millis(wait), Vec::new())
                .await
                .expect("fetch");
            assert!(stolen.is_empty(), "a renewed record went to another member: {stolen:?}");
            let results = a.ack(vec![ack_of(&got[0], ShareAckKind::Renew)]).await.expect("renew");
            assert_eq!(results[0].error, 0, "renewed in time: {results:?}");
            assert!(results[0].locked_until_ms > lock_end, "{results:?}");
            lock_end = results[0].locked_until_ms;
        }
        assert!(delivered.elapsed() >= Duration::from_millis(1_500));
        let results = a
            .ack(vec![ack_of(&got[0], ShareAckKind::Accept)])
            .await
            .expect("accept");
        assert_eq!(results[0].error, 0, "accepted under a renewed lock: {results:?}");
        let d = describe(&mut a).await;
        assert_eq!(d.partitions[0].start_offset, offset + 1, "{d:?}");
    });
}

#[test]
fn given_a_deliver_at_header_or_a_delayed_release_should_deliver_no_earlier_and_not_block_others() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let at = unix_millis() + 2_000;
        let mut later = rec(None, "later");
        later.headers.push((DELIVER_AT, at.to_string()));
        produce(&addr, "jobs", &[later, rec(None, "now-1"), rec(None, "now-2")]).await;
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", settings(|_| {}))
            .await
            .expect("join");
        let first = fetch_until(&mut a, "the undelayed records", DELIVERY_DEADLINE, |g| g.len() >= 2).await;
        assert!(unix_millis() < at, "the test was too slow to tell delayed from not");
        let values: Vec<String> = first.iter().map(value_of).collect();
        assert_eq!(values, vec!["now-1", "now-2"]);
        let delayed = fetch_until(&mut a, "the delayed record", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        let received = unix_millis();
        assert!(received >= at, "delivered {} ms before its time", at - received);
        assert_eq!((delayed.len(), value_of(&delayed[0])), (1, "later".to_string()));

        // Released with a delay: not before it, while records behind it go at once.
        let mut release = ack_of(&delayed[0], ShareAckKind::Release);
        release.delay_ms = 1_500;
        let released_at = unix_millis();
        let results = a.ack(vec![release]).await.expect("release");
        assert_eq!(results[0].error, 0, "{results:?}");
        let d = describe(&mut a).await;
        assert_eq!((d.partitions[0].delayed, d.partitions[0].available), (1, 0), "{d:?}");
        produce(&addr, "jobs", &[rec(None, "behind")]).await;
        let behind = fetch_until(&mut a, "the record behind", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert!(unix_millis() < released_at + 1_500, "the test was too slow to tell");
        assert_eq!(behind.iter().map(value_of).collect::<Vec<_>>(), vec!["behind"]);
        let again = fetch_until(&mut a, "the released record", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        let received = unix_millis();
        assert!(
            received >= released_at + 1_500,
            "released for 1500 ms, back after {}",
            received - released_at
        );
        assert_eq!((value_of(&again[0]), again[0].delivery_count), ("later".to_string(), 2));
    });
}

#[test]
fn given_a_rejected_record_should_write_its_dead_letter_and_archive_it() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let mut poison = rec(Some("k"), "poison");
        poison.headers.push(("trace", "t-1".into()));
        let (_, last) = produce(&addr, "jobs", &[rec(None, "fine"), poison]).await;
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", settings(|_| {}))
            .await
            .expect("join");
        let got = fetch_until(&mut a, "the records", DELIVERY_DEADLINE, |g| g.len() >= 2).await;
        let mut reject = ack_of(&got[1], ShareAckKind::Reject);
        reject.reason = "cannot parse".into();
        let results = a
            .ack(vec![ack_of(&got[0], ShareAckKind::Accept), reject])
            .await
            .expect("ack");
        assert!(results.iter().all(|r| r.error == 0), "{results:?}");

        let letters = consume_json(&addr, "jobs.workers.dlq", 1);
        assert_eq!(letters.len(), 1, "{letters:?}");
        let l = &letters[0];
        assert_eq!(
            (l["key"].as_str(), l["value"].as_str()),
            (Some("k"), Some("poison")),
            "{l}"
        );
        assert_eq!(header(l, "trace"), "t-1", "the record's own headers are kept");
        assert_eq!(header(l, "conveyor-dlq-topic"), "jobs");
        assert_eq!(header(l, "conveyor-dlq-partition"), "0");
        assert_eq!(header(l, "conveyor-dlq-offset"), last.to_string());
        assert_eq!(header(l, "conveyor-dlq-delivery-count"), "1");
        assert!(header(l, "conveyor-dlq-reason").contains("cannot parse"), "{l}");

        let d = describe_until(&mut a, |d| d.dead_letters_written == 1).await;
        let p = &d.partitions[0];
        // Archived at the front: done, so the window starts past it.
        assert_eq!((p.start_offset, p.available, p.acquired), (last + 1, 0, 0), "{d:?}");
        assert_eq!(d.partitions[0].archived, 0, "archived at the front: out of the window");
        let (more, _) = a
            .fetch(10, Duration::from_millis(300), Vec::new())
            .await
            .expect("fetch");
        assert!(more.is_empty(), "an archived record delivered again: {more:?}");
    });
}

#[test]
fn given_max_delivery_count_expiries_should_dead_letter_with_that_count() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let (offset, _) = produce(&addr, "jobs", &[rec(None, "slow")]).await;
        let s = settings(|s| {
            s.lock_duration_ms = Some(1_000);
            s.max_delivery_count = Some(2);
        });
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", s).await.expect("join");
        let mut counts = Vec::new();
        let until = Instant::now() + DEAD_LETTER_DEADLINE;
        // Fetch and never acknowledge, until the record stops coming back.
        while counts.len() < 2 {
            assert!(Instant::now() < until, "deliveries so far: {counts:?}");
            let (got, _) = a.fetch(10, FETCH_WAIT, Vec::new()).await.expect("fetch");
            counts.extend(got.iter().map(|r| r.delivery_count));
        }
        assert_eq!(counts, vec![1, 2]);
        let letters = consume_json(&addr, "jobs.workers.dlq", 1);
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert_eq!(header(&letters[0], "conveyor-dlq-delivery-count"), "2");
        assert_eq!(header(&letters[0], "conveyor-dlq-offset"), offset.to_string());
        assert!(
            header(&letters[0], "conveyor-dlq-reason").contains("max_delivery_count"),
            "{}",
            letters[0]
        );
        let (more, _) = a
            .fetch(10, Duration::from_millis(300), Vec::new())
            .await
            .expect("fetch");
        assert!(more.is_empty(), "a third delivery: {more:?}");
        let d = describe(&mut a).await;
        assert_eq!(
            (d.partitions[0].start_offset, d.dead_letters_written),
            (offset + 1, 1),
            "{d:?}"
        );
    });
}

#[test]
fn given_key_order_should_hold_a_keys_later_records_while_its_first_is_in_flight() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        // One batch per record, so a fetch of one record gets exactly one.
        for (k, v) in [("k", "k0"), ("x", "x0"), ("k", "k1"), ("y", "y0"), ("k", "k2")] {
            produce(&addr, "jobs", &[rec(Some(k), v)]).await;
        }
        let keyed = settings(|s| s.ordering = Some("key".into()));
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", keyed)
            .await
            .expect("join a");
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let k0 = fetch_until_max(&mut a, 1, "k's first record", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert_eq!(k0.iter().map(value_of).collect::<Vec<_>>(), vec!["k0"]);
        let others = fetch_until(&mut b, "the other keys", DELIVERY_DEADLINE, |g| g.len() >= 2).await;
        assert_eq!(others.iter().map(value_of).collect::<Vec<_>>(), vec!["x0", "y0"]);
        let (none, _) = b
            .fetch(10, Duration::from_millis(300), Vec::new())
            .await
            .expect("fetch");
        assert!(none.is_empty(), "k's later records while k0 is in flight: {none:?}");
        let results = a.ack(vec![ack_of(&k0[0], ShareAckKind::Accept)]).await.expect("accept");
        assert_eq!(results[0].error, 0);
        let k1 = fetch_until(&mut b, "k1", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert_eq!(
            k1.iter().map(value_of).collect::<Vec<_>>(),
            vec!["k1"],
            "k's next, in offset order"
        );
        let (none, _) = a
            .fetch(10, Duration::from_millis(300), Vec::new())
            .await
            .expect("fetch");
        assert!(none.is_empty(), "k2 while k1 is in flight: {none:?}");
        let results = b.ack(vec![ack_of(&k1[0], ShareAckKind::Accept)]).await.expect("accept");
        assert_eq!(results[0].error, 0);
        let k2 = fetch_until(&mut a, "k2", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert_eq!(k2.iter().map(value_of).collect::<Vec<_>>(), vec!["k2"]);
    });
}

#[test]
fn given_key_order_a_poison_record_holds_only_its_key_until_dead_lettered() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        for (k, v) in [("p", "p0"), ("p", "p1"), ("z", "z0")] {
            produce(&addr, "jobs", &[rec(Some(k), v)]).await;
        }
        let s = settings(|s| {
            s.ordering = Some("key".into());
            s.lock_duration_ms = Some(1_000);
            s.max_delivery_count = Some(2);
        });
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", s).await.expect("join a");
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let p0 = fetch_until_max(&mut a, 1, "p0", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        assert_eq!(p0.iter().map(value_of).collect::<Vec<_>>(), vec!["p0"]);
        // a never acknowledges p0: it expires twice and is dead-lettered. Meanwhile other
        // keys flow, and p1 comes only after p0's dead letter was written.
        let mut seen: Vec<(String, u32)> = Vec::new();
        let until = Instant::now() + DEAD_LETTER_DEADLINE;
        let mut produced_more = false;
        while !seen.iter().any(|(v, _)| v == "p1") {
            assert!(Instant::now() < until, "p1 never came: {seen:?}");
            let (got, _) = b.fetch(10, FETCH_WAIT, Vec::new()).await.expect("fetch");
            let mut acks = Vec::new();
            for r in &got {
                if value_of(r) != "p0" {
                    acks.push(ack_of(r, ShareAckKind::Accept));
                }
                seen.push((value_of(r), r.delivery_count));
            }
            if !acks.is_empty() {
                let results = b.ack(acks).await.expect("ack");
                assert!(results.iter().all(|r| r.error == 0), "{results:?}");
            }
            if !produced_more && seen.iter().any(|(v, _)| v == "p0") {
                // p0 is in its second delivery: a new key's record still goes at once.
                produce(&addr, "jobs", &[rec(Some("w"), "w0")]).await;
                produced_more = true;
            }
        }
        let order: Vec<&str> = seen.iter().map(|(v, _)| v.as_str()).collect();
        let pos = |v: &str| {
            order
                .iter()
                .position(|o| *o == v)
                .unwrap_or_else(|| panic!("{v} missing: {seen:?}"))
        };
        assert!(pos("z0") < pos("p1") && pos("p0") < pos("p1"), "{seen:?}");
        assert!(
            pos("w0") < pos("p1"),
            "a new key waited behind a poison record: {seen:?}"
        );
        assert!(seen.contains(&("p0".to_string(), 2)), "{seen:?}");
        let letters = consume_json(&addr, "jobs.workers.dlq", 1);
        assert_eq!(letters[0]["value"].as_str(), Some("p0"), "{letters:?}");
        assert_eq!(header(&letters[0], "conveyor-dlq-delivery-count"), "2");
    });
}

#[test]
fn given_a_member_whose_session_ends_should_hand_its_records_to_another_at_once() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        produce(&addr, "jobs", &[rec(None, "r0"), rec(None, "r1"), rec(None, "r2")]).await;
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", settings(|_| {}))
            .await
            .expect("join a");
        let mut b = RawMember::join(&addr, "workers", "b", "", ShareGroupSettings::default())
            .await
            .expect("join b");
        let held = fetch_until(&mut a, "the records", DELIVERY_DEADLINE, |g| g.len() >= 3).await;
        assert_eq!(held.len(), 3);
        let (none, _) = b
            .fetch(10, Duration::from_millis(200), Vec::new())
            .await
            .expect("fetch");
        assert!(none.is_empty(), "{none:?}");
        drop(a);
        let left = Instant::now();
        let got = fetch_until(&mut b, "the left member's records", LEFT_MEMBER_DEADLINE, |g| {
            g.len() >= 3
        })
        .await;
        assert!(left.elapsed() < LEFT_MEMBER_DEADLINE);
        let values: Vec<String> = got.iter().map(value_of).collect();
        assert_eq!(values, vec!["r0", "r1", "r2"]);
        assert!(got.iter().all(|r| r.delivery_count == 2), "{got:?}");
        let d = describe(&mut b).await;
        let members: Vec<&str> = d.members.iter().map(|m| m.member_id.as_str()).collect();
        assert_eq!(members, vec!["b"], "{d:?}");
    });
}

#[test]
fn given_a_known_state_describe_should_count_each_state() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        let records: Vec<Rec> = (0..10).map(|i| rec(None, &format!("r{i}"))).collect();
        let (base, last) = produce(&addr, "jobs", &records).await;
        assert_eq!(last, base + 9);
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", settings(|_| {}))
            .await
            .expect("join");
        let got = fetch_until(&mut a, "the records", DELIVERY_DEADLINE, |g| g.len() >= 10).await;
        assert_eq!(
            got.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (base..=last).collect::<Vec<_>>()
        );
        // 0, 1 accepted (done, out of the window); 2 released (available, the window's
        // start); 3 rejected (archived behind 2); 4 accepted (acknowledged behind 2);
        // 5..=9 still held.
        let acks = vec![
            ack_of(&got[0], ShareAckKind::Accept),
            ack_of(&got[1], ShareAckKind::Accept),
            ack_of(&got[2], ShareAckKind::Release),
            ack_of(&got[3], ShareAckKind::Reject),
            ack_of(&got[4], ShareAckKind::Accept),
        ];
        let results = a.ack(acks).await.expect("ack");
        assert!(results.iter().all(|r| r.error == 0), "{results:?}");
        let d = describe_until(&mut a, |d| d.dead_letters_written == 1).await;
        let p = &d.partitions[0];
        assert_eq!(p.start_offset, base + 2, "{d:?}");
        assert_eq!(
            (p.available, p.acquired, p.acknowledged, p.archived, p.delayed),
            (1, 5, 1, 1, 0),
            "{d:?}"
        );
        assert_eq!((p.log_end_offset, p.lag), (Some(last + 1), Some(8)), "{d:?}");
        assert_eq!(d.members.len(), 1);
        assert_eq!((d.members[0].member_id.as_str(), d.members[0].acquired), ("a", 5));
    });
}

#[test]
fn describe_counts_dead_letters_and_a_purge_empties_them() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    runtime().block_on(async {
        produce(&addr, "jobs", &[rec(None, "poison")]).await;
        let mut a = RawMember::join(&addr, "workers", "a", "jobs", settings(|_| {}))
            .await
            .expect("join");
        let got = fetch_until(&mut a, "the record", DELIVERY_DEADLINE, |g| !g.is_empty()).await;
        let results = a
            .ack(vec![ack_of(&got[0], ShareAckKind::Reject)])
            .await
            .expect("reject");
        assert_eq!(results[0].error, 0, "{results:?}");
        let d = describe_until(&mut a, |d| d.dead_letters_written == 1).await;
        assert_eq!(
            consume_json(&addr, "jobs.workers.dlq", 1).len(),
            1,
            "one dead letter written"
        );
        assert_eq!(d.dead_letters, Some(1), "{d:?}");
        let purged = a
            .client
            .purge_dead_letters(PurgeDeadLettersRequest {
                group: "workers".into(),
            })
            .await
            .expect("purge")
            .into_inner()
            .purged;
        assert_eq!(purged, 1);
        let d = describe_until(&mut a, |d| d.dead_letters == Some(0)).await;
        assert_eq!(d.dead_letters, Some(0), "{d:?}");
        let out = cli(&addr, &["topic", "describe", "jobs.workers.dlq"], "");
        assert!(!out.status.success(), "the dead-letter topic is gone: {out:?}");
    });
}

#[test]
fn a_purge_or_redrive_refuses_a_dead_letter_topic_the_group_did_not_create() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "jobs", 1);
    create_topic(&addr, "payments", 1);
    runtime().block_on(async {
        produce(&addr, "payments", &[rec(None, "p1"), rec(None, "p2")]).await;
        let mut a = RawMember::join(
            &addr,
            "workers",
            "a",
            "jobs",
            settings(|s| s.dead_letter_topic = Some("payments".into())),
        )
        .await
        .expect("join");
        let refused = |e: tonic::Status| {
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
            assert!(e.message().contains("did not create"), "{e:?}");
        };
        let group = || "workers".to_string();
        refused(
            a.client
                .purge_dead_letters(PurgeDeadLettersRequest { group: group() })
                .await
                .expect_err("payments is not the group's"),
        );
        refused(
            a.client
                .redrive(RedriveRequest { group: group() })
                .await
                .expect_err("payments is not the group's"),
        );
    });
    assert_eq!(consume_json(&addr, "payments", 2).len(), 2, "payments kept its records");
}

#[test]
fn a_fetch_answer_stays_within_its_max_bytes() {
    let broker = BrokerProcess::start();
    let addr = broker.addr().to_string();
    create_topic(&addr, "big", 1);
    let value = "x".repeat(200 << 10);
    runtime().block_on(async {
        for _ in 0..20 {
            produce(&addr, "big", &[rec(None, &value)]).await;
        }
        let mut a = RawMember::join(&addr, "workers", "a", "big", settings(|_| {}))
            .await
            .expect("join");
        let mut total = 0;
        let deadline = Instant::now() + DELIVERY_DEADLINE;
        while total < 20 {
            assert!(Instant::now() < deadline, "only {total} of 20 records delivered");
            let answer = a
                .client
                .fetch(ShareFetchRequest {
                    group: "workers".into(),
                    member_id: "a".into(),
                    max_records: 100,
                    max_bytes: 1 << 20,
                    max_wait_ms: 500,
                    acks: Vec::new(),
                })
                .await
                .expect("fetch")
                .into_inner();
            let bytes: usize = answer.partitions.iter().map(|p| p.batches.len()).sum();
            // Every batch here (about 200 KiB) is smaller than max_bytes.
            assert!(bytes <= 1 << 20, "an answer of {bytes} bytes");
            let got = conveyor_tests::share_raw::records_of(&answer);
            assert!(got.len() <= 5, "{} records of 200 KiB in one answer", got.len());
            total += got.len();
        }
    });
}
