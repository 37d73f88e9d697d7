//! Starting and stopping a broker node: bind, open the registry, serve gRPC and metrics, run
//! background maintenance, and shut down gracefully when `shutdown` resolves.
//!
//! # Shutdown order
//! Hand leadership of this broker's partitions to in-sync replicas while still serving
//! (up to `drain_timeout`, see [`crate::shutdown`]), then stop accepting, let in-flight requests finish (up to `shutdown_timeout`), stop partition
//! owners after they drain their queues, then close every log cleanly (fsync and the
//! clean-shutdown marker, so the next start skips recovery). When `hurry` resolves (a second
//! signal), the hand-over is skipped and in-flight requests are not waited for; the logs
//! are still closed cleanly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use conveyor_proto::v1::admin_server::AdminServer;
use conveyor_proto::v1::fetch_server::FetchServer;
use conveyor_proto::v1::groups_server::GroupsServer;
use conveyor_proto::v1::produce_server::ProduceServer;
use conveyor_proto::v1::shares_server::SharesServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::api::admin::AdminService;
use crate::api::admission::{Admission, BodyDeadline};
use crate::api::fetch::FetchService;
use crate::api::groups::GroupsService;
use crate::api::produce::ProduceService;
use crate::api::shares::SharesService;
use crate::api::{Context, blocking};
use crate::byte_budget::{ByteBudget, MAX_WAIT};
use crate::config::BrokerConfig;
use crate::controller::{Registry, RegistryOptions};
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::producer_ids::ProducerIds;
use crate::replica::transport::{RaftService, Transport};
use conveyor_proto::internal::v1::raft_server::RaftServer;

/// What a client may send on one stream, and on one connection, before the broker has read
/// it: bytes the broker holds in HTTP/2 buffers, outside `[limits] produce_queue_bytes`.
/// A produce stream waiting for its share of that budget leaves up to one stream window
/// unread, and unread data holds the connection's window too: if the waiting streams of a
/// connection could fill its window, a message admitted on it could never arrive whole and
/// its share never come back (all of a thousand-stream flood stalled so). So the streams a
/// connection may open at once, times the stream window, stay below the connection window.
const HTTP2_STREAM_WINDOW: u32 = 512 << 10;
const HTTP2_MAX_STREAMS_PER_CONNECTION: u32 = 32;
const HTTP2_CONNECTION_WINDOW: u32 = 24 << 20;
const _: () = assert!(HTTP2_STREAM_WINDOW * HTTP2_MAX_STREAMS_PER_CONNECTION < HTTP2_CONNECTION_WINDOW);

/// How often partitions on the `interval` flush policy are checked.
const FLUSH_TICK: Duration = Duration::from_millis(50);

/// Runs a broker until `shutdown` resolves, then stops it cleanly.
pub async fn run(config: BrokerConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    run_until(config, shutdown, std::future::pending()).await
}

/// As [`run`]; once `hurry` resolves after `shutdown`, skips the leadership hand-over and
/// stops waiting for in-flight requests (an operator asking twice).
pub async fn run_until(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_until_with(config, Plugins::default(), shutdown, hurry).await
}

/// Code a broker binary of one's own adds to the broker (see `docs/consumer-groups.md`).
#[derive(Debug, Default)]
pub struct Plugins {
    /// The partition assignors groups may choose by name: the built-ins, and any
    /// registered with [`Assignors::register`](crate::coordinator::groups::assignor::Assignors::register).
    pub assignors: crate::coordinator::groups::assignor::Assignors,
}

/// As [`run_until`], with `plugins`.
pub async fn run_until_with(
    config: BrokerConfig,
    plugins: Plugins,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let node = &config.broker;
    let listener = TcpListener::bind(node.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", node.listen))?;
    let metrics_listener = TcpListener::bind(node.metrics_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {}: {e}", node.metrics_listen))?;
    let grpc_addr = listener.local_addr()?;
    let metrics_addr = metrics_listener.local_addr()?;

    let metrics = Arc::new(Metrics::default());
    let advertised = config
        .cluster
        .advertised_address
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let transport = Transport::start(
        node.node_id,
        advertised.clone(),
        &config.peers()?,
        config.cluster.raft_queue_depth,
        Arc::clone(&metrics),
    )?;
    let options = RegistryOptions {
        node_id: node.node_id,
        data_dir: node.data_dir.clone(),
        defaults: config.topic_defaults(),
        queue_depth: config.limits.partition_queue_depth,
        queue_bytes: config.limits.partition_queue_bytes.0 as usize,
        max_partitions: config.limits.max_partitions_per_topic,
        join: config.cluster.join,
        snapshot_every_records: config.cluster.metadata_snapshot_records,
        snapshot_every_bytes: config.cluster.metadata_snapshot_bytes.0,
        producer_expiration: config.limits.producer_id_expiration.0,
    };
    let runtime = tokio::runtime::Handle::current();
    let registry = {
        let metrics = Arc::clone(&metrics);
        let transport = Arc::clone(&transport);
        tokio::task::spawn_blocking(move || Registry::open(options, metrics, runtime, transport)).await??
    };
    let registry = Arc::new(registry);
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_lock = Arc::new(tokio::sync::Mutex::new(()));
    let cleaner = crate::cleaner::Cleaner::start(Arc::clone(&registry), Arc::clone(&metrics), config.cleaner.clone());
    let ctx = Arc::new(Context {
        cleaner: Arc::clone(&cleaner),
        registry: Arc::clone(&registry),
        metrics: Arc::clone(&metrics),
        node_id: node.node_id,
        max_fetch_wait_ms: config.limits.max_fetch_wait.0.as_millis() as u64,
        max_uncompressed_batch_bytes: config.limits.max_uncompressed_batch_bytes.0 as usize,
        admin_lock: Arc::clone(&admin_lock),
        producer_ids: ProducerIds::new(Arc::clone(&registry), Arc::clone(&admin_lock)),
        stopping: stop_rx.clone(),
        peer_channels: Default::default(),
    });

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let groups = Arc::new(crate::coordinator::groups::GroupCoordinator::new(
        Arc::clone(&registry),
        Arc::clone(&admin_lock),
        config.groups.coordinator_config(),
        plugins.assignors,
    ));
    let _ = metrics.groups.set(Arc::clone(&groups));
    let group_timers = tokio::spawn(Arc::clone(&groups).run(stopped(stop_rx.clone())));
    let shares = Arc::new(crate::coordinator::shares::ShareCoordinator::new(
        Arc::clone(&registry),
        Arc::clone(&admin_lock),
        crate::coordinator::shares::SharesConfig {
            partitions: config.shares.state_topic_partitions,
            replication_factor: config.shares.state_topic_replication_factor,
        },
    ));
    let _ = metrics.shares.set(Arc::clone(&shares));
    let share_timers = tokio::spawn(Arc::clone(&shares).run(stopped(stop_rx.clone())));
    let produce_queue = Arc::new(ByteBudget::new(
        config.limits.produce_queue_bytes.0 as usize,
        MAX_WAIT,
        "the broker's queued produce bytes ([limits] produce_queue_bytes)",
    ));
    // Set before the metrics endpoint starts: it reads the budget once, when it starts.
    let _ = metrics.produce_queue.set(Arc::clone(&produce_queue));
    let metrics_task = tokio::spawn(crate::metrics_endpoint::serve(
        metrics_listener,
        Arc::clone(&metrics),
        Arc::clone(&registry),
        stopped(stop_rx.clone()),
    ));
    let applier = tokio::spawn(Arc::clone(&registry).run_applier(stopped(stop_rx.clone())));
    let scrub = tokio::spawn(crate::scrub::run(
        Arc::clone(&registry),
        Arc::clone(&metrics),
        config.log.scrub_bytes_per_second.0,
        config.log.scrub_interval.0,
        stopped(stop_rx.clone()),
    ));
    let maintenance = tokio::spawn(maintain(
        Arc::clone(&registry),
        config.log.retention_check_interval.0,
        stopped(stop_rx.clone()),
    ));

    let max = config.limits.max_request_bytes.0 as usize;
    let serving = Serving {
        transport: Arc::clone(&transport),
    };
    let server = tonic::transport::Server::builder()
        // Windows above the 64 KiB default, which caps a stream of record batches at a
        // fraction of loopback bandwidth; bounded as the constants say.
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_concurrent_streams(HTTP2_MAX_STREAMS_PER_CONNECTION)
        // A peer whose host died holds its streams (and a produce message's share) until the
        // connection is known dead: ping it when idle, close it when a ping goes unanswered.
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(InterceptedService::new(
            AdminServer::new(AdminService::new(Arc::clone(&ctx))),
            serving.clone(),
        ))
        .add_service(
            RaftServer::new(RaftService {
                transport: Arc::clone(&transport),
                registry: Arc::clone(&registry),
                admin_lock,
            })
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20),
        )
        .add_service(Admission::new(
            InterceptedService::new(
                ProduceServer::new(ProduceService { ctx: Arc::clone(&ctx) })
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                serving.clone(),
            ),
            produce_queue,
            max,
            BodyDeadline {
                grace: config.limits.produce_body_timeout.0,
                min_rate: config.limits.produce_body_min_rate.0,
            },
        ))
        .add_service(InterceptedService::new(
            GroupsServer::new(GroupsService {
                coordinator: Arc::clone(&groups),
                metrics: Arc::clone(&metrics),
            }),
            serving.clone(),
        ))
        .add_service(InterceptedService::new(
            SharesServer::new(SharesService {
                coordinator: Arc::clone(&shares),
                metrics: Arc::clone(&metrics),
                stopping: stop_rx.clone(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
            serving.clone(),
        ))
        .add_service(InterceptedService::new(
            FetchServer::new(FetchService { ctx: Arc::clone(&ctx) })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            serving,
        ))
        .serve_with_incoming_shutdown(incoming(listener), stopped(stop_rx.clone()));
    let server = tokio::spawn(server);
    tracing::info!(
        "conveyor-broker node {} listening on {grpc_addr} (metrics http://{metrics_addr}/metrics, data {})",
        node.node_id,
        node.data_dir.display()
    );

    shutdown.await;
    let mut hurry = std::pin::pin!(hurry);
    let mut hurried = false;
    // Before anything stops: the Raft service must keep carrying the transfers.
    tokio::select! {
        () = crate::shutdown::drain_leadership(&registry, &transport, node.drain_timeout.0) => {}
        () = &mut hurry => {
            hurried = true;
            tracing::warn!("asked again to stop: leadership not handed over");
        }
    }
    tracing::info!("shutting down: finishing in-flight requests");
    let _ = stop_tx.send(true);
    // Before waiting for in-flight requests: a `topic compact --wait` among them is answered
    // that the broker is stopping instead of holding the shutdown up.
    cleaner.stop();
    let waited = tokio::time::timeout(node.shutdown_timeout.0, server);
    if hurried {
        // Asked twice already: stopping now matters more than the requests in flight.
        tracing::warn!("not waiting for in-flight requests");
    } else {
        tokio::select! {
            finished = waited => match finished {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
                Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
                Err(_) => tracing::warn!("in-flight requests did not finish in time; closing anyway"),
            },
            () = &mut hurry => tracing::warn!("asked again to stop: not waiting for in-flight requests"),
        }
    }
    let _ = applier.await;
    let _ = maintenance.await;
    let _ = scrub.await;
    let _ = group_timers.await;
    let _ = share_timers.await;
    let _ = metrics_task.await;
    close_all(&registry).await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Accepted connections with Nagle's algorithm off: small acknowledgements must not wait for
/// a delayed ACK (tonic's own `tcp_nodelay` applies only to listeners it binds itself).
fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::warn!(error = %e, "cannot disable Nagle's algorithm on a connection");
        }
        accepted
    })
}

/// Retention every `retention_every`; interval flushes every tick.
async fn maintain(registry: Arc<Registry>, retention_every: Duration, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut flush_tick = tokio::time::interval(FLUSH_TICK);
    let mut retention_tick = tokio::time::interval(retention_every);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    retention_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = flush_tick.tick() => {
                let partitions: Vec<_> = registry
                    .all_partitions()
                    .into_iter()
                    // A closed log (retired while its reopening is retried) has nothing to
                    // flush, as retention skips it: flushing would fail on every tick.
                    .filter(|p| {
                        let log = p.log();
                        !log.is_closed() && matches!(log.flush_policy(), conveyor_storage::FlushPolicy::Interval(_))
                    })
                    .collect();
                if partitions.is_empty() {
                    continue;
                }
                let _ = blocking(move || {
                    for p in partitions {
                        if let Err(e) = p.log().flush_if_due() {
                            tracing::error!(topic = %p.topic, partition = p.index, error = %e, "interval flush failed");
                        }
                    }
                    Ok(())
                })
                .await;
            }
            _ = retention_tick.tick() => {
                let partitions = registry.all_partitions();
                let _ = blocking(move || {
                    let now = conveyor_storage::unix_millis();
                    for p in partitions {
                        match p.enforce_retention(now) {
                            Ok(entries) if entries > 0 => tracing::info!(
                                topic = %p.topic, partition = p.index, entries,
                                log_start_offset = p.log().log_start_offset(), "retention deleted segments"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(topic = %p.topic, partition = p.index, error = %e, "retention failed"),
                        }
                    }
                    Ok(())
                })
                .await;
            }
        }
    }
}

async fn close_all(registry: &Arc<Registry>) -> anyhow::Result<()> {
    let partitions = registry.all_partitions();
    for p in &partitions {
        p.stop().await;
    }
    blocking(move || {
        for p in partitions {
            if let Err(e) = p.close() {
                tracing::error!(topic = %p.topic, partition = p.index, error = %e, "closing log failed");
            }
        }
        Ok(())
    })
    .await?;
    Ok(())
}

/// Refuses client requests once this broker was removed from the cluster: its view of topics
/// and leaders is frozen at the removal, and clients should ask a member instead.
#[derive(Clone)]
struct Serving {
    transport: Arc<Transport>,
}

impl tonic::service::Interceptor for Serving {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.transport.removed_from_cluster() {
            return Err(BrokerError::RemovedFromCluster(self.transport.node_id()).into());
        }
        Ok(request)
    }
}
