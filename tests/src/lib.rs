//! Test harness: real `conveyor-broker` processes on loopback, the `conveyor` CLI, and a
//! checker for acknowledged writes.
//!
//! # Layout
//! - [`BrokerProcess`]: spawn on ephemeral ports with a temp data dir, SIGKILL, SIGTERM,
//!   restart on the same ports.
//! - [`cli`]: run the `conveyor` binary against a broker.
//! - [`checker`]: compare acknowledged writes with what was read back.
//! - [`cluster`]: N brokers with a fault proxy on every link between them.
//! - [`raw_produce`]: idempotent produce of exact batches over raw gRPC.
//! - [`share_raw`]: share group members over the raw `Shares` protocol.
//! - [`keyed`]: keyed writes, tombstones and the latest value per key (compaction tests).
//! - [`group_member`]: consumer group members run in-process through the client, recording
//!   what they are handed, and producers that feed them.
//!
//! Binaries are built once per test process with `cargo build --bins` (the same target
//! directory), or taken from `CONVEYOR_BROKER_BIN` / `CONVEYOR_CLI_BIN`.

pub mod checker;
pub mod cluster;
pub mod group_member;
pub mod keyed;
pub mod raw_produce;
pub mod share_raw;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a broker may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a broker may take to exit after SIGTERM.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How often the harness polls for a condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

fn target_dir() -> PathBuf {
    // current_exe: <target>/<profile>/deps/<test>; binaries live in <target>/debug.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile dir");
    profile_dir.parent().expect("target dir").join("debug")
}

fn built_binaries() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bins", "-p", "conveyor-broker", "-p", "conveyor-cli"])
            .status()
            .expect("run cargo build for the broker and CLI binaries");
        assert!(status.success(), "building conveyor-broker and conveyor failed");
        target_dir()
    })
}

/// Path of the `conveyor-broker` binary under test.
pub fn broker_bin() -> PathBuf {
    std::env::var_os("CONVEYOR_BROKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| built_binaries().join("conveyor-broker"))
}

/// Path of the `conveyor` CLI binary under test.
pub fn cli_bin() -> PathBuf {
    std::env::var_os("CONVEYOR_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| built_binaries().join("conveyor"))
}

/// A two-worker runtime for tests that drive the async client.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Polls `condition` until it returns `Some` or `deadline` passes.
pub fn wait_for<T>(what: &str, deadline: Duration, condition: impl FnMut() -> Option<T>) -> T {
    poll_for(deadline, condition).unwrap_or_else(|| panic!("timed out after {deadline:?} waiting for {what}"))
}

/// Polls `condition` every [`POLL_INTERVAL`] until it gives a value, or `None` once
/// `deadline` has passed: for callers whose failure message needs more than [`wait_for`]'s.
pub fn poll_for<T>(deadline: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = condition() {
            return Some(v);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A broker process with its own data directory and log file.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Option<Child>,
    data_dir: PathBuf,
    log_path: PathBuf,
    listen: String,
    metrics: String,
    extra_args: Vec<String>,
    starts: u32,
    _temp: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    /// Starts a broker on ephemeral ports with a fresh temp data dir.
    pub fn start() -> BrokerProcess {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), passing extra command-line arguments.
    pub fn start_with(extra: &[&str]) -> BrokerProcess {
        Self::start_on("127.0.0.1:0", extra)
    }

    /// Starts a broker listening on `listen` (port 0: an ephemeral one, kept across restarts),
    /// metrics on an ephemeral port, with a fresh temp data dir.
    pub fn start_on(listen: &str, extra: &[&str]) -> BrokerProcess {
        Self::start_in(tempfile::tempdir().expect("temp dir"), listen, extra)
    }

    /// As [`start`](Self::start), with `toml` as its config file (`--config`), for settings
    /// that have no flag, e.g. `"[log]\nscrub_bytes_per_second = 0\n"`. Flags the harness
    /// passes (data dir, listen addresses) override the file.
    pub fn start_with_config(toml: &str) -> BrokerProcess {
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("broker.toml");
        std::fs::write(&path, toml).expect("write broker config");
        let path = path.to_str().expect("utf-8 temp path").to_string();
        Self::start_in(temp, "127.0.0.1:0", &["--config", &path])
    }

    fn start_in(temp: tempfile::TempDir, listen: &str, extra: &[&str]) -> BrokerProcess {
        let mut broker = BrokerProcess {
            child: None,
            data_dir: temp.path().join("data"),
            log_path: temp.path().join("broker-0.log"),
            listen: listen.to_string(),
            metrics: "127.0.0.1:0".into(),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            starts: 0,
            _temp: Some(temp),
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        self.log_path = self.log_path.with_file_name(format!("broker-{}.log", self.starts));
        self.starts += 1;
        let log = std::fs::File::create(&self.log_path).expect("broker log file");
        let child = Command::new(broker_bin())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &self.listen, "--metrics-listen", &self.metrics])
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn conveyor-broker");
        self.child = Some(child);
        let (listen, metrics) = wait_for("the broker to listen", START_DEADLINE, || {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("broker exited during startup with {status}:\n{}", self.log());
            }
            let log = self.log();
            let listen = log
                .split("listening on ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_string();
            let metrics = log.split("metrics http://").nth(1)?.split('/').next()?.to_string();
            Some((listen, metrics))
        });
        // Restarts reuse the same ports so that clients can reconnect.
        self.listen = listen;
        self.metrics = metrics;
    }

    /// `HOST:PORT` of the gRPC API.
    pub fn addr(&self) -> &str {
        &self.listen
    }

    /// `HOST:PORT` of the metrics endpoint.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Everything the current process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("broker is running")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL broker");
            child.wait().expect("reap broker");
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("broker is running");
        signal(child.id(), "-TERM");
        wait_for("the broker to exit after SIGTERM", STOP_DEADLINE, || {
            child.try_wait().ok().flatten()
        })
    }

    /// SIGSTOP: the process freezes with its connections open, like a hung machine.
    pub fn pause(&self) {
        signal(self.pid(), "-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        signal(self.pid(), "-CONT");
    }

    /// Simulates a full disk: from now on the broker cannot grow any file (writes fail as
    /// they would with ENOSPC; a file's size limit is what the kernel lets us change from
    /// outside a running process). [`disk_has_space`](Self::disk_has_space) undoes it.
    pub fn disk_full(&self) {
        set_file_size_limit(self.pid(), "0:");
    }

    /// Ends [`disk_full`](Self::disk_full): writes succeed again.
    pub fn disk_has_space(&self) {
        set_file_size_limit(self.pid(), "unlimited:");
    }

    /// Starts the broker again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the broker before restarting it");
        self.spawn();
    }

    /// Fetches the Prometheus metrics text.
    pub fn scrape_metrics(&self) -> String {
        use std::io::Read;
        let mut stream = std::net::TcpStream::connect(&self.metrics).expect("connect to metrics");
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("send metrics request");
        let mut body = String::new();
        stream.read_to_string(&mut body).expect("read metrics");
        body
    }

    /// The value of one metric series from a fresh scrape: `name` is the series as the text
    /// format spells it before its value, labels included
    /// (`conveyor_log_end_offset{topic="t",partition="0"}`). `None` when the broker does not
    /// export that series or its value does not parse.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&self.scrape_metrics(), name)
    }
}

/// The value of series `name` in Prometheus text `text` (see [`BrokerProcess::metric`]).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Sets the soft RLIMIT_FSIZE of process `pid` (`SOFT:` leaves the hard limit alone).
fn set_file_size_limit(pid: u32, soft: &str) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--fsize={soft}")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --fsize={soft} on {pid} failed");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed");
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process must be resumed to die on SIGKILL promptly everywhere.
            let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `conveyor` CLI against `broker` with `args`, feeding `stdin`.
pub fn cli(broker: &str, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(cli_bin())
        .args(["--broker", broker])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conveyor");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_string();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(data.as_bytes());
    });
    let output = child.wait_with_output().expect("run conveyor");
    writer.join().expect("stdin writer");
    output
}

/// How long reading a topic back may take before a test fails.
const READ_DEADLINE: Duration = Duration::from_secs(120);

/// Reads every partition of `topic` from its start to the high watermark it has when the
/// read starts, asking `bootstrap`. Records past that point are left out.
pub async fn read_all(bootstrap: &str, topic: &str) -> Vec<checker::Observed> {
    use conveyor_client::{Client, ConsumerConfig, StartAt};
    let client = Client::connect(bootstrap).await.expect("connect");
    let description = client.admin().describe_topic(topic).await.expect("describe");
    let ends: std::collections::HashMap<(String, i32), u64> = description
        .partitions
        .iter()
        .map(|p| ((topic.to_string(), p.partition), p.high_watermark))
        .collect();
    // Retention may move the log start while the read goes on: the read then goes on from
    // the new start, and the checker reports whatever acknowledged record it never saw.
    let config = ConsumerConfig::default()
        .max_wait(Duration::from_millis(100))
        .offset_reset(Some(StartAt::Earliest));
    let mut consumer = client.consumer(config);
    consumer.assign_all(topic, StartAt::Earliest).await.expect("assign");
    let mut stream = consumer.stream();
    let mut observed = Vec::new();
    tokio::time::timeout(READ_DEADLINE, async {
        while let Some(r) = stream.next_until(&ends).await {
            let r = r.expect("every stored batch decodes");
            if r.offset < ends[&(topic.to_string(), r.partition)] {
                observed.push(checker::Observed::of(&r));
            }
        }
    })
    .await
    .expect("read back to the high watermark");
    observed
}

/// The standard output of a `conveyor` run, which must have succeeded (else its stderr).
pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "conveyor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}

/// `conveyor ARGS --output json` against `broker`, which must succeed.
pub fn cli_json(broker: &str, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--output", "json"]);
    let out = cli(broker, &all, "");
    assert!(
        out.status.success(),
        "conveyor {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json output")
}
