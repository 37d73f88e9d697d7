//! Compares the history of acknowledged writes with what a final read returned, reporting
//! lost, duplicated and reordered records. Reusable by every durability test.
//!
//! Records are identified by an id the test puts in the value, `PRODUCER-SEQUENCE`, so that
//! per-producer order can be checked within a partition.

use std::collections::{BTreeMap, HashMap};

/// A write the broker acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub id: String,
    pub partition: i32,
    pub offset: u64,
}

/// A record the final read returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub partition: i32,
    pub offset: u64,
}

impl Observed {
    /// A consumed record whose value is its id.
    pub fn of(record: &conveyor_client::ConsumerRecord) -> Observed {
        let value = record.value.as_deref().expect("records in checked tests carry an id");
        Observed {
            id: String::from_utf8(value.to_vec()).expect("ids are UTF-8"),
            partition: record.partition,
            offset: record.offset,
        }
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub acknowledged: usize,
    pub observed: usize,
    /// Acknowledged but never read back (or read back at another offset).
    pub lost: Vec<Acked>,
    /// Read back more than once.
    pub duplicated: Vec<String>,
    /// Offsets not increasing within a partition, or a producer's records out of sequence.
    pub reordered: Vec<String>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "acknowledged {}, observed {}, lost {}, duplicated {}, reordered {}",
            self.acknowledged,
            self.observed,
            self.lost.len(),
            self.duplicated.len(),
            self.reordered.len()
        )?;
        for l in self.lost.iter().take(5) {
            write!(f, "\n  lost {} (partition {} offset {})", l.id, l.partition, l.offset)?;
        }
        for d in self.duplicated.iter().take(5) {
            write!(f, "\n  duplicated {d}")?;
        }
        for r in self.reordered.iter().take(5) {
            write!(f, "\n  reordered: {r}")?;
        }
        Ok(())
    }
}

fn split_id(id: &str) -> Option<(&str, u64)> {
    let (producer, seq) = id.rsplit_once('-')?;
    Some((producer, seq.parse().ok()?))
}

/// Checks `observed` (in the order it was read, per partition) against `acked`.
pub fn check(acked: &[Acked], observed: &[Observed]) -> Report {
    let mut report = Report {
        acknowledged: acked.len(),
        observed: observed.len(),
        ..Report::default()
    };
    let mut seen: HashMap<&str, Vec<&Observed>> = HashMap::new();
    for o in observed {
        seen.entry(o.id.as_str()).or_default().push(o);
    }
    for (id, copies) in &seen {
        if copies.len() > 1 {
            report.duplicated.push((*id).to_string());
        }
    }
    for a in acked {
        let found = seen.get(a.id.as_str()).is_some_and(|copies| {
            copies
                .iter()
                .any(|o| o.partition == a.partition && o.offset == a.offset)
        });
        if !found {
            report.lost.push(a.clone());
        }
    }
    let mut last_offset: BTreeMap<i32, u64> = BTreeMap::new();
    let mut last_seq: HashMap<(i32, &str), u64> = HashMap::new();
    let mut first_copies: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for o in observed {
        // A duplicate (a retried batch) is judged once, at its first copy.
        let first = first_copies.insert(o.id.as_str());
        if let Some(prev) = last_offset.insert(o.partition, o.offset)
            && o.offset <= prev
        {
            report
                .reordered
                .push(format!("partition {} offset {} after {prev}", o.partition, o.offset));
        }
        if first
            && let Some((producer, seq)) = split_id(&o.id)
            && let Some(prev) = last_seq.insert((o.partition, producer), seq)
            && seq < prev
        {
            report
                .reordered
                .push(format!("partition {}: {} after sequence {prev}", o.partition, o.id));
        }
    }
    report.duplicated.sort();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(id: &str, p: i32, o: u64) -> Acked {
        Acked {
            id: id.into(),
            partition: p,
            offset: o,
        }
    }
    fn o(id: &str, p: i32, off: u64) -> Observed {
        Observed {
            id: id.into(),
            partition: p,
            offset: off,
        }
    }

    #[test]
    fn reports_lost_duplicated_and_reordered_records() {
        let acked = [a("p0-0", 0, 0), a("p0-1", 0, 1), a("p0-2", 0, 2)];
        let clean = [o("p0-0", 0, 0), o("p0-1", 0, 1), o("p0-2", 0, 2)];
        let r = check(&acked, &clean);
        assert!(
            r.lost.is_empty() && r.duplicated.is_empty() && r.reordered.is_empty(),
            "{r}"
        );

        let bad = [o("p0-0", 0, 0), o("p0-2", 0, 1), o("p0-1", 0, 2), o("p0-1", 0, 3)];
        let r = check(&acked, &bad);
        assert_eq!(
            r.lost.len(),
            2,
            "p0-1 and p0-2 are not at their acknowledged offsets: {r}"
        );
        assert_eq!(r.duplicated, vec!["p0-1".to_string()]);
        assert!(!r.reordered.is_empty());
    }
}
