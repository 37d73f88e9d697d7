//! The share group metrics: records acquired, accepted, released, rejected, expired,
//! redelivered and dead-lettered as counters; records in flight and the oldest unacked
//! record's age per group and partition as gauges, as of the last second's tick.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::ShareCoordinator;
use super::state::ShareGroup;

/// One group's gauges.
#[derive(Debug, Clone)]
pub struct GroupGauges {
    pub group: String,
    /// Per partition: records acquired, and the oldest unfinished record's age in ms.
    pub partitions: Vec<(i32, u64, u64)>,
}

pub fn view(name: &str, g: &ShareGroup, now: i64) -> GroupGauges {
    GroupGauges {
        group: name.to_string(),
        partitions: g
            .windows
            .iter()
            .map(|(p, w)| {
                let c = w.counts(now);
                let age = c
                    .oldest_unacked_timestamp
                    .map_or(0, |t| now.saturating_sub(t).max(0) as u64);
                (*p, c.acquired, age)
            })
            .collect(),
    }
}

pub fn register(shares: &Arc<ShareCoordinator>, r: &mut Registry) {
    let m = &shares.metrics;
    let counters = [
        (
            "conveyor_share_acquired_records",
            "Records acquired by share group members (deliveries)",
            &m.acquired,
        ),
        (
            "conveyor_share_accepted_records",
            "Records accepted by share group members",
            &m.accepted,
        ),
        (
            "conveyor_share_released_records",
            "Records released by share group members or left by members that went",
            &m.released,
        ),
        (
            "conveyor_share_rejected_records",
            "Records rejected by share group members",
            &m.rejected,
        ),
        (
            "conveyor_share_expired_records",
            "Acquired records whose lock expired",
            &m.expired,
        ),
        (
            "conveyor_share_redelivered_records",
            "Records acquired again after an earlier delivery",
            &m.redeliveries,
        ),
        (
            "conveyor_share_dead_letters_written",
            "Records written to share groups' dead-letter topics",
            &m.dead_letters,
        ),
    ];
    for (name, help, c) in counters {
        r.register(name, help, c.inner().clone());
    }
    r.register_collector(Box::new(Gauges(Arc::clone(shares))));
}

#[derive(Debug)]
struct Gauges(Arc<ShareCoordinator>);

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let view = self
            .0
            .gauge_view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut inflight = encoder.encode_descriptor(
            "conveyor_share_in_flight_records",
            "Records acquired and not yet acknowledged, per share group and partition",
            None,
            MetricType::Gauge,
        )?;
        for g in &view {
            for (p, acquired, _) in &g.partitions {
                let labels = [("group", g.group.clone()), ("partition", p.to_string())];
                ConstGauge::new(*acquired as i64).encode(inflight.encode_family(&labels)?)?;
            }
        }
        let mut oldest = encoder.encode_descriptor(
            "conveyor_share_oldest_unacked_age_seconds",
            "Age of the oldest record not yet acknowledged in a share group's window, per partition",
            None,
            MetricType::Gauge,
        )?;
        for g in &view {
            for (p, _, age) in &g.partitions {
                let labels = [("group", g.group.clone()), ("partition", p.to_string())];
                ConstGauge::new(*age as f64 / 1000.0).encode(oldest.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
