//! What a replica reports about its Raft group: the leader it knows, the term, and on the
//! leader each follower's lag and whether it is in sync. The owner publishes it after its
//! Readies; metadata answers, descriptions and the health gauges read it.

/// A follower's replication state, as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerState {
    pub id: u32,
    /// Offsets the follower's log is behind the leader's.
    pub lag: u64,
    /// The offset the follower's log has reached (the leader's end minus `lag`, when the
    /// status was published).
    pub reached: u64,
    pub in_sync: bool,
}

/// What a partition's Raft group looks like from this replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupStatus {
    /// The leader this replica knows of; 0 when there is none.
    pub leader: u32,
    pub term: u64,
    /// Set on the leader only.
    pub followers: Vec<FollowerState>,
    /// Set while this replica is stopped after a failure; `leader` is then never this
    /// replica (0, or a peer whose heartbeats show it leads).
    pub failure: Option<String>,
}

impl GroupStatus {
    /// Replicas in sync with the leader, the leader first; empty unless this replica leads.
    pub fn in_sync(&self) -> Vec<u32> {
        if self.leader == 0 {
            return Vec::new();
        }
        let mut ids = vec![self.leader];
        ids.extend(self.followers.iter().filter(|f| f.in_sync).map(|f| f.id));
        ids
    }
}
