//! The share coordinator's state of one `__share_state` partition: its groups, their
//! settings, members and windows, rebuilt from the partition's records.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use conveyor_proto::internal::v1::{ShareGroupValue, SharePartitionValue};
use prost::Message;

use super::records::{Key, UPDATE_SLOTS};
use super::window::Window;
use crate::coordinator::{Change, StateMachine};

/// A share group's settings, fixed when it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub topic: String,
    pub key_order: bool,
    pub lock_ms: u32,
    pub max_deliveries: u32,
    pub max_inflight: u32,
    pub earliest: bool,
    pub dead_letter_topic: String,
    pub created_ms: i64,
    /// Whether the dead-letter topic was created by this group (purge and redrive delete
    /// only such a topic).
    pub dead_letter_topic_created: bool,
}

impl Settings {
    pub fn to_value(&self) -> ShareGroupValue {
        ShareGroupValue {
            topic: self.topic.clone(),
            ordering: if self.key_order { "key" } else { "none" }.to_string(),
            lock_duration_ms: self.lock_ms,
            max_delivery_count: self.max_deliveries,
            max_inflight_records: self.max_inflight,
            auto_offset_reset: if self.earliest { "earliest" } else { "latest" }.to_string(),
            dead_letter_topic: self.dead_letter_topic.clone(),
            created_ms: self.created_ms,
            dead_letter_topic_created: self.dead_letter_topic_created,
        }
    }

    fn from_value(v: ShareGroupValue) -> Settings {
        Settings {
            topic: v.topic,
            key_order: v.ordering == "key",
            lock_ms: v.lock_duration_ms,
            max_deliveries: v.max_delivery_count,
            max_inflight: v.max_inflight_records,
            earliest: v.auto_offset_reset == "earliest",
            dead_letter_topic: v.dead_letter_topic,
            created_ms: v.created_ms,
            dead_letter_topic_created: v.dead_letter_topic_created,
        }
    }
}

/// A member's session.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    /// Which join of this member id the session is: a later join replaces it.
    pub session: u64,
}

/// One share group.
#[derive(Debug)]
pub struct ShareGroup {
    pub settings: Settings,
    pub windows: BTreeMap<i32, Window>,
    /// Members by their number (the number is what records hold).
    pub members: HashMap<u32, Member>,
    pub member_numbers: HashMap<String, u32>,
    next_member: u32,
    /// Woken when records become available (read, released, expired) or room opens.
    pub available: Arc<tokio::sync::Notify>,
    pub room: Arc<tokio::sync::Notify>,
    /// Partitions whose fill task runs.
    pub filling: HashSet<i32>,
    /// Whether a dead-letter task runs; set while a purge or redrive holds the topic.
    pub dead_lettering: bool,
    pub dead_letters_paused: bool,
    pub dead_letters_written: u64,
}

impl ShareGroup {
    pub fn new(settings: Settings) -> ShareGroup {
        ShareGroup {
            settings,
            windows: BTreeMap::new(),
            members: HashMap::new(),
            member_numbers: HashMap::new(),
            next_member: 1,
            available: Arc::default(),
            room: Arc::default(),
            filling: HashSet::new(),
            dead_lettering: false,
            dead_letters_paused: false,
            dead_letters_written: 0,
        }
    }

    /// Registers a session of `id`; returns its number and session.
    pub fn join(&mut self, id: &str, session: u64) -> u32 {
        if let Some(n) = self.member_numbers.get(id) {
            if let Some(m) = self.members.get_mut(n) {
                m.session = session;
            }
            return *n;
        }
        let n = self.next_member;
        self.next_member = self.next_member.wrapping_add(1).max(1);
        self.members.insert(
            n,
            Member {
                id: id.to_string(),
                session,
            },
        );
        self.member_numbers.insert(id.to_string(), n);
        n
    }

    /// Removes member `n` if `session` is still its session.
    pub fn leave(&mut self, n: u32, session: u64) -> bool {
        if self.members.get(&n).is_some_and(|m| m.session == session) {
            if let Some(m) = self.members.remove(&n) {
                self.member_numbers.remove(&m.id);
            }
            return true;
        }
        false
    }

    /// The record for a change of partition `partition`'s window: a snapshot every
    /// [`UPDATE_SLOTS`] sequences, otherwise an update of `changed`.
    pub fn record_of(&mut self, group: &str, partition: i32, changed: &[u64]) -> Option<Change> {
        let window = self.windows.get_mut(&partition)?;
        let snapshot = (window.sequence + 1) % UPDATE_SLOTS == 0 || !window.started;
        let (key, value) = if snapshot {
            window.started = true;
            let v = window.snapshot();
            (
                Key::Snapshot {
                    group: group.to_string(),
                    partition,
                },
                v,
            )
        } else {
            let v = window.update(changed);
            let slot = (v.sequence % UPDATE_SLOTS) as u8;
            (
                Key::Update {
                    group: group.to_string(),
                    partition,
                    slot,
                },
                v,
            )
        };
        Some(Change {
            key: key.encode(),
            value: Some(Bytes::from(value.encode_to_vec())),
        })
    }

    /// Tombstones for every record of the group, the group's own first.
    pub fn tombstones(&self, group: &str) -> Vec<Change> {
        let mut out = vec![Change {
            key: Key::Group(group.to_string()).encode(),
            value: None,
        }];
        for (p, w) in &self.windows {
            if !w.started {
                continue;
            }
            out.push(Change {
                key: Key::Snapshot {
                    group: group.to_string(),
                    partition: *p,
                }
                .encode(),
                value: None,
            });
            // Only the update slots its sequences reached were written.
            for slot in 1..=w.sequence.min(UPDATE_SLOTS - 1) {
                out.push(Change {
                    key: Key::Update {
                        group: group.to_string(),
                        partition: *p,
                        slot: slot as u8,
                    }
                    .encode(),
                    value: None,
                });
            }
        }
        out
    }
}

/// The groups of one `__share_state` partition.
#[derive(Debug)]
pub struct SharesState {
    pub groups: HashMap<String, ShareGroup>,
    /// The last delivery token handed out.
    pub next_token: u64,
}

impl Default for SharesState {
    fn default() -> SharesState {
        // Tokens start at a random point per load, so a token from another load (an older
        // term, another broker) does not name a delivery of this one.
        let seed = std::collections::hash_map::RandomState::new().build_hasher().finish();
        SharesState {
            groups: HashMap::new(),
            next_token: seed | 1,
        }
    }
}

impl SharesState {
    /// The record creating `group` with `settings`.
    pub fn creation(group: &str, settings: &Settings) -> Change {
        Change {
            key: Key::Group(group.to_string()).encode(),
            value: Some(Bytes::from(settings.to_value().encode_to_vec())),
        }
    }
}

impl StateMachine for SharesState {
    fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let decode = |v: &[u8]| SharePartitionValue::decode(v).map_err(|e| format!("a share partition record: {e}"));
        match Key::decode(key)? {
            Key::Group(group) => match value {
                None => {
                    self.groups.remove(&group);
                }
                Some(v) => {
                    let settings = Settings::from_value(
                        ShareGroupValue::decode(v).map_err(|e| format!("a share group record: {e}"))?,
                    );
                    match self.groups.get_mut(&group) {
                        Some(g) => g.settings = settings,
                        None => {
                            self.groups.insert(group, ShareGroup::new(settings));
                        }
                    }
                }
            },
            Key::Snapshot { group, partition } => {
                if let (Some(g), Some(v)) = (self.groups.get_mut(&group), value) {
                    g.windows.entry(partition).or_default().apply_snapshot(&decode(v)?);
                }
            }
            Key::Update { group, partition, .. } => {
                if let (Some(g), Some(v)) = (self.groups.get_mut(&group), value) {
                    g.windows.entry(partition).or_default().apply_update(&decode(v)?);
                }
            }
        }
        Ok(())
    }

    fn loaded(&mut self, _now: Instant) {
        // Nothing is acquired after a replay: every record in flight at the old coordinator
        // is available again, and its holder's token is refused here.
    }
}
