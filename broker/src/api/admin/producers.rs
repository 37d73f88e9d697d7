//! `ListProducers`: the idempotent producers a partition keeps state for, as its leader
//! knows them. A broker that does not lead the partition asks the leader (once: a forwarded
//! request is answered from this broker's own replica or refused).

use conveyor_proto::v1::{ListProducersRequest, ListProducersResponse, ProducerState};
use tonic::{Request, Response, Status};

use super::AdminService;
use super::route::{AtLeader, forward_to};
use crate::api::forward::forwarded;

impl AdminService {
    pub(super) async fn producers(
        &self,
        request: Request<ListProducersRequest>,
    ) -> Result<Response<ListProducersResponse>, Status> {
        self.count();
        let was_forwarded = forwarded(&request);
        let req = request.into_inner();
        let topic = self.ctx.registry.get(&req.topic).map_err(|e| self.fail(e))?;
        topic.check_index(req.partition).map_err(|e| self.fail(e))?;
        let partition = match self.at_leader(&topic, req.partition, was_forwarded).await? {
            AtLeader::Here(p) => p,
            AtLeader::There(leader, client) => {
                return forward_to(leader, client, req, None, |mut c, r| async move {
                    c.list_producers(r).await
                })
                .await;
            }
        };
        let rows = partition.producers().await.map_err(|e| self.fail(e))?;
        Ok(Response::new(ListProducersResponse {
            producers: rows
                .into_iter()
                .map(|r| ProducerState {
                    producer_id: r.producer_id,
                    producer_epoch: i32::from(r.epoch),
                    last_sequence: r.last_sequence,
                    last_offset: r.last_offset,
                    last_timestamp: r.last_write_ms,
                    cached_batches: r.cached_batches as u32,
                })
                .collect(),
            leader: self.ctx.node_id as i32,
        }))
    }
}
