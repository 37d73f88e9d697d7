//! The consumer group metrics: rebalances, heartbeats, commits and expiries as counters;
//! members and lag per group and partition as gauges, as of the last lag refresh.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::GroupCoordinator;

pub fn register(groups: &Arc<GroupCoordinator>, r: &mut Registry) {
    let m = &groups.metrics;
    let counters = [
        (
            "conveyor_group_rebalances",
            "Consumer group epoch changes (joins, leaves, expiries, subscription or topic changes) on groups this broker coordinates",
            &m.rebalances,
        ),
        (
            "conveyor_group_offsets_committed",
            "Partition offsets committed to groups this broker coordinates",
            &m.offsets_committed,
        ),
        (
            "conveyor_group_heartbeats",
            "Consumer group heartbeats answered",
            &m.heartbeats,
        ),
        (
            "conveyor_group_members_expired",
            "Group members removed for missing their session or rebalance timeout",
            &m.members_expired,
        ),
    ];
    for (name, help, c) in counters {
        r.register(name, help, c.inner().clone());
    }
    r.register_collector(Box::new(Gauges(Arc::clone(groups))));
}

#[derive(Debug)]
struct Gauges(Arc<GroupCoordinator>);

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let view = self
            .0
            .lag_view
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut members = encoder.encode_descriptor(
            "conveyor_group_members",
            "Members of each consumer group this broker coordinates",
            None,
            MetricType::Gauge,
        )?;
        for g in &view {
            let labels = [("group", g.group.clone())];
            ConstGauge::new(g.members as i64).encode(members.encode_family(&labels)?)?;
        }
        let mut lag = encoder.encode_descriptor(
            "conveyor_group_lag",
            "Records between a consumer group's committed offset and the partition's high watermark",
            None,
            MetricType::Gauge,
        )?;
        for g in &view {
            for (p, l) in &g.lags {
                let labels = [
                    ("group", g.group.clone()),
                    ("topic", p.topic.clone()),
                    ("partition", p.partition.to_string()),
                ];
                ConstGauge::new(*l as i64).encode(lag.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
