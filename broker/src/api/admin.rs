//! The `Admin` service: topics and cluster description.

use std::collections::BTreeMap;
use std::sync::Arc;

use conveyor_proto::v1::admin_server::Admin;
use conveyor_proto::v1::*;
use tonic::{Request, Response, Status};

use super::{Context, blocking};
use crate::topics::Topic;

#[derive(Debug, Clone)]
pub struct AdminService {
    pub ctx: Arc<Context>,
}

impl AdminService {
    fn describe(&self, topic: &Topic) -> TopicDescription {
        let node = self.ctx.node_id as i32;
        TopicDescription {
            name: topic.name.clone(),
            configs: topic.effective.to_map().into_iter().collect(),
            replication_factor: topic.replication_factor,
            partitions: topic
                .partitions
                .iter()
                .map(|p| PartitionDescription {
                    partition: p.index,
                    leader: node,
                    replicas: vec![node],
                    in_sync: vec![node],
                    log_start_offset: p.log.log_start_offset(),
                    high_watermark: p.high_watermark(),
                    log_end_offset: p.log.log_end_offset(),
                    size_bytes: p.log.size_bytes(),
                })
                .collect(),
        }
    }

    fn brokers(&self) -> Vec<BrokerInfo> {
        vec![BrokerInfo {
            id: self.ctx.node_id as i32,
            address: self.ctx.advertised.to_string(),
            alive: true,
        }]
    }

    fn count(&self) {
        self.ctx.metrics.admin_requests.add(1);
    }

    fn fail(&self, e: crate::error::BrokerError) -> Status {
        self.ctx.metrics.request_errors.add(1);
        tracing::info!(error = %e, "admin request refused");
        e.into()
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> Result<Response<CreateTopicResponse>, Status> {
        self.count();
        let req = request.into_inner();
        let _guard = self.ctx.admin_lock.lock().await;
        let registry = Arc::clone(&self.ctx.registry);
        let configs: BTreeMap<String, String> = req.configs.into_iter().collect();
        let topic = blocking(move || registry.create_topic(&req.name, req.partitions, req.replication_factor, configs))
            .await
            .map_err(|e| self.fail(e))?;
        tracing::info!(topic = %topic.name, partitions = topic.partitions.len(), "created topic");
        Ok(Response::new(CreateTopicResponse {
            topic: Some(self.describe(&topic)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<DeleteTopicRequest>,
    ) -> Result<Response<DeleteTopicResponse>, Status> {
        self.count();
        let name = request.into_inner().name;
        let _guard = self.ctx.admin_lock.lock().await;
        let registry = Arc::clone(&self.ctx.registry);
        let topic = blocking(move || registry.delete_topic(&name))
            .await
            .map_err(|e| self.fail(e))?;
        for p in &topic.partitions {
            p.stop().await;
        }
        let registry = Arc::clone(&self.ctx.registry);
        let removed = Arc::clone(&topic);
        blocking(move || registry.remove_topic_data(&removed))
            .await
            .map_err(|e| self.fail(e))?;
        tracing::info!(topic = %topic.name, "deleted topic");
        Ok(Response::new(DeleteTopicResponse {}))
    }

    async fn list_topics(&self, _: Request<ListTopicsRequest>) -> Result<Response<ListTopicsResponse>, Status> {
        self.count();
        let topics = self
            .ctx
            .registry
            .list()
            .iter()
            .map(|t| TopicSummary {
                name: t.name.clone(),
                partitions: t.partitions.len() as i32,
                replication_factor: t.replication_factor,
            })
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<DescribeTopicRequest>,
    ) -> Result<Response<TopicDescription>, Status> {
        self.count();
        let topic = self
            .ctx
            .registry
            .get(&request.into_inner().name)
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.describe(&topic)))
    }

    async fn alter_topic_config(
        &self,
        request: Request<AlterTopicConfigRequest>,
    ) -> Result<Response<TopicDescription>, Status> {
        self.count();
        let req = request.into_inner();
        let _guard = self.ctx.admin_lock.lock().await;
        let registry = Arc::clone(&self.ctx.registry);
        let changes: BTreeMap<String, String> = req.configs.into_iter().collect();
        let topic = blocking(move || registry.alter_topic_config(&req.name, changes))
            .await
            .map_err(|e| self.fail(e))?;
        Ok(Response::new(self.describe(&topic)))
    }

    async fn describe_cluster(
        &self,
        _: Request<DescribeClusterRequest>,
    ) -> Result<Response<ClusterDescription>, Status> {
        self.count();
        Ok(Response::new(ClusterDescription {
            cluster_id: format!("conveyor-{}", self.ctx.node_id),
            controller: self.ctx.node_id as i32,
            brokers: self.brokers(),
        }))
    }

    async fn metadata(&self, request: Request<MetadataRequest>) -> Result<Response<MetadataResponse>, Status> {
        self.count();
        let wanted = request.into_inner().topics;
        let topics = if wanted.is_empty() {
            self.ctx.registry.list()
        } else {
            wanted
                .iter()
                .map(|n| self.ctx.registry.get(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| self.fail(e))?
        };
        let node = self.ctx.node_id as i32;
        Ok(Response::new(MetadataResponse {
            brokers: self.brokers(),
            topics: topics
                .iter()
                .map(|t| TopicMetadata {
                    name: t.name.clone(),
                    partitions: t
                        .partitions
                        .iter()
                        .map(|p| PartitionMetadata {
                            partition: p.index,
                            leader: node,
                            replicas: vec![node],
                        })
                        .collect(),
                })
                .collect(),
        }))
    }
}
