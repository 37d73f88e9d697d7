//! The share consumer against an in-process fake share coordinator.

use std::sync::atomic::Ordering;
use std::time::Duration;

use conveyor_proto::v1::{AcquiredRange, ErrorCode, ShareAck, ShareAckKind, SharePartitionData};
use futures::StreamExt;

use super::fake::{self, Call, Fake, batches};
use super::{Delivery, ShareConfig, ShareConsumer};
use crate::Client;
use crate::error::ClientError;

/// How long a test waits for something the consumer does at once.
const PROMPTLY: Duration = Duration::from_secs(5);

fn range(first_offset: u64, last_offset: u64, delivery_count: u32, token: u64) -> AcquiredRange {
    AcquiredRange {
        first_offset,
        last_offset,
        delivery_count,
        token,
    }
}

fn partition(partition: i32, records: u64, acquired: Vec<AcquiredRange>) -> SharePartitionData {
    SharePartitionData {
        partition,
        batches: batches(0, records, 4),
        acquired,
    }
}

async fn consumer(config: ShareConfig) -> (std::sync::Arc<Fake>, ShareConsumer) {
    let (fake, address) = fake::start().await;
    let client = Client::connect(&address).await.expect("connect");
    let consumer = client.share_consumer("g", "orders", config).await.expect("joined");
    (fake, consumer)
}

async fn take(consumer: &mut ShareConsumer, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(PROMPTLY, consumer.next())
            .await
            .expect("a delivery in time");
        out.push(next.expect("stream open").expect("a delivery"));
    }
    out
}

/// Every acknowledgement the fake received, by the call that carried it.
fn acks(fake: &Fake) -> (Vec<ShareAck>, Vec<ShareAck>) {
    let (mut piggybacked, mut acknowledged) = (Vec::new(), Vec::new());
    for call in fake.calls() {
        match call {
            Call::Fetch(f) => piggybacked.extend(f.acks),
            Call::Acknowledge(a) => acknowledged.extend(a.acks),
            Call::Join(_) => {}
        }
    }
    (piggybacked, acknowledged)
}

fn accept(partition: i32, first_offset: u64, last_offset: u64, token: u64) -> ShareAck {
    ShareAck {
        partition,
        first_offset,
        last_offset,
        token,
        kind: ShareAckKind::Accept as i32,
        ..ShareAck::default()
    }
}

#[tokio::test]
async fn only_records_inside_the_acquired_ranges_are_delivered_each_with_its_ranges_token_and_count() {
    let (fake, address) = fake::start().await;
    fake.script(vec![partition(0, 10, vec![range(2, 4, 1, 7), range(7, 7, 2, 8)])]);
    let client = Client::connect(&address).await.expect("connect");
    let mut consumer = client
        .share_consumer("g", "orders", ShareConfig::default())
        .await
        .expect("joined");
    assert_eq!(
        consumer.settings().lock_duration_ms,
        Some(30_000),
        "the session's settings"
    );
    let got: Vec<(u64, u64, u32)> = take(&mut consumer, 4)
        .await
        .iter()
        .map(|d| (d.record().offset, d.token(), d.delivery_count()))
        .collect();
    assert_eq!(got, [(2, 7, 1), (3, 7, 1), (4, 7, 1), (7, 8, 2)]);
    let more = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(more.is_err(), "nothing else was acquired: {more:?}");
    consumer.close().await.expect("closed");
}

#[tokio::test]
async fn acknowledgements_are_coalesced_into_ranges_in_one_acknowledge_call_never_on_a_fetch() {
    let config = ShareConfig::default().ack_linger(Duration::from_millis(50));
    let (fake, mut consumer) = consumer(config).await;
    fake.script(vec![partition(1, 8, vec![range(0, 5, 1, 3), range(6, 7, 1, 4)])]);
    let deliveries = take(&mut consumer, 8).await;
    let (first_six, last_two): (Vec<_>, Vec<_>) = deliveries.into_iter().partition(|d| d.record().offset < 6);
    let results = futures::future::join_all(first_six.into_iter().map(Delivery::accept));
    let results = tokio::time::timeout(PROMPTLY, results).await.expect("answered in time");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let (piggybacked, acknowledged) = acks(&fake);
    assert_eq!(acknowledged, [accept(1, 0, 5, 3)], "one range, in one call");
    assert!(
        piggybacked.is_empty(),
        "a fetch waits for the commit of what it carries: {piggybacked:?}"
    );
    drop(last_two);
    consumer.close().await.expect("closed");
}

#[tokio::test]
async fn an_unconfirmed_accept_is_queued_at_the_call_and_refused_once_the_consumer_closed() {
    let (fake, mut consumer) = consumer(ShareConfig::default()).await;
    fake.script(vec![partition(0, 3, vec![range(0, 2, 1, 7)])]);
    let mut deliveries = take(&mut consumer, 3).await.into_iter();
    let (first, second, third) = (
        deliveries.next().expect("first"),
        deliveries.next().expect("second"),
        deliveries.next().expect("third"),
    );
    // Never polled: the call itself queued them.
    drop(first.accept_unconfirmed());
    drop(second.accept_unconfirmed());
    fake.wait_for(PROMPTLY, "the accepts to go out", |f| {
        f.calls().iter().any(|c| matches!(c, Call::Acknowledge(_)))
    })
    .await;
    let (_, acknowledged) = acks(&fake);
    assert_eq!(acknowledged, [accept(0, 0, 1, 7)], "both in one range");
    consumer.close().await.expect("closed");
    let late = tokio::time::timeout(PROMPTLY, third.accept_unconfirmed())
        .await
        .expect("answered at once");
    assert!(matches!(late, Err(ClientError::Closed)), "{late:?}");
}

#[tokio::test]
async fn a_refused_acknowledgement_is_the_error_of_its_accept_and_the_others_succeed() {
    let (fake, mut consumer) = consumer(ShareConfig::default()).await;
    fake.refuse.lock().expect("lock").insert((0, 1));
    fake.script(vec![partition(
        0,
        3,
        vec![range(0, 0, 1, 1), range(1, 1, 1, 2), range(2, 2, 1, 3)],
    )]);
    let deliveries = take(&mut consumer, 3).await;
    let results = futures::future::join_all(deliveries.into_iter().map(Delivery::accept));
    let results = tokio::time::timeout(PROMPTLY, results).await.expect("answered in time");
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let refused = results[1].as_ref().expect_err("refused");
    assert_eq!(refused.code(), Some(ErrorCode::StaleDelivery));
    assert!(refused.to_string().contains("partition 0 offset 1"), "{refused}");
    consumer.close().await.expect("closed");
}

#[tokio::test]
async fn the_session_is_joined_again_after_the_coordinator_ends_its_stream() {
    let (fake, consumer) = consumer(ShareConfig::default()).await;
    assert_eq!(fake.sessions_open.load(Ordering::SeqCst), 1);
    fake.end_sessions();
    let joins = |fake: &Fake| {
        fake.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::Join(j) => Some(j),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    fake.wait_for(PROMPTLY, "a second join", |f| {
        joins(f).len() == 2 && f.sessions_open.load(Ordering::SeqCst) == 1
    })
    .await;
    let joined = joins(&fake);
    assert_eq!(fake.sessions_ended.load(Ordering::SeqCst), 1);
    assert_eq!(joined[0].member_id, joined[1].member_id, "the same member");
    assert!(joined[0].member_id.starts_with("s-"), "{}", joined[0].member_id);
    assert_eq!(joined[1].topic, "orders");
    consumer.close().await.expect("closed");
}

#[tokio::test]
async fn closing_sends_the_queued_acknowledgements_and_then_ends_the_join_stream() {
    let config = ShareConfig::default().ack_linger(Duration::from_secs(60));
    let (fake, mut consumer) = consumer(config).await;
    fake.script(vec![partition(2, 1, vec![range(0, 0, 1, 5)])]);
    let delivery = take(&mut consumer, 1).await.remove(0);
    let mut accepted = Box::pin(delivery.accept());
    // One poll queues the acknowledgement (the queue has room); it then waits for its linger.
    assert!(
        futures::poll!(accepted.as_mut()).is_pending(),
        "answered before it was sent"
    );
    let (closed, accepted) = tokio::time::timeout(PROMPTLY, async { tokio::join!(consumer.close(), accepted) })
        .await
        .expect("closed and answered in time");
    closed.expect("closed");
    assert!(matches!(accepted, Ok(())), "{accepted:?}");
    let (piggybacked, acknowledged) = acks(&fake);
    assert_eq!([piggybacked, acknowledged].concat(), [accept(2, 0, 0, 5)]);
    fake.wait_for(PROMPTLY, "the Join stream to end", |f| {
        f.sessions_ended.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(fake.sessions_open.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn closing_does_not_wait_for_a_fetch_long_polling_an_empty_group() {
    let config = ShareConfig::default().max_wait(Duration::from_secs(30));
    let (fake, mut consumer) = consumer(config).await;
    fake.full_long_polls.store(true, Ordering::SeqCst);
    fake.script(vec![partition(0, 1, vec![range(0, 0, 1, 5)])]);
    let delivery = take(&mut consumer, 1).await.remove(0);
    delivery.accept_unconfirmed().await.expect("queued");
    // The next fetch finds nothing and would wait its 30 s: closing cancels it (what it
    // might acquire goes back to the group when the session ends).
    fake.wait_for(PROMPTLY, "the next fetch", |f| {
        f.calls().iter().filter(|c| matches!(c, Call::Fetch(_))).count() >= 2
    })
    .await;
    tokio::time::timeout(PROMPTLY, consumer.close())
        .await
        .expect("closed without waiting out the long poll")
        .expect("closed");
    let (_, acknowledged) = acks(&fake);
    assert_eq!(acknowledged, [accept(0, 0, 0, 5)], "the queued accept went out first");
    fake.wait_for(PROMPTLY, "the Join stream to end", |f| {
        f.sessions_ended.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn a_join_the_coordinator_refuses_is_the_error_of_creating_the_consumer() {
    let (fake, address) = fake::start().await;
    *fake.join_refusal.lock().expect("lock") = Some(ErrorCode::InvalidRequest);
    let client = Client::connect(&address).await.expect("connect");
    let e = client
        .share_consumer("g", "orders", ShareConfig::default())
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::InvalidRequest));
    assert_eq!(fake.sessions_open.load(Ordering::SeqCst), 0);
    let joins = fake.calls().iter().filter(|c| matches!(c, Call::Join(_))).count();
    assert_eq!(joins, 1, "a refusal is not retried");
}

#[tokio::test]
async fn a_held_delivery_has_its_lock_renewed_before_it_runs_out_and_a_dropped_one_does_not() {
    let (fake, address) = fake::start().await;
    // A 600 ms lock: held locks are looked at every 100 ms, renewed with 200 ms or less left.
    fake.lock_ms.store(600, Ordering::SeqCst);
    fake.script(vec![partition(0, 2, vec![range(0, 1, 1, 9)])]);
    let client = Client::connect(&address).await.expect("connect");
    let config = ShareConfig::default().auto_renew(Some(Duration::from_secs(60)));
    let mut consumer = client.share_consumer("g", "orders", config).await.expect("joined");
    let mut deliveries = take(&mut consumer, 2).await;
    let held = deliveries.remove(0);
    drop(deliveries);
    let first_lock = held.locked_until();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let renewals = |offset: u64| {
        let (piggybacked, acknowledged) = acks(&fake);
        [piggybacked, acknowledged]
            .concat()
            .iter()
            .filter(|a| a.kind == ShareAckKind::Renew as i32 && a.first_offset <= offset && offset <= a.last_offset)
            .count()
    };
    assert!(
        renewals(0) >= 2,
        "renewed through 1.5 s of a 600 ms lock: {:?}",
        acks(&fake)
    );
    assert_eq!(renewals(1), 0, "the dropped delivery is left to run out");
    assert!(held.locked_until() > first_lock, "the lock moved");
    assert!(
        held.locked_until() > conveyor_storage::unix_millis(),
        "still locked after 1.5 s"
    );
    held.accept().await.expect("still ours");
    consumer.close().await.expect("closed");
}

#[tokio::test]
async fn a_delivery_outliving_its_dropped_consumer_is_told_closed_not_left_waiting() {
    let (fake, mut consumer) = consumer(ShareConfig::default()).await;
    fake.script(vec![partition(0, 1, vec![range(0, 0, 1, 7)])]);
    let delivery = take(&mut consumer, 1).await.remove(0);
    // Dropping the consumer aborts its background task; the acknowledgement queue closes
    // with it, so a renewal queued before or after is answered, not held forever.
    drop(consumer);
    let renewed = tokio::time::timeout(PROMPTLY, delivery.renew())
        .await
        .expect("answered, not left waiting");
    assert!(matches!(renewed, Err(ClientError::Closed)), "{renewed:?}");
    let accepted = tokio::time::timeout(PROMPTLY, delivery.accept_unconfirmed())
        .await
        .expect("answered at once");
    assert!(matches!(accepted, Err(ClientError::Closed)), "{accepted:?}");
}

#[tokio::test]
async fn dropping_the_consumer_ends_its_join_stream_too() {
    let (fake, consumer) = consumer(ShareConfig::default()).await;
    assert_eq!(fake.sessions_open.load(Ordering::SeqCst), 1);
    drop(consumer);
    fake.wait_for(PROMPTLY, "the Join stream to end", |f| {
        f.sessions_ended.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(fake.sessions_open.load(Ordering::SeqCst), 0);
}

// Single-threaded on purpose: the driver runs between two takes only at the yields.
#[tokio::test(flavor = "current_thread")]
async fn a_consumer_draining_a_full_buffer_fetches_again_only_with_room_for_half_of_it() {
    let (fake, address) = fake::start().await;
    fake.script(vec![partition(0, 8, vec![range(0, 7, 1, 1)])]);
    let client = Client::connect(&address).await.expect("connect");
    let config = ShareConfig::default().prefetch(8).max_records(8);
    let mut consumer = client.share_consumer("g", "orders", config).await.expect("joined");
    let fetches = |fake: &Fake| -> Vec<u32> {
        fake.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Fetch(f) => Some(f.max_records),
                _ => None,
            })
            .collect()
    };
    // One at a time, as a worker takes them: each take makes room for one more, and the
    // consumer's driver task (on this single-threaded runtime) runs between two takes.
    for _ in 0..4 {
        take(&mut consumer, 1).await;
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
    }
    fake.wait_for(PROMPTLY, "a second fetch", |fake| fetches(fake).len() >= 2)
        .await;
    let asked = fetches(&fake);
    assert_eq!(asked[0], 8, "the first fetch fills the empty buffer");
    assert!(
        asked[1..].iter().all(|&n| n >= 4),
        "no fetch for less than half the buffer: {asked:?}"
    );
    consumer.close().await.expect("closed");
}
