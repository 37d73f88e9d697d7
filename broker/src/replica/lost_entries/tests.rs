//! The lost-entries rule in simulated groups of real replicas (logs on disk).

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_storage::batch::{BatchBuilder, Compression, Record};
use conveyor_storage::{FlushPolicy, LogConfig, PartitionLog};
use raft::eraftpb::{ConfState, HardState};
use raft::{Config, GetEntriesContext, ProgressState, Storage};

use super::super::entry::Origin;
use super::super::inbound;
use super::super::raft_state::Promise;
use super::super::ready::{ReadyHandler, on_ready};
use super::*;

/// Bounds the simulation; a healthy group needs far fewer rounds.
const MAX_ROUNDS: usize = 2_000;

struct Node {
    raw: RawNode<RaftLog>,
    lost: LostEntries,
    outbox: Vec<Message>,
}

struct Collect<'a>(&'a mut Vec<Message>);

impl ReadyHandler for Collect<'_> {
    fn send(&mut self, messages: Vec<Message>) {
        self.0.extend(messages);
    }
}

fn storage(dir: &std::path::Path) -> RaftLog {
    storage_with(dir, FlushPolicy::Os)
}

fn storage_with(dir: &std::path::Path, flush: FlushPolicy) -> RaftLog {
    RaftLog::open(Arc::new(PartitionLog::open(dir, log_config(flush)).expect("log"))).expect("raft log")
}

/// Small segments, so that a few dozen entries fill sealed ones the scrub verifies.
fn log_config(flush: FlushPolicy) -> LogConfig {
    LogConfig {
        segment_bytes: 2 * 1024,
        max_batch_bytes: 1024,
        flush,
        retention_ms: None,
        ..LogConfig::default()
    }
}

fn node(id: u64, raft: RaftLog) -> Node {
    if raft.voters().is_empty() {
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..ConfState::default()
        };
        raft.set_conf_state(&cs).expect("conf state");
    }
    let state = raft.initial_state().expect("state");
    let cfg = Config {
        id,
        election_tick: 10,
        heartbeat_tick: 3,
        applied: state.hard_state.commit,
        pre_vote: true,
        check_quorum: true,
        ..Config::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    Node {
        lost: LostEntries::new("t", 0, &raft),
        raw: RawNode::new(&cfg, raft, &logger).expect("raw node"),
        outbox: Vec::new(),
    }
}

fn batch(i: u64) -> Vec<u8> {
    let mut b = BatchBuilder::new(Compression::None);
    b.push(&Record {
        timestamp: 1,
        value: Some(Bytes::from(format!("proposal-{i}"))),
        ..Record::default()
    });
    b.build().expect("batch").to_vec()
}

/// One round: tick (through the lost-entries rule), process Readies, deliver every
/// message through the owner's inbound path.
fn round(nodes: &mut [Node], tick: bool) {
    round_without(nodes, tick, None);
}

/// As [`round`], with node `down` (an index) stopped: it neither runs nor gets messages.
fn round_without(nodes: &mut [Node], tick: bool, down: Option<usize>) {
    let mut mail: VecDeque<Message> = VecDeque::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        if Some(i) == down {
            continue;
        }
        if tick {
            n.lost.before_tick(&mut n.raw);
            n.raw.tick();
        }
        while on_ready(&mut n.raw, &mut Collect(&mut n.outbox)).expect("ready") {}
        mail.extend(n.outbox.drain(..));
    }
    while let Some(m) = mail.pop_front() {
        if Some((m.to - 1) as usize) == down {
            continue;
        }
        let n = &mut nodes[(m.to - 1) as usize];
        // Refusals (stale terms and the like) are Raft's business here as in the owner.
        let _ = inbound::step(&mut n.raw, &mut n.lost, m, false);
    }
}

fn leader(nodes: &[Node]) -> Option<usize> {
    nodes.iter().position(|n| n.raw.raft.state == StateRole::Leader)
}

#[test]
fn given_a_follower_that_lost_acknowledged_entries_it_should_not_vote_and_should_recover_from_its_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| node(id, storage(&dir.path().join(id.to_string()))))
        .collect();
    let mut rounds = 0;
    let l = loop {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no leader elected");
        if let Some(l) = leader(&nodes) {
            break l;
        }
    };
    for i in 0..40 {
        nodes[l].raw.propose(vec![], batch(i)).expect("propose");
    }
    let target = nodes[l].raw.raft.raft_log.last_index();
    while nodes.iter().any(|n| n.raw.raft.raft_log.applied < target) {
        round(&mut nodes, false);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "proposals not committed everywhere");
    }

    // Follower `f` restarts with only a prefix of what it acknowledged, and a stored
    // commit inside that prefix: only its leader's heartbeat can reveal the loss.
    let f = (l + 1) % 3;
    let f_id = f as u64 + 1;
    let kept = target - 10;
    let copy = storage(&dir.path().join("lost"));
    let prefix = nodes[l]
        .raw
        .store()
        .entries(1, kept + 1, None, GetEntriesContext::empty(false))
        .expect("prefix");
    copy.append(&prefix, Origin::Peer).expect("append prefix");
    let before = nodes[f].raw.raft.hard_state();
    copy.set_hard_state(&HardState {
        commit: kept - 5,
        ..before
    })
    .expect("hard state");
    copy.set_conf_state(&nodes[f].raw.store().conf_state())
        .expect("conf state");
    nodes[f] = node(f_id, copy);
    assert!(!nodes[f].lost.is_recovering());

    // Heartbeats only: no new proposals would otherwise send the entries again.
    let mut seen_recovering = false;
    while nodes[f].raw.raft.raft_log.committed < target {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "the follower never caught up");
        if nodes[f].lost.is_recovering() && !seen_recovering {
            seen_recovering = true;
            // A vote request from a candidate lacking what it promised goes unanswered.
            let other = (f + 1) % 3;
            let mut vote = Message::default();
            vote.set_msg_type(MessageType::MsgRequestVote);
            vote.from = other as u64 + 1;
            vote.to = f_id;
            vote.term = nodes[f].raw.raft.term + 1;
            vote.index = target - 1;
            vote.log_term = nodes[f].raw.raft.term;
            let term = nodes[f].raw.raft.term;
            let n = &mut nodes[f];
            inbound::step(&mut n.raw, &mut n.lost, vote, false).expect("step");
            let answered = n
                .raw
                .raft
                .msgs
                .iter()
                .any(|m| m.get_msg_type() == MessageType::MsgRequestVoteResponse);
            assert!(!answered, "no vote granted or refused");
            assert_eq!(nodes[f].raw.raft.term, term, "the request changed nothing");
        }
    }
    assert!(seen_recovering, "the heartbeat revealed the loss");
    assert_eq!(nodes[f].raw.raft.raft_log.last_index(), target);
    round(&mut nodes, false);
    assert!(!nodes[f].lost.is_recovering(), "caught up: it votes again");
    assert_eq!(leader(&nodes), Some(l), "no leader change on the way");
}

#[test]
fn a_dropped_snapshot_reported_by_the_transport_unpauses_its_follower() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| node(id, storage(&dir.path().join(id.to_string()))))
        .collect();
    let mut rounds = 0;
    let l = loop {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no leader elected");
        if let Some(l) = leader(&nodes) {
            break l;
        }
    };
    let f_id = ((l + 1) % 3) as u64 + 1;
    let n = &mut nodes[l];
    n.raw.raft.mut_prs().get_mut(f_id).expect("progress").become_snapshot(5);
    assert!(n.raw.raft.prs().get(f_id).expect("progress").is_paused());
    inbound::step(&mut n.raw, &mut n.lost, inbound::snapshot_dropped(f_id), false).expect("report");
    let progress = n.raw.raft.prs().get(f_id).expect("progress");
    assert_eq!(
        progress.state,
        ProgressState::Probe,
        "no longer waiting for the snapshot"
    );
    // raft-rs probes again after the follower's next heartbeat response.
    nodes[l].raw.propose(vec![], batch(0)).expect("propose");
    let last = nodes[l].raw.raft.raft_log.last_index();
    while nodes[l].raw.raft.prs().get(f_id).expect("progress").matched < last {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "the follower stayed paused");
    }
}

/// Runs rounds until every replica has stopped recovering and committed the last entry of
/// leader `l`.
fn all_catch_up_with(nodes: &mut [Node], l: usize, rounds: &mut usize) {
    let target = nodes[l].raw.raft.raft_log.last_index();
    while nodes
        .iter()
        .any(|n| n.lost.is_recovering() || n.raw.raft.raft_log.committed < target)
    {
        round(nodes, true);
        *rounds += 1;
        assert!(*rounds < MAX_ROUNDS, "the replicas never caught up");
    }
}

fn elect(nodes: &mut [Node], rounds: &mut usize) -> usize {
    loop {
        round(nodes, true);
        *rounds += 1;
        assert!(*rounds < MAX_ROUNDS, "no leader elected");
        if let Some(l) = leader(nodes) {
            return l;
        }
    }
}

/// A group of three that committed `count` proposals; returns its nodes and the leader.
fn committed_group(dir: &std::path::Path, count: u64, rounds: &mut usize) -> (Vec<Node>, usize) {
    let mut nodes: Vec<Node> = (1..=3u64)
        .map(|id| node(id, storage(&dir.join(id.to_string()))))
        .collect();
    let l = elect(&mut nodes, rounds);
    for i in 0..count {
        nodes[l].raw.propose(vec![], batch(i)).expect("propose");
    }
    let target = nodes[l].raw.raft.raft_log.last_index();
    while nodes.iter().any(|n| n.raw.raft.raft_log.applied < target) {
        round(&mut nodes, false);
        *rounds += 1;
        assert!(*rounds < MAX_ROUNDS, "proposals not committed everywhere");
    }
    (nodes, l)
}

/// The newest segment file of the log in `dir`.
fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

/// Leaves the log in `dir` as a crash with a torn last write would.
fn tear_tail(dir: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(last_segment(dir))
        .expect("open segment");
    file.write_all(&[0x5A; 64]).expect("torn bytes");
}

#[test]
fn given_a_stored_commit_past_the_log_under_flush_always_the_replica_reopens_recovering_but_not_for_a_torn_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (flush, commit, tear, expected) in [
        (FlushPolicy::Always, 2, true, None),
        (FlushPolicy::Os, 2, true, None),
        (FlushPolicy::Always, 5, false, Some(Promise { term: 2, index: 5 })),
        (FlushPolicy::Os, 5, false, None),
    ] {
        let path = dir.path().join(format!("{flush:?}-{commit}"));
        let raft = storage_with(&path, flush);
        synced_entries(&raft, 5, 1, 2, commit);
        raft.flush_state().expect("flush state");
        let end_of_3 = raft.offset_of(4).expect("entry 4");
        let at = raft.partition_log().locate(end_of_3).expect("locate").expect("batch");
        drop(raft);
        // Entries 4 and 5 are gone, synced as they were (the stored commit covers only what
        // was persisted when it was stored).
        std::fs::OpenOptions::new()
            .write(true)
            .open(conveyor_storage::file_names::segment_file(
                &path,
                at.segment_base_offset,
                "log",
            ))
            .expect("open")
            .set_len(at.position)
            .expect("cut");
        if tear {
            tear_tail(&path);
        }
        let raft = storage_with(&path, flush);
        assert_eq!(raft.recovering(), expected, "{flush:?}, commit {commit}");
        assert_eq!(
            LostEntries::new("t", 0, &raft).is_recovering(),
            expected.is_some(),
            "{flush:?}"
        );
        drop(raft);
        let raft = storage_with(&path, flush);
        assert_eq!(raft.recovering(), expected, "{flush:?}: remembered across a restart");
    }
}

/// Entries `1..=last` of `term` appended and synced, then `commit` stored with term
/// `stored_term` (vote 1): a replica's durable state after acknowledging them.
fn synced_entries(raft: &RaftLog, last: u64, term: u64, stored_term: u64, commit: u64) {
    raft.append(&(1..=last).map(|i| entry_at(i, term)).collect::<Vec<_>>(), Origin::Peer)
        .expect("append");
    raft.persist().expect("persist");
    raft.set_hard_state(&HardState {
        term: stored_term,
        vote: 1,
        commit,
        ..HardState::default()
    })
    .expect("hard state");
}

fn entry_at(index: u64, term: u64) -> raft::eraftpb::Entry {
    raft::eraftpb::Entry {
        index,
        term,
        data: Bytes::from(batch(index)),
        ..raft::eraftpb::Entry::default()
    }
}

#[test]
fn a_recovering_replica_stops_recovering_durably_once_its_own_log_reaches_its_promise() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (mut nodes, l) = committed_group(dir.path(), 20, &mut rounds);
    let f = (l + 1) % 3;
    let f_dir = dir.path().join((f + 1).to_string());
    let last = nodes[f].raw.store().last_entry();
    // What `RaftLog::open` records after a loss: a promise past the log.
    let promise = Promise {
        term: last.term,
        index: last.index + 3,
    };
    nodes[f].raw.store().set_recovering(Some(promise)).expect("record");
    nodes[f].raw.store().flush_state().expect("flush state");
    drop(nodes.remove(f));
    let reopened = storage(&f_dir);
    assert_eq!(reopened.recovering(), Some(promise));
    nodes.insert(f, node(f as u64 + 1, reopened));
    assert!(nodes[f].lost.is_recovering());
    for i in 0..2 {
        nodes[l].raw.propose(vec![], batch(100 + i)).expect("propose");
    }
    let short = nodes[l].raw.raft.raft_log.last_index();
    while nodes[f].raw.store().last_index().expect("last") < short {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "the replica never caught up");
    }
    round(&mut nodes, false);
    assert!(nodes[f].lost.is_recovering(), "one entry short of its promise");
    nodes[l].raw.propose(vec![], batch(102)).expect("propose");
    while nodes[f].lost.is_recovering() {
        round(&mut nodes, true);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "the replica never stopped recovering");
    }
    assert_eq!(nodes[f].raw.store().recovering(), None, "cleared in the stored state");
    assert_eq!(leader(&nodes), Some(l), "no leader change on the way");
    drop(nodes);
    assert_eq!(storage(&f_dir).recovering(), None, "cleared on disk");
}

#[test]
fn a_group_whose_replicas_all_reopen_recovering_elects_no_leader_lacking_a_committed_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (nodes, l) = committed_group(&dir.path().join("group"), 40, &mut rounds);
    let source = nodes[l].raw.store().clone();
    let last = nodes[l].raw.raft.raft_log.last_index();
    let term = nodes[l].raw.raft.term;
    assert_eq!(nodes[l].raw.raft.raft_log.committed, last);
    let committed_terms = terms(&source, last);
    let hs = HardState {
        term,
        vote: 1,
        commit: last - 15,
        ..HardState::default()
    };
    // Every replica lost a different part of its tail to damage: each promises what it held
    // before (replica 3 lagged a little), and none holds its own promise now, though
    // replica 1 holds the others'.
    let held = [last, last, last - 3];
    let kept = [last - 2, last - 10, last - 12];
    let mut reopened = Vec::new();
    for i in 0..3 {
        let path = dir.path().join(format!("r{i}"));
        let copy = replica_copy(&path, &source, kept[i], hs.clone(), FlushPolicy::Os);
        copy.set_recovering(Some(Promise { term, index: held[i] }))
            .expect("recovering");
        reopened.push(copy);
    }
    drop(nodes);
    let mut nodes: Vec<Node> = reopened
        .into_iter()
        .enumerate()
        .map(|(i, raft)| node(i as u64 + 1, raft))
        .collect();
    assert!(nodes.iter().all(|n| n.lost.is_recovering()));
    // Electing any of them would lose committed entries: none is elected.
    for _ in 0..300 {
        round(&mut nodes, true);
        assert_eq!(leader(&nodes), None, "a leader lacking committed entries was elected");
    }
    for (n, &keep) in nodes.iter().zip(&kept) {
        assert_eq!(n.raw.store().last_index().expect("last"), keep, "nothing truncated");
    }
    // What an operator can do: bring back a replica that holds what it promised (here
    // replica 1 restored whole); it is elected and the others catch up from it.
    let restored = replica_copy(&dir.path().join("restored"), &source, last, hs, FlushPolicy::Os);
    drop(source);
    nodes[0] = node(1, restored);
    assert!(!nodes[0].lost.is_recovering());
    let l = elect(&mut nodes, &mut rounds);
    assert_eq!(l, 0, "only the restored replica holds every committed entry");
    all_catch_up_with(&mut nodes, l, &mut rounds);
    for n in &nodes {
        assert_eq!(terms(n.raw.store(), last), committed_terms, "no committed entry lost");
    }
}

#[test]
fn a_snapshot_lost_without_a_report_resumes_its_follower_after_a_few_election_timeouts() {
    use super::super::stalled_snapshots::{STALL_ELECTION_TIMEOUTS, StalledSnapshots};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (mut nodes, l) = committed_group(dir.path(), 5, &mut rounds);
    let f_id = ((l + 1) % 3) as u64 + 1;
    // The snapshot went out and was lost at the receiver: nobody reports it.
    nodes[l]
        .raw
        .raft
        .mut_prs()
        .get_mut(f_id)
        .expect("progress")
        .become_snapshot(5);
    let mut stalled = StalledSnapshots::default();
    let limit = STALL_ELECTION_TIMEOUTS * nodes[l].raw.raft.election_timeout();
    for tick in 1..=limit {
        round(&mut nodes, true);
        let reported = stalled.on_tick(&mut nodes[l].raw);
        let state = nodes[l].raw.raft.prs().get(f_id).expect("progress").state;
        if tick < limit {
            assert!(reported.is_empty(), "reported too early, at tick {tick}");
            assert_eq!(state, ProgressState::Snapshot, "heartbeats do not resume it");
        } else {
            assert_eq!(reported, vec![f_id]);
            assert_eq!(state, ProgressState::Probe, "no longer waiting for the snapshot");
        }
    }
    nodes[l].raw.propose(vec![], batch(99)).expect("propose");
    let last = nodes[l].raw.raft.raft_log.last_index();
    while nodes[l].raw.raft.prs().get(f_id).expect("progress").matched < last {
        round(&mut nodes, true);
        stalled.on_tick(&mut nodes[l].raw);
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "the follower stayed paused");
    }
}

#[test]
fn a_rejection_of_an_index_the_leader_never_sent_panics_no_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (mut nodes, l) = committed_group(dir.path(), 5, &mut rounds);
    let follower = if l == 0 { 2u64 } else { 1 };
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgAppendResponse);
    m.from = follower;
    m.to = l as u64 + 1;
    m.term = nodes[l].raw.raft.term;
    m.reject = true;
    // Below what the follower acknowledged, as a lost-entries rejection, but of an index
    // far past the leader's log (a hostile or buggy peer).
    m.reject_hint = 0;
    m.index = u64::MAX;
    let leader = &mut nodes[l];
    let _ = leader.lost.step(&mut leader.raw, m);
    let target = nodes[l].raw.raft.raft_log.last_index();
    for i in 5..8 {
        nodes[l].raw.propose(vec![], batch(i)).expect("propose");
    }
    // The leader goes on, and the follower it was told about is served again.
    while nodes[(follower - 1) as usize].raw.raft.raft_log.applied <= target {
        round(&mut nodes, false);
        rounds += 1;
        assert!(
            rounds < MAX_ROUNDS,
            "the follower is not served after the hostile rejection"
        );
    }
}

/// A replica log in `dir` holding `source`'s entries `1..=keep`, with `hard_state` and
/// `source`'s configuration stored.
fn replica_copy(
    dir: &std::path::Path,
    source: &RaftLog,
    keep: u64,
    hard_state: HardState,
    flush: FlushPolicy,
) -> RaftLog {
    let copy = storage_with(dir, flush);
    let prefix = source
        .entries(1, keep + 1, None, GetEntriesContext::empty(false))
        .expect("prefix");
    copy.append(&prefix, Origin::Peer).expect("append prefix");
    copy.persist().expect("persist");
    copy.set_hard_state(&hard_state).expect("hard state");
    copy.set_conf_state(&source.conf_state()).expect("conf state");
    copy
}

/// Damage at rest found by the scrub: flips bytes inside the batch of entry `index` of the
/// replica in `dir` (closing `raft`), then scrubs until the log is quarantined.
fn damage_and_scrub(dir: &std::path::Path, raft: RaftLog, index: u64) {
    use conveyor_storage::{ScrubCursor, ScrubStep};
    use std::os::unix::fs::FileExt;
    let offset = raft.offset_of(index).expect("entry in the log");
    let at = raft
        .partition_log()
        .locate(offset)
        .expect("locate")
        .expect("batch found");
    let config = raft.partition_log().config();
    drop(raft);
    // Reopened once, so that what was written is synced and trusted: damage at rest.
    drop(PartitionLog::open(dir, config.clone()).expect("reopen"));
    let path = conveyor_storage::file_names::segment_file(dir, at.segment_base_offset, "log");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open segment");
    file.write_all_at(
        b"\xff\xff",
        at.position + conveyor_storage::batch::HEADER_LEN as u64 + 4,
    )
    .expect("flip");
    let log = PartitionLog::open(dir, config).expect("open");
    let mut cursor = ScrubCursor::start();
    loop {
        match log.scrub_step(cursor, 1 << 20).expect("scrub") {
            ScrubStep::Verified { next, .. } => cursor = next,
            ScrubStep::Corrupt(c) => {
                assert_eq!(c.offset, offset, "the scrub names the damaged entry");
                break;
            }
            ScrubStep::PassComplete => panic!("the scrub finds the damage"),
        }
    }
    assert!(log.is_poisoned(), "quarantined");
}

fn b_promise(term: u64, index: u64) -> Option<Promise> {
    Some(Promise { term, index })
}

/// The term of each entry `1..=last` of `raft`.
fn terms(raft: &RaftLog, last: u64) -> Vec<u64> {
    (1..=last).map(|i| raft.term(i).expect("term")).collect()
}

#[test]
fn a_replica_cut_by_the_scrub_refuses_a_candidate_of_its_term_lacking_entries_it_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (nodes, l) = committed_group(&dir.path().join("group"), 100, &mut rounds);
    let source = nodes[l].raw.store().clone();
    let last = nodes[l].raw.raft.raft_log.last_index();
    let term = nodes[l].raw.raft.term;
    assert_eq!(nodes[l].raw.raft.raft_log.committed, last);
    let committed_terms = terms(&source, last);
    let hs = |commit| HardState {
        term,
        vote: 1,
        commit,
        ..HardState::default()
    };
    // A and B hold and committed everything (B's stored commit is stale: it is written
    // lazily); C lags at 55.
    let (a_dir, b_dir, c_dir) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    let a = replica_copy(&a_dir, &source, last, hs(last), FlushPolicy::Os);
    let b = replica_copy(&b_dir, &source, last, hs(10), FlushPolicy::Os);
    let c = replica_copy(&c_dir, &source, 55, hs(55), FlushPolicy::Os);
    drop(nodes);
    // B's scrub finds entry 40 damaged; B is reopened cut there.
    damage_and_scrub(&b_dir, b, 40);
    let b = storage(&b_dir);
    assert_eq!(b.last_index().expect("last"), 39, "cut at the damaged entry");
    let mut nodes = vec![node(1, a), node(2, b), node(3, c)];
    assert!(nodes[1].lost.is_recovering(), "B lost entries it acknowledged");
    assert_eq!(
        nodes[1].raw.store().recovering(),
        b_promise(term, last),
        "B promised the last entry it held"
    );

    // A dies before it tells B anything: C, same term and shorter, must not win with B's vote.
    for _ in 0..300 {
        round_without(&mut nodes, true, Some(0));
        assert_eq!(
            leader(&nodes),
            None,
            "C won an election lacking committed entries 56..={last} (B voted for a log shorter than the one it acknowledged)"
        );
    }
    // A comes back: it holds what B promised, and wins.
    let l = elect(&mut nodes, &mut rounds);
    assert_eq!(l, 0, "only A holds every committed entry");
    all_catch_up_with(&mut nodes, l, &mut rounds);
    for n in &nodes {
        assert_eq!(terms(n.raw.store(), last), committed_terms, "no committed entry lost");
    }
}

#[test]
fn a_group_whose_replicas_all_cut_a_torn_tail_under_flush_always_elects_a_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (nodes, l) = committed_group(&dir.path().join("group"), 20, &mut rounds);
    let source = nodes[l].raw.store().clone();
    let last = nodes[l].raw.raft.raft_log.last_index();
    let term = nodes[l].raw.raft.term;
    let committed_terms = terms(&source, last - 5);
    // A power cut under `always` during an election of the next term: each replica stored
    // term + 1, and each tore a write it never synced, so never acknowledged.
    let mut reopened = Vec::new();
    for i in 0..3u64 {
        let path = dir.path().join(format!("r{i}"));
        let hs = HardState {
            term: term + 1,
            vote: i + 1,
            commit: last - 5,
            ..HardState::default()
        };
        drop(replica_copy(&path, &source, last - i, hs, FlushPolicy::Always));
        tear_tail(&path);
        reopened.push(storage_with(&path, FlushPolicy::Always));
    }
    drop(nodes);
    let mut nodes: Vec<Node> = reopened
        .into_iter()
        .enumerate()
        .map(|(i, raft)| node(i as u64 + 1, raft))
        .collect();
    assert!(
        nodes.iter().all(|n| !n.lost.is_recovering()),
        "a torn tail under `always` was never acknowledged"
    );
    let l = elect(&mut nodes, &mut rounds);
    all_catch_up_with(&mut nodes, l, &mut rounds);
    for n in &nodes {
        assert_eq!(
            terms(n.raw.store(), last - 5),
            committed_terms,
            "no committed entry lost"
        );
    }
}

#[test]
fn given_a_crash_between_the_cut_and_storing_the_recovering_state_the_replica_still_reopens_recovering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rounds = 0;
    let (nodes, l) = committed_group(&dir.path().join("group"), 60, &mut rounds);
    let source = nodes[l].raw.store().clone();
    let last = nodes[l].raw.raft.raft_log.last_index();
    let hs = HardState {
        term: nodes[l].raw.raft.term,
        vote: 1,
        commit: 10,
        ..HardState::default()
    };
    let path = dir.path().join("b");
    let b = replica_copy(&path, &source, last, hs.clone(), FlushPolicy::Os);
    drop(nodes);
    damage_and_scrub(&path, b, 30);
    // The reopening cuts the log, and the broker dies before `RaftLog::open` runs.
    let log = PartitionLog::open(&path, log_config(FlushPolicy::Os)).expect("open");
    assert!(log.recovery_report().cut.is_some(), "cut at the damaged entry");
    drop(log);
    let b = storage(&path);
    assert_eq!(
        b.recovering(),
        Some(Promise {
            term: hs.term,
            index: last
        }),
        "the loss is not forgotten across the crash: the promise is the last entry B held"
    );
    assert!(LostEntries::new("t", 0, &b).is_recovering());
    assert!(
        !path.join(conveyor_storage::scrub::CORRUPTION_MARKER).exists(),
        "released once the promise is stored"
    );
    drop(b);
    assert_eq!(
        storage(&path).recovering(),
        b_promise(hs.term, last),
        "and kept from then on"
    );
}

#[test]
fn a_replica_is_alone_only_when_both_halves_of_a_joint_configuration_hold_only_it() {
    let sole = |conf: ConfState| {
        let dir = tempfile::tempdir().expect("tempdir");
        let raft = storage(dir.path());
        raft.set_conf_state(&conf).expect("conf state");
        sole_voter(&node(1, raft).raw)
    };
    assert!(sole(ConfState {
        voters: vec![1],
        ..ConfState::default()
    }));
    assert!(
        !sole(ConfState {
            voters: vec![1],
            voters_outgoing: vec![1, 2, 3],
            ..ConfState::default()
        }),
        "leaving {{1,2,3}} for {{1}}: the outgoing majority may hold what replica 1 lost"
    );
    assert!(!sole(ConfState {
        voters: vec![1, 2],
        ..ConfState::default()
    }));
}

mod crash;
