//! `conveyor-broker`: starts one broker node. With no arguments: a single node with data in
//! `./data`, gRPC on 127.0.0.1:9292 and metrics on 127.0.0.1:9293.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use conveyor_broker::BrokerConfig;

/// The Conveyor event broker.
///
/// Settings come from flags, then CONVEYOR_* environment variables, then the config file,
/// then built-in defaults (a single local node). See config/broker.toml for every setting.
#[derive(Debug, Parser)]
#[command(name = "conveyor-broker", version)]
struct Args {
    /// TOML config file (for example config/broker.toml).
    #[arg(long, env = "CONVEYOR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for topic data and metadata [default: ./data].
    #[arg(long, env = "CONVEYOR_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:9292].
    #[arg(long, env = "CONVEYOR_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Prometheus metrics listen address [default: 127.0.0.1:9293].
    #[arg(long, env = "CONVEYOR_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// This broker's id [default: 1].
    #[arg(long, env = "CONVEYOR_NODE_ID", value_name = "N")]
    node_id: Option<u32>,
    /// Every broker of the cluster, this one included: 1=HOST:PORT,2=HOST:PORT,...
    /// [default: none, a cluster of one].
    #[arg(long, env = "CONVEYOR_PEERS", value_name = "ID=ADDR,...")]
    peers: Option<String>,
    /// Where clients reach this broker [default: the listen address].
    #[arg(long, env = "CONVEYOR_ADVERTISED_ADDRESS", value_name = "HOST:PORT")]
    advertised_address: Option<String>,
    /// Join a running cluster instead of founding a new one: --peers names brokers already
    /// in it (and this one), and the broker waits until `conveyor cluster add-node` adds it.
    #[arg(long, env = "CONVEYOR_JOIN")]
    join: bool,
}

/// The log filter: `RUST_LOG`, else `info`; raft-rs at `warn` unless `RUST_LOG` names it
/// or asks for less than `warn` overall.
/// raft-rs logs every election and configuration step of every group at info (about ten
/// records per partition at a start); the broker logs one line per leadership change of its
/// own. The slog bridge's records are filtered by their module (`raft::...`), not by `slog`.
/// A malformed `RUST_LOG` falls back to the default, as `EnvFilter` itself does.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    const DEFAULT: &str = "info";
    let spec = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or(DEFAULT);
    let names_raft = spec.split(',').any(|directive| {
        let target = directive.split(['=', '[']).next().unwrap_or("").trim();
        target == "raft" || target.starts_with("raft::")
    });
    // raft=warn is more specific than a global level, so it would outvote a quieter one
    // (`error`, `off`) or turn raft on where no global level enables anything.
    let global = spec
        .split(',')
        .filter(|directive| !directive.contains('='))
        .filter_map(|directive| directive.trim().parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .max();
    let quieter = global.is_none_or(|level| level < tracing_subscriber::filter::LevelFilter::WARN);
    let spec = if names_raft || quieter {
        spec.to_string()
    } else {
        format!("{spec},raft=warn")
    };
    tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{DEFAULT},raft=warn")))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // A log that cannot be written (its disk is full) must not take the broker down: the
        // default reports that with `eprintln!`, which panics in whatever task logged.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(log_filter(std::env::var("RUST_LOG").ok().as_deref()))
        .init();
    let mut config = match &args.config {
        Some(path) => BrokerConfig::load(path)?,
        None => BrokerConfig::default(),
    };
    if let Some(d) = args.data_dir {
        config.broker.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.broker.listen = l;
    }
    if let Some(m) = args.metrics_listen {
        config.broker.metrics_listen = m;
    }
    if let Some(n) = args.node_id {
        config.broker.node_id = n;
    }
    if let Some(p) = args.peers {
        config.cluster.peers = vec![p];
    }
    if let Some(a) = args.advertised_address {
        config.cluster.advertised_address = Some(a);
    }
    if args.join {
        config.cluster.join = true;
    }
    // Checked after the overrides: a file may leave to a flag what it does not say itself.
    config.validate().context("invalid configuration")?;
    // A write past the file size limit must fail with an error the storage handles (as a full
    // disk does), not kill the process with SIGXFSZ.
    // SAFETY: setting a signal's disposition to "ignore" before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.broker.worker_threads > 0 {
        runtime.worker_threads(config.broker.worker_threads);
    }
    let runtime = runtime.enable_all().build().context("starting the async runtime")?;
    runtime.block_on(async {
        // Installed before anything else, so a signal during startup is not lost.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        // Counted, not taken once: a second signal hurries the shutdown along.
        let (signals, received) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => tracing::info!("received SIGTERM"),
                    _ = int.recv() => tracing::info!("received SIGINT"),
                }
                signals.send_modify(|n| *n += 1);
            }
        });
        let nth = |n: u32| {
            let mut received = received.clone();
            async move {
                // The sender lives as long as the process.
                let _ = received.wait_for(|count| *count >= n).await;
            }
        };
        conveyor_broker::run_until(config, nth(1), nth(2)).await
    })
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn raft_stays_at_warn_unless_rust_log_names_it() {
        assert_eq!(log_filter(None).to_string(), "raft=warn,info");
        assert_eq!(log_filter(Some("info")).to_string(), "raft=warn,info");
        assert_eq!(
            log_filter(Some("debug,conveyor_broker=trace")).to_string(),
            "conveyor_broker=trace,raft=warn,debug"
        );
        assert_eq!(log_filter(Some("info,raft=debug")).to_string(), "raft=debug,info");
        assert_eq!(log_filter(Some("raft::raft=info")).to_string(), "raft::raft=info");
        assert_eq!(
            log_filter(Some("info,raft_thing=debug")).to_string(),
            "raft_thing=debug,raft=warn,info",
            "only raft itself counts as asked for"
        );
    }

    #[test]
    fn raft_is_no_louder_than_the_level_asked_for() {
        assert_eq!(log_filter(Some("error")).to_string(), "error");
        assert_eq!(log_filter(Some("off")).to_string(), "off");
        assert_eq!(log_filter(Some("warn")).to_string(), "raft=warn,warn");
        assert_eq!(
            log_filter(Some("conveyor_broker=debug")).to_string(),
            "conveyor_broker=debug",
            "without a global level, other targets are off"
        );
    }
}
