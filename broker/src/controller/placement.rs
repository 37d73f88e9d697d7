//! Replica placement for new topics.

/// Spreads replicas over `brokers`: partition `p` is led by broker `start + p` (mod n) and
/// followed by the next `rf - 1`, so leaders and replicas are even across brokers.
pub fn place(brokers: &[u32], partitions: usize, rf: usize, start: usize) -> Vec<Vec<u32>> {
    let n = brokers.len().max(1);
    (0..partitions)
        .map(|p| (0..rf).map(|r| brokers[(start + p + r) % n]).collect())
        .collect()
}
