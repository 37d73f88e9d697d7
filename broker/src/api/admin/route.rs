//! Where an admin request is served: a change to cluster metadata runs on the controller, so
//! a broker that is not the controller forwards it there (once: a forwarded request is never
//! forwarded again), through [`AdminService::to_controller`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::{AdminService, FORWARD_CONNECT_TIMEOUT, FORWARD_TIMEOUT};
use crate::api::forward::{connect, forward, own_description};
use crate::controller::Topic;
use crate::error::BrokerError;
use crate::replica::partition::Partition;

/// Where a request for a partition's leader is served.
pub(super) enum AtLeader {
    /// This broker's replica leads.
    Here(Arc<Partition>),
    /// Another broker leads: its id and a client for it.
    There(u32, AdminClient<Channel>),
}

/// Where a request that changes cluster metadata is answered.
pub(super) enum Route<Req, Resp> {
    /// This broker is the controller: the request is served here.
    Here(Req),
    /// The controller's answer to the request forwarded there.
    Forwarded(Response<Resp>),
}

/// Waits at most [`FORWARD_TIMEOUT`] for a call forwarded to the controller.
async fn forwarded_call<T>(
    controller: u32,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    tokio::time::timeout(FORWARD_TIMEOUT, call).await.unwrap_or_else(|_| {
        Err(BrokerError::TimedOut {
            what: format!("the call forwarded to the controller (broker {controller})"),
            after: FORWARD_TIMEOUT,
            state: "the controller did not answer; it may be stopped or overloaded, and what the call asked may still take effect".into(),
        }
        .into())
    })
}

/// Sends `req` to broker `broker` through `call`, marked forwarded, with `wait` as its
/// deadline when given, and waits for the answer at most [`FORWARD_TIMEOUT`].
pub(super) async fn forward_to<Req, Resp, F, Fut>(
    broker: u32,
    client: AdminClient<Channel>,
    req: Req,
    wait: Option<Duration>,
    call: F,
) -> Result<Response<Resp>, Status>
where
    F: FnOnce(AdminClient<Channel>, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<Resp>, Status>>,
{
    let mut request = forward(req);
    if let Some(wait) = wait {
        request.set_timeout(wait);
    }
    forwarded_call(broker, call(client, request)).await
}

impl AdminService {
    /// Forwards `req` through `call` to the controller when another broker is the controller
    /// (see [`forward_to`]) and returns its answer; hands `req` back when this broker is the
    /// controller. A request that was itself forwarded here is never forwarded again: it
    /// fails with no controller, since the sender's view is stale.
    pub(super) async fn to_controller<Req, Resp, F, Fut>(
        &self,
        already_forwarded: bool,
        req: Req,
        wait: Option<Duration>,
        call: F,
    ) -> Result<Route<Req, Resp>, Status>
    where
        F: FnOnce(AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        match self.controller_client(already_forwarded).await? {
            None => Ok(Route::Here(req)),
            Some((id, client)) => forward_to(id, client, req, wait, call).await.map(Route::Forwarded),
        }
    }

    /// A client for broker `broker` over a connection kept for repeated use (it connects on
    /// first use and reconnects by itself); `None` if its address is unknown or malformed.
    pub(super) fn kept_client_for(&self, broker: u32) -> Option<AdminClient<Channel>> {
        let address = self.ctx.registry.transport().client_address(broker)?;
        let mut kept = self
            .ctx
            .peer_channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let channel = match kept.entry((broker, address)) {
            std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let endpoint = crate::peer::endpoint(&e.key().1, FORWARD_CONNECT_TIMEOUT).ok()?;
                e.insert(endpoint.connect_lazy()).clone()
            }
        };
        Some(AdminClient::new(channel))
    }

    /// This broker's replica of `topic`'s `partition` if it leads; else the leader and a
    /// client for it. A request forwarded here, or one whose leader is unknown or thought to
    /// be this broker, fails with the replica's not-leader error (a forwarded request is
    /// never forwarded again).
    pub(super) async fn at_leader(
        &self,
        topic: &Topic,
        partition: i32,
        was_forwarded: bool,
    ) -> Result<AtLeader, Status> {
        let replica = self.ctx.registry.replica(topic, partition);
        if let Ok(p) = &replica
            && p.is_leader()
        {
            return Ok(AtLeader::Here(Arc::clone(p)));
        }
        let leader = match &replica {
            Ok(p) => p.leader(),
            // No replica here: the preferred replica knows who leads (it may not be itself).
            Err(_) => {
                let preferred = topic.assignments[partition as usize].first().copied().unwrap_or(0);
                let wait = FORWARD_CONNECT_TIMEOUT + super::DESCRIBE_ASK_TIMEOUT;
                let seen = if preferred == 0 || was_forwarded {
                    None
                } else {
                    own_description(self.ctx.registry.transport(), preferred, &topic.name, wait).await
                };
                seen.and_then(|d| d.partitions.into_iter().find(|p| p.partition == partition))
                    .and_then(|p| u32::try_from(p.leader).ok())
                    .filter(|&l| l > 0)
                    .unwrap_or(preferred)
            }
        };
        if was_forwarded || leader == 0 || leader == self.ctx.node_id {
            let e = match replica {
                Ok(p) => p.not_leader(),
                Err(e) => e,
            };
            return Err(self.fail(e));
        }
        let client = self.client_for(leader).await.map_err(|e| self.fail(e))?;
        Ok(AtLeader::There(leader, client))
    }

    pub(super) async fn client_for(&self, broker: u32) -> Result<AdminClient<Channel>, BrokerError> {
        connect(self.ctx.registry.transport(), broker).await
    }

    /// `None` when this broker is the controller; else the controller and a client for it.
    async fn controller_client(&self, already_forwarded: bool) -> Result<Option<(u32, AdminClient<Channel>)>, Status> {
        let controller = self.ctx.registry.controller().await.map_err(|e| self.fail(e))?;
        if controller == self.ctx.node_id {
            return Ok(None);
        }
        if already_forwarded {
            // The sender thought this broker was the controller; its view is stale.
            return Err(self.fail(BrokerError::NoController));
        }
        let client = self.client_for(controller).await.map_err(|e| self.fail(e))?;
        Ok(Some((controller, client)))
    }
}
