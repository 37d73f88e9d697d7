//! What a partition's owner does with each message from its inbox.
//!
//! Two kinds arrive there. Peers' Raft messages are stepped, through
//! [`LostEntries`](super::lost_entries::LostEntries). And the transport reports messages it
//! could not deliver, as raft-rs's local message types, which never come from the wire (the
//! transport drops them there):
//! - `MsgSnapStatus` with `reject` set: a snapshot to that peer was dropped (its queue was
//!   full, or the call failed). raft-rs keeps a follower it sent a snapshot to paused until
//!   told how the snapshot went; without this report it would stay paused until the leader
//!   changes.
//! - `MsgUnreachable`: a call to that peer failed; a follower being replicated to
//!   optimistically goes back to probing.
//!
//! A broker in a controlled shutdown drops `MsgTimeoutNow` (a leader handing leadership to
//! it): leadership must not come back to a broker about to stop.

use raft::eraftpb::{Message, MessageType};
use raft::{RawNode, SnapshotStatus};

use super::lost_entries::LostEntries;
use super::raft_storage::RaftLog;

/// The transport's report that a snapshot for `peer` was dropped.
pub fn snapshot_dropped(peer: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapStatus);
    m.from = peer;
    m.reject = true;
    m
}

/// The transport's report that a call to `peer` failed.
pub fn peer_unreachable(peer: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgUnreachable);
    m.from = peer;
    m
}

/// Whether a message type is one only this process may produce (never valid off the wire).
pub fn is_local(kind: MessageType) -> bool {
    matches!(
        kind,
        MessageType::MsgHup
            | MessageType::MsgBeat
            | MessageType::MsgUnreachable
            | MessageType::MsgSnapStatus
            | MessageType::MsgCheckQuorum
    )
}

/// Steps one message from the inbox; `draining`: this broker is shutting down.
pub fn step(node: &mut RawNode<RaftLog>, lost: &mut LostEntries, m: Message, draining: bool) -> raft::Result<()> {
    match m.get_msg_type() {
        // The leader gives up the transfer after an election timeout and goes on leading.
        MessageType::MsgTimeoutNow if draining => Ok(()),
        MessageType::MsgSnapStatus => {
            let status = if m.reject {
                SnapshotStatus::Failure
            } else {
                SnapshotStatus::Finish
            };
            node.report_snapshot(m.from, status);
            Ok(())
        }
        MessageType::MsgUnreachable => {
            node.report_unreachable(m.from);
            Ok(())
        }
        _ => lost.step(node, m),
    }
}
