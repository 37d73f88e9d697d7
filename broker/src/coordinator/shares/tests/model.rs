//! The window against a model: random records and operations, checking that a replay of
//! what was written rebuilds the same durable state and that no available record is skipped;
//! and a window filled with rejected records, whose bounds and snapshot the model's settings set.

use super::*;

fn settings(key_order: bool) -> Settings {
    Settings {
        topic: "t".into(),
        key_order,
        lock_ms: LOCK_MS as u32,
        max_deliveries: MAX_DELIVERIES,
        max_inflight: 100,
        earliest: true,
        dead_letter_topic: "t.g.dlq".into(),
        created_ms: 1,
        dead_letter_topic_created: false,
    }
}

/// One step of the coordinator, as the proptest drives it.
#[derive(Debug, Clone)]
enum Op {
    /// Reads the next batch into the window.
    Read,
    Acquire {
        member: u32,
        max: usize,
    },
    /// Acknowledges the `pick`th acquisition still held (mod their number).
    Ack {
        pick: usize,
        kind: u8,
        delay: i64,
    },
    /// Time passes; locks end.
    Tick {
        ms: i64,
    },
    Leave {
        member: u32,
    },
    /// The dead-letter task writes every waiting dead letter.
    Archive,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Read),
        3 => (1u32..4, 1usize..6).prop_map(|(member, max)| Op::Acquire { member, max }),
        4 => (any::<usize>(), 0u8..4, 0i64..3).prop_map(|(pick, kind, d)| Op::Ack { pick, kind, delay: d * 700 }),
        2 => (0i64..1_500).prop_map(|ms| Op::Tick { ms }),
        1 => (1u32..4).prop_map(|member| Op::Leave { member }),
        1 => Just(Op::Archive),
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop::sample::select(vec![None, Some("a"), Some("b"), Some("c")]),
        prop::option::weighted(0.15, 0i64..4_000),
    )
        .prop_map(|(key, deliver_at)| Spec { key, deliver_at })
}

/// The coordinator's state of one group and partition, with every record it wrote.
struct Model {
    state: SharesState,
    log: Vec<Change>,
    batches: Vec<Bytes>,
    now: i64,
    held: Vec<(u32, Acquired)>,
}

impl Model {
    fn new(key_order: bool) -> Model {
        let mut state = SharesState::default();
        let creation = SharesState::creation("g", &settings(key_order));
        state.apply(&creation.key, creation.value.as_deref()).expect("applies");
        let g = state.groups.get_mut("g").expect("created");
        let w = g.windows.entry(0).or_default();
        w.begin_at(0);
        let first = g.record_of("g", 0, &[]).expect("a snapshot");
        Model {
            state,
            log: vec![creation, first],
            batches: Vec::new(),
            now: 0,
            held: Vec::new(),
        }
    }

    fn window(&mut self) -> &mut Window {
        self.state
            .groups
            .get_mut("g")
            .and_then(|g| g.windows.get_mut(&0))
            .expect("window")
    }

    /// Writes the record of `changed`, as every caller of the window does.
    fn wrote(&mut self, changed: &[u64]) {
        if changed.is_empty() {
            return;
        }
        let g = self.state.groups.get_mut("g").expect("group");
        self.log.extend(g.record_of("g", 0, changed));
    }

    fn step(&mut self, op: &Op, pending: &mut std::vec::IntoIter<Bytes>, key_order: bool) {
        let now = self.now;
        match op {
            Op::Read => {
                if let Some(b) = pending.next() {
                    push(self.window(), &b);
                    self.batches.push(b);
                }
            }
            Op::Acquire { member, max } => {
                let SharesState { groups, next_token } = &mut self.state;
                let w = groups.get_mut("g").and_then(|g| g.windows.get_mut(&0)).expect("window");
                let mut next = || {
                    *next_token = next_token.wrapping_add(1).max(1);
                    *next_token
                };
                let (got, exhausted) = w.acquire(
                    *member,
                    *max,
                    usize::MAX,
                    key_order,
                    MAX_DELIVERIES,
                    now,
                    now + LOCK_MS,
                    &mut next,
                );
                self.held.extend(got.into_iter().map(|a| (*member, a)));
                self.wrote(&exhausted);
            }
            Op::Ack { pick, kind, delay } => {
                if self.held.is_empty() {
                    return;
                }
                let (member, a) = self.held[pick % self.held.len()];
                let kind = match kind {
                    0 => AckKind::Accept,
                    1 => AckKind::Release { delay_ms: *delay },
                    2 => AckKind::Reject { reason: "r".into() },
                    _ => AckKind::Renew,
                };
                let before = view(self.window());
                match self
                    .window()
                    .acknowledge(member, a.first, a.last, a.token, &kind, now, LOCK_MS, MAX_DELIVERIES)
                {
                    Ok((changed, _)) => self.wrote(&changed),
                    Err(_) => assert_eq!(view(self.window()), before, "a refused {kind:?} changed nothing"),
                }
            }
            Op::Tick { ms } => {
                self.now += ms;
                let now = self.now;
                let changed = self.window().expire(now, MAX_DELIVERIES);
                self.wrote(&changed);
            }
            Op::Leave { member } => {
                let changed = self.window().release_member(*member, MAX_DELIVERIES);
                self.wrote(&changed);
            }
            Op::Archive => {
                let waiting: Vec<u64> = self.window().dead_lettering().iter().map(|l| l.0).collect();
                let archived: Vec<u64> = waiting.into_iter().filter(|o| self.window().archive(*o)).collect();
                self.wrote(&archived);
            }
        }
        let w = self.window();
        assert!(
            w.counts_hold(),
            "the window's kept counts disagree with its slots after {op:?}"
        );
        assert_eq!(
            w.next_due(now).is_some(),
            w.slots().any(|s| s.state == SlotState::Available && s.not_before > now),
            "next_due after {op:?}"
        );
    }
}

/// A state replayed from `log`, its window filled again with `batches`.
fn replay<'a>(log: impl IntoIterator<Item = &'a Change>, batches: &[Bytes]) -> SharesState {
    let mut state = SharesState::default();
    for c in log {
        state.apply(&c.key, c.value.as_deref()).expect("replays");
    }
    let w = state
        .groups
        .get_mut("g")
        .and_then(|g| g.windows.get_mut(&0))
        .expect("window replayed");
    for b in batches {
        push(w, b);
    }
    state
}

/// The log as compaction leaves it: the last record of each key, in log order.
fn compacted(log: &[Change]) -> Vec<&Change> {
    let last: std::collections::HashMap<&Bytes, usize> = log.iter().enumerate().map(|(i, c)| (&c.key, i)).collect();
    log.iter()
        .enumerate()
        .filter(|(i, c)| last[&c.key] == *i)
        .map(|(_, c)| c)
        .collect()
}

/// Whether `replayed` holds what `live` must keep across a failover: the same start and,
/// per record, the same done, dead-lettering and delivery state, in-flight records
/// available again. Delays compare by whether they are still due after `now`.
fn check_same_durable(live: &Window, replayed: &Window, now: i64) -> Result<(), TestCaseError> {
    prop_assert_eq!(live.start, replayed.start, "start");
    prop_assert_eq!(live.end, replayed.end, "end");
    prop_assert!(
        replayed.counts_hold(),
        "the replayed window's kept counts disagree with its slots"
    );
    let due = |t: i64| if t > now { t } else { 0 };
    let theirs: Vec<_> = replayed.slots().collect();
    prop_assert_eq!(live.slots().count(), theirs.len(), "slots");
    for (l, r) in live.slots().zip(theirs) {
        prop_assert_eq!(l.offset, r.offset);
        match l.state {
            SlotState::Acquired => {
                // Not written: available again, its delivery counted only if a snapshot
                // was written since it was acquired.
                prop_assert_eq!(r.state, SlotState::Available, "offset {}", l.offset);
                prop_assert!(
                    r.deliveries == l.deliveries || r.deliveries + 1 == l.deliveries,
                    "offset {}: {} deliveries live, {} replayed",
                    l.offset,
                    l.deliveries,
                    r.deliveries
                );
            }
            state => {
                prop_assert_eq!(r.state, state, "offset {}", l.offset);
                prop_assert_eq!(r.deliveries, l.deliveries, "offset {}", l.offset);
                prop_assert_eq!(&r.reason, &l.reason, "offset {}", l.offset);
                if state == SlotState::Available {
                    prop_assert_eq!(due(r.not_before), due(l.not_before), "offset {}", l.offset);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn replayed_records_rebuild_the_durable_state(
        key_order in any::<bool>(),
        specs in prop::collection::vec(prop::collection::vec(spec(), 1..5), 1..25),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let batches = consecutive_batches(&specs);
        let mut model = Model::new(key_order);
        let mut pending = batches.into_iter();
        for op in &ops {
            model.step(op, &mut pending, key_order);
        }
        let now = model.now;
        let live = model.state.groups.get("g").and_then(|g| g.windows.get(&0)).expect("window");
        let mut replayed = replay(&model.log, &model.batches);
        let rw = replayed.groups.get_mut("g").and_then(|g| g.windows.get_mut(&0)).expect("window");
        check_same_durable(live, rw, now)?;
        prop_assert_eq!(rw.sequence, live.sequence);
        let mut after_compaction = replay(compacted(&model.log), &model.batches);
        let cw = after_compaction.groups.get_mut("g").and_then(|g| g.windows.get_mut(&0)).expect("window");
        check_same_durable(live, cw, now)?;
    }
}

// ----- Bounds a review found broken -----

/// The fill pushes a read batch by batch while the window has room (a whole 1 MiB read of
/// small records once overshot `max_inflight` by 13×), and a snapshot of a full window of
/// records being dead-lettered with 1 KiB reasons still fits one coordinator write
/// (reasons are kept to DURABLE_REASON_BYTES in the state): before, `batches_of` refused
/// it, the shard was marked lost and every reload failed again.
#[test]
fn a_full_window_of_rejected_records_stays_in_bounds_and_its_snapshot_fits_one_write() {
    use prost::Message as _;
    let limits = Limits::for_inflight(10_000);
    let mut w = Window::default();
    w.begin_at(0);
    let mut base = 0u64;
    // Reads of ~1 MiB of small stored batches, taken in by the fill's own step, until the
    // window takes no more (bounded: 200 reads are far more than it may hold).
    for _ in 0..200 {
        if !w.has_room(&limits, false, 0) {
            break;
        }
        let mut read = Vec::new();
        while read.len() < (1 << 20) {
            let b = batch_with_value(base, &[PLAIN; 100], 1);
            base += 100;
            read.extend_from_slice(&b);
        }
        let from = w.end.expect("begun");
        let mut ahead = fill::parse("t", 0, Bytes::from(read), from).expect("parses").into();
        fill::take_in(&mut w, &mut ahead, &limits, false, 0);
    }
    assert!(!w.has_room(&limits, false, 0), "the window filled up");
    let slots = w.slots().count();
    assert!(
        slots <= limits.max_inflight + 100,
        "one batch past the bound at most: {slots} slots"
    );
    let mut tokens = Tokens(0);
    let mut held = Vec::new();
    for _ in 0..=slots {
        let got = acquire(&mut w, &mut tokens, 1, 10_000, false, 0);
        if got.is_empty() {
            break;
        }
        held.extend(got);
    }
    assert!(!w.any_available(0), "everything acquired");
    for a in &held {
        for o in a.first..=a.last {
            let reason = format!("{o:>1024}");
            w.acknowledge(
                1,
                o,
                o,
                a.token,
                &AckKind::Reject { reason },
                0,
                LOCK_MS,
                MAX_DELIVERIES,
            )
            .expect("held");
        }
    }
    let snapshot = w.snapshot();
    let bytes = snapshot.encoded_len();
    assert!(
        bytes <= crate::coordinator::host::MAX_WRITE_BYTES,
        "{slots} records dead-lettering: a snapshot of {bytes} bytes, more than one write may take"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Outside key order, whenever a record is available now, a fetch gets one (the
    /// `available_from` scan hint never skips an available record).
    #[test]
    fn an_available_record_is_always_acquired(
        specs in prop::collection::vec(prop::collection::vec(spec(), 1..5), 1..25),
        ops in prop::collection::vec(op(), 1..200),
    ) {
        let batches = consecutive_batches(&specs);
        let mut model = Model::new(false);
        let mut pending = batches.into_iter();
        for op in &ops {
            model.step(op, &mut pending, false);
            let now = model.now;
            let w = model.window();
            if w.any_available(now) {
                let mut t = Tokens(1 << 40);
                let (got, exhausted) = w.acquire(99, 1, usize::MAX, false, MAX_DELIVERIES, now, now + LOCK_MS, &mut t.next());
                prop_assert!(!got.is_empty() || !exhausted.is_empty(), "an available record was skipped after {:?}", op);
                model.held.extend(got.into_iter().map(|a| (99, a)));
                model.wrote(&exhausted);
            }
        }
    }
}
