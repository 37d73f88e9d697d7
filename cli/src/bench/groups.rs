//! `conveyor bench groups` and `conveyor bench rebalance`: what consumer group membership
//! costs the coordinator, and how long a rebalance takes. Members here speak the Groups
//! protocol directly (join, heartbeat on the interval the coordinator gives, give up
//! revoked partitions at once, leave), without fetching, so the figures are the
//! coordinator's alone.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use conveyor_client::Client;
use conveyor_client::proto::groups_client::GroupsClient;
use conveyor_client::proto::{
    DescribeGroupRequest, ErrorCode, ErrorDetail, FindCoordinatorRequest, GroupHeartbeatRequest,
    GroupHeartbeatResponse, Subscription, TopicPartitions,
};
use prost::Message as _;
use serde_json::json;
use tokio::sync::Mutex;
use tonic::transport::Channel;

use crate::output::Format;

#[derive(Debug, Clone, Args)]
pub struct GroupsArgs {
    /// Topic the members subscribe to; created with --partitions if it does not exist.
    #[arg(long, default_value = "bench-groups")]
    pub topic: String,
    #[arg(long, default_value_t = 2)]
    pub partitions: i32,
    /// Groups, each with --members members.
    #[arg(long, default_value_t = 1000)]
    pub groups: u32,
    #[arg(long, default_value_t = 2)]
    pub members: u32,
    /// How long to measure once every member has joined: a duration such as 30s.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::time::parse_secs)]
    pub duration: Duration,
    /// Brokers' metrics endpoints (HOST:PORT, comma-separated): report the CPU they spent.
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub broker_metrics: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct RebalanceArgs {
    #[arg(long, default_value = "bench-rebalance")]
    pub topic: String,
    #[arg(long, default_value_t = 12)]
    pub partitions: i32,
    /// Members in the group before one more joins.
    #[arg(long, default_value_t = 3)]
    pub members: u32,
    /// Joins timed (the extra member leaves again between rounds).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

/// Connections to brokers, and where each group's coordinator is. Members share
/// connections in slots of [`MEMBERS_PER_CONNECTION`], as members in separate processes
/// would not all share one (and one HTTP/2 connection takes 32 calls at once).
struct Router {
    bootstrap: String,
    channels: Mutex<HashMap<(String, usize), Channel>>,
    coordinators: Mutex<HashMap<String, String>>,
}

const MEMBERS_PER_CONNECTION: usize = 20;

impl Router {
    fn new(bootstrap: &str) -> Router {
        Router {
            bootstrap: bootstrap.to_string(),
            channels: Mutex::default(),
            coordinators: Mutex::default(),
        }
    }

    async fn channel(&self, address: &str, slot: usize) -> anyhow::Result<Channel> {
        let key = (address.to_string(), slot / MEMBERS_PER_CONNECTION);
        let mut channels = self.channels.lock().await;
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let c = Channel::from_shared(format!("http://{address}"))?.connect().await?;
        channels.insert(key, c.clone());
        Ok(c)
    }

    async fn coordinator(&self, group: &str, slot: usize) -> anyhow::Result<GroupsClient<Channel>> {
        if let Some(a) = self.coordinators.lock().await.get(group).cloned() {
            return Ok(GroupsClient::new(self.channel(&a, slot).await?));
        }
        let mut any = GroupsClient::new(self.channel(&self.bootstrap, slot).await?);
        let found = any
            .find_coordinator(FindCoordinatorRequest { group: group.into() })
            .await?
            .into_inner();
        self.coordinators
            .lock()
            .await
            .insert(group.to_string(), found.address.clone());
        Ok(GroupsClient::new(self.channel(&found.address, slot).await?))
    }

    /// One heartbeat, following the coordinator when it moved and retrying while it loads
    /// or a connection fails.
    async fn heartbeat(&self, request: GroupHeartbeatRequest, slot: usize) -> anyhow::Result<GroupHeartbeatResponse> {
        let mut last = String::new();
        for _ in 0..50 {
            let answer = match self.coordinator(&request.group, slot).await {
                Ok(mut client) => client.heartbeat(request.clone()).await,
                Err(e) => {
                    last = format!("{e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match answer {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => {
                    let detail = ErrorDetail::decode(s.details()).unwrap_or_default();
                    // A refused stream or a dropped connection carries no detail: retry it.
                    let transport =
                        matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown) && s.details().is_empty();
                    if !detail.retriable && !transport {
                        anyhow::bail!("heartbeat refused: {}", s.message());
                    }
                    if detail.code == ErrorCode::NotCoordinator as i32 {
                        self.coordinators.lock().await.remove(&request.group);
                    }
                    last = s.message().to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        anyhow::bail!("group '{}': no coordinator answered ({last})", request.group)
    }
}

fn count(ps: &[TopicPartitions]) -> usize {
    ps.iter().map(|t| t.partitions.len()).sum()
}

fn flat(ps: &[TopicPartitions]) -> BTreeSet<(String, i32)> {
    ps.iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.topic.clone(), *p)))
        .collect()
}

/// A member: joins, then heartbeats until `until` or `stop`, then leaves.
async fn member(
    slot: usize,
    router: Arc<Router>,
    group: String,
    topic: String,
    until: Instant,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sent: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let joined = router
        .heartbeat(
            GroupHeartbeatRequest {
                group: group.clone(),
                member_epoch: 0,
                subscription: Some(Subscription {
                    topics: vec![topic],
                    ..Default::default()
                }),
                ..Default::default()
            },
            slot,
        )
        .await?;
    let (id, mut epoch, mut owned, mut interval) = (
        joined.member_id,
        joined.member_epoch,
        joined.assignment,
        joined.heartbeat_interval_ms,
    );
    sent.fetch_add(1, Ordering::Relaxed);
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(u64::from(interval.max(10)))).await;
        let answer = router
            .heartbeat(
                GroupHeartbeatRequest {
                    group: group.clone(),
                    member_id: id.clone(),
                    member_epoch: epoch,
                    owned: owned.clone(),
                    ..Default::default()
                },
                slot,
            )
            .await?;
        sent.fetch_add(1, Ordering::Relaxed);
        epoch = answer.member_epoch;
        interval = answer.heartbeat_interval_ms;
        // Revoked partitions are given up at once; the next heartbeat confirms it.
        if flat(&answer.assignment).is_subset(&flat(&owned)) && count(&answer.assignment) < count(&owned) {
            interval = 0;
        }
        owned = answer.assignment;
    }
    router
        .heartbeat(
            GroupHeartbeatRequest {
                group,
                member_id: id,
                member_epoch: -1,
                ..Default::default()
            },
            slot,
        )
        .await?;
    Ok(())
}

pub async fn groups(client: &Client, address: &str, args: GroupsArgs, format: Format) -> anyhow::Result<()> {
    super::ensure_topic(client, &args.topic, args.partitions, 1, &[]).await?;
    let router = Arc::new(Router::new(address));
    // What the broker spends with no member at all, to tell heartbeats' cost apart.
    let idle = if args.broker_metrics.is_empty() {
        None
    } else {
        let before = crate::broker_usage::scrape_all(&args.broker_metrics).await?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let after = crate::broker_usage::scrape_all(&args.broker_metrics).await?;
        Some((after.cpu_seconds - before.cpu_seconds) / started.elapsed().as_secs_f64())
    };
    let sent = Arc::new(AtomicU64::new(0));
    // Members join over the first seconds, then everyone heartbeats for --duration.
    let warmup = Duration::from_secs(10);
    let until = Instant::now() + warmup + args.duration;
    let mut tasks = Vec::new();
    for g in 0..args.groups {
        for _ in 0..args.members {
            tasks.push(tokio::spawn(member(
                tasks.len(),
                Arc::clone(&router),
                format!("bench-group-{g}"),
                args.topic.clone(),
                until,
                Arc::default(),
                Arc::clone(&sent),
            )));
        }
    }
    tokio::time::sleep(warmup).await;
    let before = if args.broker_metrics.is_empty() {
        None
    } else {
        Some(crate::broker_usage::scrape_all(&args.broker_metrics).await?)
    };
    let (sent_before, started) = (sent.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
    let heartbeats = sent.load(Ordering::Relaxed) - sent_before;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = match before {
        Some(before) => {
            let after = crate::broker_usage::scrape_all(&args.broker_metrics).await?;
            Some(after.cpu_seconds - before.cpu_seconds)
        }
        None => None,
    };
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        let outcome = match t.await {
            Ok(outcome) => outcome,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = outcome {
            failed += 1;
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    let share = cpu.map(|c| 100.0 * c / seconds);
    // Net of the idle broker's own spending (timers, Raft ticks) over the same time.
    let net = cpu.zip(idle).map(|(c, idle)| (c - idle * seconds).max(0.0));
    let net_share = net.map(|n| 100.0 * n / seconds);
    let per = net.map(|n| n * 1e6 / heartbeats.max(1) as f64);
    match format {
        Format::Json => println!(
            "{}",
            json!({"groups": args.groups, "members": args.members, "seconds": seconds, "heartbeats": heartbeats,
                   "broker_cpu_seconds": cpu, "broker_core_percent": share, "idle_core_percent": idle.map(|i| 100.0 * i),
                   "heartbeats_core_percent": net_share, "broker_cpu_us_per_heartbeat": per, "failed_members": failed})
        ),
        Format::Text => {
            println!(
                "{} groups x {} members: {heartbeats} heartbeats in {seconds:.1} s ({:.0}/s); {failed} members failed",
                args.groups,
                args.members,
                heartbeats as f64 / seconds
            );
            if let (Some(c), Some(s), Some(i), Some(n), Some(p)) = (cpu, share, idle, net_share, per) {
                println!(
                    "broker CPU: {c:.2} s ({s:.1}% of a core; {:.1}% when idle): heartbeats {n:.1}% of a core, {p:.1} µs each",
                    100.0 * i
                );
            }
        }
    }
    if let Some(e) = first_error {
        anyhow::bail!("{failed} members failed; the first: {e}");
    }
    Ok(())
}

async fn stable(router: &Router, group: &str, members: usize) -> anyhow::Result<bool> {
    let d = router
        .coordinator(group, 0)
        .await?
        .describe_group(DescribeGroupRequest { group: group.into() })
        .await?
        .into_inner();
    Ok(d.state == "stable" && d.members.len() == members && d.members.iter().all(|m| !m.assignment.is_empty()))
}

pub async fn rebalance(client: &Client, address: &str, args: RebalanceArgs, format: Format) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.members > 0 && args.rounds > 0,
        "--members and --rounds must be positive"
    );
    anyhow::ensure!(
        args.partitions as u32 > args.members,
        "--partitions must exceed --members, so that the joining member gets some"
    );
    super::ensure_topic(client, &args.topic, args.partitions, 1, &[]).await?;
    let router = Arc::new(Router::new(address));
    let group = format!("bench-rebalance-{}", std::process::id());
    let sent = Arc::new(AtomicU64::new(0));
    let far = Instant::now() + Duration::from_secs(3600);
    let mut base = Vec::new();
    for _ in 0..args.members {
        base.push(tokio::spawn(member(
            base.len(),
            Arc::clone(&router),
            group.clone(),
            args.topic.clone(),
            far,
            Arc::default(),
            Arc::clone(&sent),
        )));
    }
    let wait_stable = |n: usize| {
        let router = Arc::clone(&router);
        let group = group.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stable(&router, &group, n).await? {
                anyhow::ensure!(Instant::now() < deadline, "group '{group}' not stable within 120 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok::<(), anyhow::Error>(())
        }
    };
    wait_stable(args.members as usize).await?;
    let mut times = Vec::new();
    for _ in 0..args.rounds {
        // Past the coordinator's settle window (2 s of short heartbeats after an epoch
        // change): the join lands in a group whose members heartbeat on the full interval.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let joiner = tokio::spawn(member(
            args.members as usize,
            Arc::clone(&router),
            group.clone(),
            args.topic.clone(),
            far,
            Arc::clone(&stop),
            Arc::clone(&sent),
        ));
        wait_stable(args.members as usize + 1).await?;
        times.push(started.elapsed());
        // It leaves at its next heartbeat; the group settles back before the next round.
        stop.store(true, Ordering::Relaxed);
        joiner.await??;
        wait_stable(args.members as usize).await?;
    }
    for t in base {
        t.abort();
    }
    times.sort();
    let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    let median = ms[ms.len() / 2];
    match format {
        Format::Json => println!(
            "{}",
            json!({"members": args.members, "partitions": args.partitions, "rebalance_ms": ms, "median_ms": median})
        ),
        Format::Text => println!(
            "join of member {} into a stable group of {} on {} partitions: median {median:.0} ms, range {:.0}..{:.0} ms over {} rounds",
            args.members + 1,
            args.members,
            args.partitions,
            ms[0],
            ms[ms.len() - 1],
            ms.len()
        ),
    }
    Ok(())
}
