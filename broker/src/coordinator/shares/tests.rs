//! Tests of share-partition windows: acquisition, acknowledgement, locks, key order,
//! delays, dead letters, and the records that rebuild them.

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Header, Record};
use proptest::prelude::*;

use super::fill::{self, DELIVER_AT_HEADER};
use super::state::{Settings, SharesState};
use super::window::{AckKind, Acquired, Limits, SlotState, Window};
use crate::coordinator::{Change, StateMachine};

const MAX_DELIVERIES: u32 = 3;
const LOCK_MS: i64 = 1_000;

/// One record to build: its key and its `conveyor-deliver-at` header.
#[derive(Debug, Clone, Copy)]
struct Spec {
    key: Option<&'static str>,
    deliver_at: Option<i64>,
}

const PLAIN: Spec = Spec {
    key: None,
    deliver_at: None,
};

fn keyed(key: &'static str) -> Spec {
    Spec {
        key: Some(key),
        ..PLAIN
    }
}

fn delayed(at: i64) -> Spec {
    Spec {
        deliver_at: Some(at),
        ..PLAIN
    }
}

/// A stored batch of `records` at `base` (stamped as the log would).
fn batch_at(base: u64, records: &[Spec]) -> Bytes {
    batch_with_value(base, records, 8)
}

/// One batch per entry of `specs`, each starting where the one before ended.
fn consecutive_batches(specs: &[Vec<Spec>]) -> Vec<Bytes> {
    let mut base = 0;
    specs
        .iter()
        .map(|records| {
            let b = batch_at(base, records);
            base += records.len() as u64;
            b
        })
        .collect()
}

fn batch_with_value(base: u64, records: &[Spec], value_len: usize) -> Bytes {
    let mut b = BatchBuilder::new(Compression::None);
    for r in records {
        b.push(&Record {
            timestamp: 1,
            key: r.key.map(|k| Bytes::from(k.as_bytes().to_vec())),
            value: Some(Bytes::from(vec![7u8; value_len])),
            headers: r
                .deliver_at
                .map(|at| Header {
                    key: Bytes::from_static(DELIVER_AT_HEADER.as_bytes()),
                    value: Some(Bytes::from(at.to_string())),
                })
                .into_iter()
                .collect(),
        });
    }
    let mut bytes = b.build().expect("batch").to_vec();
    conveyor_storage::batch::stamp(&mut bytes, base, 1, 1);
    Bytes::from(bytes)
}

/// Parses `bytes` as the fill does and pushes every batch into `w`.
fn push(w: &mut Window, bytes: &Bytes) {
    let from = w.end.expect("the window has begun");
    for (batch, records) in fill::parse("t", 0, bytes.clone(), from).expect("parses") {
        w.push(batch, &records);
    }
}

/// A window begun at 0 holding `batches` (each a list of records), laid out back to back.
fn window_of(batches: &[&[Spec]]) -> Window {
    let mut w = Window::default();
    w.begin_at(0);
    let mut base = 0;
    for records in batches {
        push(&mut w, &batch_at(base, records));
        base += records.len() as u64;
    }
    w
}

/// Hands out tokens 1, 2, 3, ...
struct Tokens(u64);

impl Tokens {
    fn next(&mut self) -> impl FnMut() -> u64 + '_ {
        || {
            self.0 += 1;
            self.0
        }
    }
}

fn acquire(w: &mut Window, tokens: &mut Tokens, member: u32, max: usize, key_order: bool, now: i64) -> Vec<Acquired> {
    let (got, exhausted) = w.acquire(
        member,
        max,
        usize::MAX,
        key_order,
        MAX_DELIVERIES,
        now,
        now + LOCK_MS,
        &mut tokens.next(),
    );
    assert!(exhausted.is_empty(), "nothing was out of deliveries: {exhausted:?}");
    got
}

fn offsets(acquired: &[Acquired]) -> Vec<u64> {
    acquired.iter().flat_map(|a| a.first..=a.last).collect()
}

fn ack(w: &mut Window, member: u32, a: &Acquired, kind: AckKind, now: i64) -> Result<Vec<u64>, String> {
    w.acknowledge(member, a.first, a.last, a.token, &kind, now, LOCK_MS, MAX_DELIVERIES)
        .map(|(changed, _)| changed)
        .map_err(|s| s.0)
}

/// Everything of every slot a member could observe.
fn view(w: &Window) -> Vec<(u64, SlotState, u32, u64, u32, i64, i64)> {
    w.slots()
        .map(|s| {
            (
                s.offset,
                s.state,
                s.deliveries,
                s.token,
                s.member,
                s.locked_until,
                s.not_before,
            )
        })
        .collect()
}

fn state_of(w: &Window, offset: u64) -> Option<SlotState> {
    w.slots().find(|s| s.offset == offset).map(|s| s.state)
}

#[test]
fn acquire_hands_each_available_record_to_one_member_in_whole_batches() {
    let four = [PLAIN; 4];
    let mut w = window_of(&[&four, &four, &four]);
    let mut tokens = Tokens(0);
    // Two asked, the batch begun is finished.
    let a = acquire(&mut w, &mut tokens, 1, 2, false, 0);
    assert_eq!(offsets(&a), vec![0, 1, 2, 3]);
    assert_eq!(a.len(), 1, "one acquisition, one token: {a:?}");
    assert_eq!((a[0].count, a[0].deliveries), (4, 1));
    // Five asked: the next batch, then the one the fifth record begins, whole.
    let b = acquire(&mut w, &mut tokens, 2, 5, false, 0);
    assert_eq!(offsets(&b), (4..12).collect::<Vec<_>>());
    assert!(
        acquire(&mut w, &mut tokens, 3, 10, false, 0).is_empty(),
        "nothing is left"
    );
    assert_ne!(a[0].token, b[0].token, "tokens differ per acquisition");
    for s in w.slots() {
        assert_eq!(s.state, SlotState::Acquired);
        assert_eq!(s.member, if s.offset < 4 { 1 } else { 2 });
        assert_eq!(s.locked_until, LOCK_MS);
    }
    // A record released in the middle goes out alone, under a new token, counted again.
    let one = Acquired {
        first: 5,
        last: 5,
        count: 1,
        ..b[0]
    };
    assert_eq!(ack(&mut w, 2, &one, AckKind::Release { delay_ms: 0 }, 0), Ok(vec![5]));
    let c = acquire(&mut w, &mut tokens, 3, 10, false, 0);
    assert_eq!(offsets(&c), vec![5]);
    assert_eq!(c[0].deliveries, 2);
    assert!(![a[0].token, b[0].token].contains(&c[0].token), "a new token: {c:?}");
}

#[test]
fn acknowledgements_accept_release_reject_and_renew() {
    let mut w = window_of(&[&[PLAIN], &[PLAIN], &[PLAIN], &[PLAIN]]);
    let mut tokens = Tokens(0);
    let got = acquire(&mut w, &mut tokens, 1, 1, false, 0);
    let got: Vec<Acquired> = got
        .into_iter()
        .chain(acquire(&mut w, &mut tokens, 1, 1, false, 0))
        .chain(acquire(&mut w, &mut tokens, 1, 1, false, 0))
        .chain(acquire(&mut w, &mut tokens, 1, 1, false, 0))
        .collect();
    assert_eq!(offsets(&got), vec![0, 1, 2, 3]);

    assert_eq!(ack(&mut w, 1, &got[0], AckKind::Accept, 10), Ok(vec![0]));
    assert_eq!(w.start, 1, "the accepted front record left the window");

    assert_eq!(
        ack(&mut w, 1, &got[1], AckKind::Release { delay_ms: 500 }, 10),
        Ok(vec![1])
    );
    assert_eq!(state_of(&w, 1), Some(SlotState::Available));
    assert!(
        acquire(&mut w, &mut tokens, 2, 10, false, 509).is_empty(),
        "released with a delay"
    );
    let again = acquire(&mut w, &mut tokens, 2, 10, false, 510);
    assert_eq!((offsets(&again), again[0].deliveries), (vec![1], 2));

    assert_eq!(
        ack(&mut w, 1, &got[2], AckKind::Reject { reason: "bad".into() }, 10),
        Ok(vec![2])
    );
    assert_eq!(w.dead_lettering(), vec![(2, "rejected: bad".to_string(), 1)]);

    let renewed = w.acknowledge(1, 3, 3, got[3].token, &AckKind::Renew, 900, LOCK_MS, MAX_DELIVERIES);
    assert_eq!(
        renewed,
        Ok((Vec::new(), 900 + LOCK_MS)),
        "a renewal changes nothing durable"
    );
    assert!(
        w.expire(LOCK_MS, MAX_DELIVERIES).is_empty(),
        "renewed past its first lock"
    );
    assert_eq!(
        ack(&mut w, 1, &got[3], AckKind::Accept, 1_500),
        Ok(vec![3]),
        "the token stays valid"
    );
}

#[test]
fn stale_foreign_and_repeated_acknowledgements_change_nothing() {
    let mut w = window_of(&[&[PLAIN; 2], &[PLAIN; 2]]);
    let mut tokens = Tokens(0);
    let a = acquire(&mut w, &mut tokens, 1, 1, false, 0)[0];
    let b = acquire(&mut w, &mut tokens, 2, 1, false, 0)[0];
    assert_eq!((a.first, a.last, b.first, b.last), (0, 1, 2, 3));
    let before = view(&w);
    let kinds = [
        AckKind::Accept,
        AckKind::Release { delay_ms: 0 },
        AckKind::Reject { reason: "x".into() },
        AckKind::Renew,
    ];
    for kind in &kinds {
        // A token never handed out.
        let wrong = Acquired { token: 999, ..a };
        assert!(ack(&mut w, 1, &wrong, kind.clone(), 5).is_err());
        // Another member's records under their right token.
        let e = ack(&mut w, 1, &b, kind.clone(), 5).expect_err("held by member 2");
        assert!(e.contains("another member"), "{e}");
        // A range reaching into another member's records: refused whole.
        assert!(
            w.acknowledge(1, 0, 3, a.token, kind, 5, LOCK_MS, MAX_DELIVERIES)
                .is_err()
        );
        // Offsets nobody holds.
        assert!(
            w.acknowledge(1, 10, 12, a.token, kind, 5, LOCK_MS, MAX_DELIVERIES)
                .is_err()
        );
        assert_eq!(view(&w), before, "{kind:?} refused and changed nothing");
    }
    assert_eq!(ack(&mut w, 1, &a, AckKind::Release { delay_ms: 0 }, 5), Ok(vec![0, 1]));
    let after_release = view(&w);
    let e = ack(&mut w, 1, &a, AckKind::Accept, 5).expect_err("released already");
    assert!(e.contains("not held"), "{e}");
    // Delivered again to member 1: the old token is refused, the new one not.
    let again = acquire(&mut w, &mut tokens, 1, 10, false, 6);
    assert_eq!(offsets(&again), vec![0, 1]);
    let held = view(&w);
    assert!(
        ack(&mut w, 1, &a, AckKind::Accept, 7).is_err(),
        "the first delivery's token"
    );
    assert_eq!(view(&w), held);
    assert_ne!(after_release, held);
    assert_eq!(ack(&mut w, 1, &again[0], AckKind::Accept, 7), Ok(vec![0, 1]));
    // Twice: refused.
    assert_eq!(w.start, 2);
    let done = view(&w);
    assert!(ack(&mut w, 1, &again[0], AckKind::Accept, 8).is_err(), "accepted twice");
    assert_eq!(ack(&mut w, 2, &b, AckKind::Accept, 8), Ok(vec![2, 3]));
    assert!(ack(&mut w, 2, &b, AckKind::Accept, 8).is_err(), "accepted twice");
    assert_ne!(done, view(&w));
}

#[test]
fn expired_locks_make_records_available_counting_deliveries_then_dead_letter() {
    let mut w = window_of(&[&[PLAIN]]);
    let mut tokens = Tokens(0);
    let mut seen_tokens = Vec::new();
    for delivery in 1..=MAX_DELIVERIES {
        let now = i64::from(delivery) * 10_000;
        let got = acquire(&mut w, &mut tokens, delivery, 10, false, now);
        assert_eq!((offsets(&got), got[0].deliveries), (vec![0], delivery));
        assert!(!seen_tokens.contains(&got[0].token));
        seen_tokens.push(got[0].token);
        assert!(w.expire(now + LOCK_MS - 1, MAX_DELIVERIES).is_empty(), "still locked");
        assert_eq!(w.expire(now + LOCK_MS, MAX_DELIVERIES), vec![0]);
        let s = w.slots().next().expect("slot");
        assert_eq!(s.deliveries, delivery, "the delivery count is kept");
        if delivery < MAX_DELIVERIES {
            assert_eq!(s.state, SlotState::Available);
        }
    }
    assert_eq!(state_of(&w, 0), Some(SlotState::DeadLettering));
    let letters = w.dead_lettering();
    assert_eq!(letters.len(), 1);
    assert_eq!((letters[0].0, letters[0].2), (0, MAX_DELIVERIES));
    assert!(letters[0].1.contains("max_delivery_count"), "{letters:?}");
    assert!(acquire(&mut w, &mut tokens, 9, 10, false, 1_000_000).is_empty());
    assert!(w.archive(0));
    assert!(!w.archive(0), "archived once");
    assert_eq!((w.start, w.slots().count()), (1, 0));
}

#[test]
fn release_member_frees_only_that_members_records() {
    let mut w = window_of(&[&[PLAIN; 2], &[PLAIN; 2], &[PLAIN; 2]]);
    let mut tokens = Tokens(0);
    let a = acquire(&mut w, &mut tokens, 1, 1, false, 0);
    let b = acquire(&mut w, &mut tokens, 2, 1, false, 0);
    let c = acquire(&mut w, &mut tokens, 1, 1, false, 0);
    assert_eq!(
        (offsets(&a), offsets(&b), offsets(&c)),
        (vec![0, 1], vec![2, 3], vec![4, 5])
    );
    assert_eq!(w.release_member(1, MAX_DELIVERIES), vec![0, 1, 4, 5]);
    for s in w.slots() {
        let (state, member) = if (2..4).contains(&s.offset) {
            (SlotState::Acquired, 2)
        } else {
            (SlotState::Available, s.member)
        };
        assert_eq!((s.state, s.member, s.deliveries), (state, member, 1), "{s:?}");
    }
    assert!(w.release_member(1, MAX_DELIVERIES).is_empty());
    let d = acquire(&mut w, &mut tokens, 3, 10, false, 0);
    assert_eq!(offsets(&d), vec![0, 1, 4, 5]);
    assert!(d.iter().all(|a| a.deliveries == 2));
}

#[test]
fn key_order_hands_out_only_the_first_unfinished_record_of_each_key() {
    // Offsets: 0 a, 1 b, 2 a, 3 c, 4 a, 5 b, 6 (no key), 7 (no key)
    let specs = [
        keyed("a"),
        keyed("b"),
        keyed("a"),
        keyed("c"),
        keyed("a"),
        keyed("b"),
        PLAIN,
        PLAIN,
    ];
    let batches: Vec<&[Spec]> = specs.iter().map(std::slice::from_ref).collect();
    let mut w = window_of(&batches);
    let mut tokens = Tokens(0);
    let first = acquire(&mut w, &mut tokens, 1, 100, true, 0);
    assert_eq!(
        offsets(&first),
        vec![0, 1, 3, 6, 7],
        "different keys in parallel, unkeyed freely"
    );
    assert!(
        acquire(&mut w, &mut tokens, 2, 100, true, 0).is_empty(),
        "a's and b's later records wait"
    );
    let of = |o: u64| *first.iter().find(|a| a.first <= o && o <= a.last).expect("acquired");
    let single = |a: Acquired, o: u64| Acquired {
        first: o,
        last: o,
        count: 1,
        ..a
    };
    // b's first record accepted: b's next one comes.
    assert_eq!(ack(&mut w, 1, &single(of(1), 1), AckKind::Accept, 1), Ok(vec![1]));
    assert_eq!(offsets(&acquire(&mut w, &mut tokens, 2, 100, true, 1)), vec![5]);
    // a's first record released: it comes again before any later record of a.
    assert_eq!(
        ack(&mut w, 1, &single(of(0), 0), AckKind::Release { delay_ms: 0 }, 1),
        Ok(vec![0])
    );
    let again = acquire(&mut w, &mut tokens, 2, 100, true, 1);
    assert_eq!((offsets(&again), again[0].deliveries), (vec![0], 2));
    // Rejected: a dead-lettering record still holds its key until archived.
    assert_eq!(
        ack(
            &mut w,
            2,
            &again[0],
            AckKind::Reject {
                reason: "poison".into()
            },
            2
        ),
        Ok(vec![0])
    );
    assert!(
        acquire(&mut w, &mut tokens, 2, 100, true, 2).is_empty(),
        "a held by its dead letter"
    );
    assert!(w.archive(0));
    assert_eq!(offsets(&acquire(&mut w, &mut tokens, 2, 100, true, 2)), vec![2]);
    // Without key order the same records go out together.
    let mut unordered = window_of(&batches);
    assert_eq!(
        offsets(&acquire(&mut unordered, &mut tokens, 1, 100, false, 0)),
        (0..8).collect::<Vec<_>>()
    );
}

#[test]
fn delayed_records_wait_without_blocking_others() {
    let at = 5_000;
    let mut w = window_of(&[&[delayed(at), PLAIN], &[PLAIN]]);
    let mut tokens = Tokens(0);
    let c = w.counts(1_000);
    assert_eq!((c.delayed, c.available), (1, 2));
    assert_eq!(w.next_due(1_000), Some(at));
    let got = acquire(&mut w, &mut tokens, 1, 100, false, 1_000);
    assert_eq!(offsets(&got), vec![1, 2], "records behind a delayed one go at once");
    assert!(acquire(&mut w, &mut tokens, 1, 100, false, at - 1).is_empty());
    assert!(!w.any_available(at - 1));
    assert!(w.any_available(at));
    let late = acquire(&mut w, &mut tokens, 1, 100, false, at);
    assert_eq!(offsets(&late), vec![0]);
    // A release's delay likewise.
    assert_eq!(
        ack(&mut w, 1, &got[0], AckKind::Release { delay_ms: 1_500 }, 2_000),
        Ok(vec![1, 2])
    );
    assert_eq!(w.counts(2_000).delayed, 2);
    assert!(acquire(&mut w, &mut tokens, 2, 100, false, 3_499).is_empty());
    assert_eq!(offsets(&acquire(&mut w, &mut tokens, 2, 100, false, 3_500)), vec![1, 2]);

    // In key order a delayed record holds back its own key only.
    let mut k = window_of(&[&[
        Spec {
            key: Some("k"),
            deliver_at: Some(at),
        },
        keyed("k"),
        keyed("j"),
    ]]);
    assert_eq!(offsets(&acquire(&mut k, &mut tokens, 1, 100, true, 1_000)), vec![2]);
    assert_eq!(offsets(&acquire(&mut k, &mut tokens, 1, 100, true, at)), vec![0]);
}

#[test]
fn has_room_counts_inflight_records_with_a_per_key_cap_and_bounds_span_and_bytes() {
    let limits = Limits {
        max_inflight: 10,
        per_key: 2,
        max_span: 100,
        max_bytes: 1 << 20,
    };
    // Unordered: ten records fill it, whatever their keys.
    let mut w = window_of(&[&[keyed("hot"); 9]]);
    assert!(w.has_room(&limits, false, 0));
    push(&mut w, &batch_at(9, &[keyed("hot")]));
    assert!(!w.has_room(&limits, false, 0));
    // Acquired records still count; accepted ones do not.
    let mut tokens = Tokens(0);
    let got = acquire(&mut w, &mut tokens, 1, 1, false, 0);
    assert!(!w.has_room(&limits, false, 0));
    let one = Acquired {
        first: 0,
        last: 0,
        count: 1,
        ..got[0]
    };
    assert_eq!(ack(&mut w, 1, &one, AckKind::Accept, 0), Ok(vec![0]));
    assert!(w.has_room(&limits, false, 0));
    // Delayed records do not count until due.
    let d = window_of(&[&[delayed(1_000); 10]]);
    assert!(d.has_room(&limits, false, 999));
    assert!(!d.has_room(&limits, false, 1_000));

    // Key order: one hot key counts per_key records only, so it cannot fill the window.
    let mut k = window_of(&[&[keyed("hot"); 50]]);
    assert!(k.has_room(&limits, true, 0));
    let others = [
        keyed("a"),
        keyed("b"),
        keyed("c"),
        keyed("d"),
        keyed("e"),
        keyed("f"),
        keyed("g"),
    ];
    push(&mut k, &batch_at(50, &others));
    assert!(k.has_room(&limits, true, 0), "2 + 7 < 10");
    push(&mut k, &batch_at(57, &[keyed("h")]));
    assert!(!k.has_room(&limits, true, 0), "2 + 8 = 10");
    // The span bounds the window even when nothing counts.
    let mut span = window_of(&[&[keyed("hot"); 99]]);
    assert!(span.has_room(&limits, true, 0));
    push(&mut span, &batch_at(99, &[keyed("hot")]));
    assert!(!span.has_room(&limits, true, 0), "100 records span the window's bound");
    // Bytes held bound it too.
    let small = Limits {
        max_bytes: 4_096,
        ..limits
    };
    let mut bytes = Window::default();
    bytes.begin_at(0);
    push(&mut bytes, &batch_with_value(0, &[PLAIN], 1_000));
    assert!(bytes.has_room(&small, false, 0));
    push(&mut bytes, &batch_with_value(1, &[PLAIN], 4_000));
    assert!(!bytes.has_room(&small, false, 0));
}

#[test]
fn records_left_behind_by_retention_leave_only_those_waiting_for_their_dead_letter_counted() {
    let limits = Limits {
        max_inflight: 2,
        per_key: 1,
        max_span: 100,
        max_bytes: 1 << 20,
    };
    let mut w = window_of(&[&[PLAIN; 4]]);
    let mut tokens = Tokens(0);
    let got = acquire(&mut w, &mut tokens, 1, 4, false, 0);
    let second = Acquired {
        first: 1,
        last: 1,
        count: 1,
        ..got[0]
    };
    let reason = AckKind::Reject { reason: "bad".into() };
    assert_eq!(ack(&mut w, 1, &second, reason, 0), Ok(vec![1]));
    assert!(
        !w.has_room(&limits, false, 0),
        "four unfinished records fill a window of two"
    );
    // The log's start moved past the window: only the record waiting for its dead letter stays.
    w.skip_to(10);
    assert!(w.counts_hold());
    assert_eq!(w.slots().map(|s| s.offset).collect::<Vec<_>>(), [1]);
    assert_eq!(w.room(&limits, false, 0), 1, "one of two in flight");
}

// ----- The durability round trip -----

mod model;
