//! The cluster as `cluster info` shows it: members, liveness, the controller, and each
//! broker's metadata apply state; and moving the controller role off a broker.

use conveyor_proto::v1::*;

use super::{AdminService, CLUSTER_ASK_TIMEOUT, TRANSFER_TIMEOUT};
use crate::api::forward::forward;
use crate::error::BrokerError;

impl AdminService {
    /// The members of the cluster, with liveness as this broker sees it.
    pub(super) fn brokers(&self) -> Vec<BrokerInfo> {
        let members = self.ctx.registry.members();
        self.ctx
            .registry
            .transport()
            .peer_states()
            .into_iter()
            .filter(|s| members.contains(&s.id))
            .map(|s| BrokerInfo {
                id: s.id as i32,
                address: s.address,
                alive: s.alive,
                ..BrokerInfo::default()
            })
            .collect()
    }

    pub(super) fn cluster(&self) -> ClusterDescription {
        let controller = self.ctx.registry.metadata_partition().leader();
        ClusterDescription {
            cluster_id: "conveyor".into(),
            controller: controller as i32,
            brokers: self.brokers(),
        }
    }

    /// Hands the controller role to another live broker (before this one is removed) and
    /// returns the new controller.
    pub(super) async fn move_controller(&self) -> Result<u32, BrokerError> {
        let me = self.ctx.node_id;
        let registry = &self.ctx.registry;
        let (voters, _) = registry.metadata_partition().members();
        let Some(to) = voters
            .into_iter()
            .find(|&v| v != me && registry.transport().is_alive(v))
        else {
            return Err(BrokerError::CannotRemoveBroker {
                id: me,
                reason: "no other live broker can take over as controller".into(),
            });
        };
        let metadata = registry.metadata_partition();
        let mut status = metadata.watch_status();
        metadata.transfer_leader(to).await?;
        let moved = tokio::time::timeout(TRANSFER_TIMEOUT, status.wait_for(|s| s.leader != 0 && s.leader != me)).await;
        match moved {
            Ok(Ok(s)) => Ok(s.leader),
            _ => Err(BrokerError::NoController),
        }
    }

    /// This broker's own entry for `cluster info`, with its metadata apply state.
    pub(super) fn own_metadata_state(&self, info: &mut BrokerInfo) {
        let registry = &self.ctx.registry;
        info.metadata_applied_offset = registry.applied_offset();
        info.metadata_apply_error = registry
            .apply_failure()
            .map(|f| format!("{} (offset {}): {}", f.change, f.offset, f.error))
            .unwrap_or_default();
        info.metadata_reported = true;
    }

    /// Fills in each other live broker's metadata apply state as it reports it; a broker
    /// that does not answer in time is left unreported.
    pub(super) async fn ask_metadata_states(&self, brokers: &mut [BrokerInfo]) {
        let me = self.ctx.node_id as i32;
        let asked = brokers
            .iter()
            .filter(|b| b.id != me && b.alive)
            .map(|b| b.id as u32)
            .collect::<Vec<_>>();
        let answers = futures::future::join_all(asked.into_iter().map(|broker| async move {
            let mut client = self.kept_client_for(broker)?;
            let theirs = tokio::time::timeout(
                CLUSTER_ASK_TIMEOUT,
                client.describe_cluster(forward(DescribeClusterRequest {})),
            )
            .await
            .ok()?
            .ok()?
            .into_inner();
            theirs
                .brokers
                .into_iter()
                .find(|b| b.id == broker as i32 && b.metadata_reported)
        }))
        .await;
        for theirs in answers.into_iter().flatten() {
            if let Some(slot) = brokers.iter_mut().find(|b| b.id == theirs.id) {
                slot.metadata_applied_offset = theirs.metadata_applied_offset;
                slot.metadata_apply_error = theirs.metadata_apply_error;
                slot.metadata_reported = true;
            }
        }
    }
}
