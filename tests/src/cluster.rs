//! An N-broker cluster of real `conveyor-broker` processes on loopback, with a fault proxy on
//! every link between brokers.
//!
//! Each broker reaches each other broker through its own proxy (one per direction), so a
//! test can cut any link, isolate a broker or slow its links down, while clients still
//! reach every broker directly. Brokers can also be SIGKILLed, paused (SIGSTOP)
//! and restarted (see [`BrokerProcess`]).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{BrokerProcess, START_DEADLINE, wait_for};

/// A TCP forwarder that can drop its link: while cut, it closes every open connection and
/// every new one at once, as a network partition would (from the broker's point of view the
/// peer stops answering).
#[derive(Debug)]
pub struct LinkProxy {
    address: String,
    cut: Arc<AtomicBool>,
    /// Milliseconds every chunk waits before it is passed on.
    delay_ms: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stopped: Arc<AtomicBool>,
}

impl LinkProxy {
    /// Listens on an ephemeral port and forwards to `target`.
    pub fn start(target: String) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let address = listener.local_addr().expect("proxy address").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let (c, o, s) = (Arc::clone(&cut), Arc::clone(&open), Arc::clone(&stopped));
        let d = Arc::clone(&delay_ms);
        std::thread::spawn(move || {
            for incoming in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = incoming else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(&target) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                {
                    let mut open = o.lock().expect("proxy lock");
                    open.retain(|s| s.peer_addr().is_ok());
                    for s in [&client, &upstream] {
                        if let Ok(clone) = s.try_clone() {
                            open.push(clone);
                        }
                    }
                }
                pipe(&client, &upstream, Arc::clone(&d));
                pipe(&upstream, &client, Arc::clone(&d));
            }
        });
        LinkProxy {
            address,
            cut,
            delay_ms,
            open,
            stopped,
        }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Drops every connection and refuses new ones until [`heal`](Self::heal).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().expect("proxy lock").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Holds every chunk for `delay` before passing it on: a slow link.
    pub fn delay(&self, delay: Duration) {
        self.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
        self.delay_ms.store(0, Ordering::SeqCst);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wakes the accept loop so that it sees `stopped`.
        let _ = TcpStream::connect(&self.address);
    }
}

fn pipe(from: &TcpStream, to: &TcpStream, delay_ms: Arc<AtomicU64>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let delay = delay_ms.load(Ordering::SeqCst);
                    if delay > 0 {
                        std::thread::sleep(Duration::from_millis(delay));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// A free loopback port below the kernel's ephemeral range (32768 and up on Linux), so that
/// no outgoing connection takes it while its broker is down between a kill and a restart.
fn free_port() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(13)) % 12_000) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            drop(listener);
            return format!("127.0.0.1:{port}");
        }
    }
}

/// How long the replicas of a partition may take to catch up and all be in sync, or a
/// leadership change to be known.
pub const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);

/// N brokers forming one cluster.
#[derive(Debug)]
pub struct Cluster {
    brokers: BTreeMap<u32, BrokerProcess>,
    /// Arguments every broker was started with.
    extra: Vec<String>,
    /// (from, to) → the proxy `from` uses to reach `to`.
    links: BTreeMap<(u32, u32), LinkProxy>,
    /// Holds the config file of [`start_with_config`](Self::start_with_config): a restarted
    /// or joining broker reads it again.
    _config: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts brokers 1..=n with `extra` arguments each, and waits for a controller.
    pub fn start(n: u32, extra: &[&str]) -> Cluster {
        let listen: BTreeMap<u32, String> = (1..=n).map(|id| (id, free_port())).collect();
        let mut links = BTreeMap::new();
        for from in 1..=n {
            for to in (1..=n).filter(|t| *t != from) {
                links.insert((from, to), LinkProxy::start(listen[&to].clone()));
            }
        }
        let mut brokers = BTreeMap::new();
        for id in 1..=n {
            let peers: Vec<String> = (1..=n)
                .map(|to| {
                    let address = if to == id {
                        listen[&to].clone()
                    } else {
                        links[&(id, to)].address().to_string()
                    };
                    format!("{to}={address}")
                })
                .collect();
            let mut args = vec![
                "--node-id".to_string(),
                id.to_string(),
                "--peers".to_string(),
                peers.join(","),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            brokers.insert(id, BrokerProcess::start_on(&listen[&id], &args));
        }
        let cluster = Cluster {
            brokers,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            links,
            _config: None,
        };
        cluster.wait_for_controller(None);
        cluster
    }

    /// As [`start`](Self::start), every broker with `toml` as its config file (`--config`),
    /// for settings that have no flag, e.g. `"[log]\nretention_check_interval = \"100ms\"\n"`.
    pub fn start_with_config(n: u32, toml: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, toml).expect("write broker config");
        let path = path.to_str().expect("utf-8 temp path").to_string();
        let mut cluster = Cluster::start(n, &["--config", &path]);
        cluster._config = Some(dir);
        cluster
    }

    /// Starts broker `id` with `--join`, talking straight to the brokers already running
    /// (links to and from a joined broker have no fault proxy). Returns the address the
    /// other brokers reach it at, for `conveyor cluster add-node`.
    pub fn join(&mut self, id: u32) -> String {
        let listen = free_port();
        // A broker coming back under its id replaces its old process.
        let mut peers: Vec<String> = self
            .brokers
            .iter()
            .filter(|(other, _)| **other != id)
            .map(|(other, b)| format!("{other}={}", b.addr()))
            .collect();
        peers.push(format!("{id}={listen}"));
        let mut args = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--peers".to_string(),
            peers.join(","),
            "--join".to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.brokers.insert(id, BrokerProcess::start_on(&listen, &args));
        listen
    }

    /// Creates `topic` through the CLI on the cluster, with `extra` arguments (`--config
    /// segment.bytes=4096`, say); panics with the CLI's error if it fails.
    pub fn create_topic(&self, topic: &str, partitions: u32, replication_factor: u32, extra: &[&str]) {
        let (partitions, rf) = (partitions.to_string(), replication_factor.to_string());
        let mut args = vec![
            "topic",
            "create",
            topic,
            "--partitions",
            &partitions,
            "--replication-factor",
            &rf,
        ];
        args.extend_from_slice(extra);
        let out = crate::cli(&self.bootstrap(), &args, "");
        assert!(
            out.status.success(),
            "create {topic}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every broker's client address, comma-separated: a bootstrap list.
    pub fn bootstrap(&self) -> String {
        self.brokers
            .values()
            .map(|b| b.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Client addresses of every broker but `id`.
    pub fn bootstrap_without(&self, id: u32) -> String {
        self.brokers
            .iter()
            .filter(|(i, _)| **i != id)
            .map(|(_, b)| b.addr().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn broker(&self, id: u32) -> &BrokerProcess {
        &self.brokers[&id]
    }

    pub fn broker_mut(&mut self, id: u32) -> &mut BrokerProcess {
        self.brokers.get_mut(&id).expect("no such broker")
    }

    pub fn ids(&self) -> Vec<u32> {
        self.brokers.keys().copied().collect()
    }

    /// Cuts the links between `a` and `b`, both directions.
    pub fn cut(&self, a: u32, b: u32) {
        self.links[&(a, b)].cut();
        self.links[&(b, a)].cut();
    }

    /// Cuts every link of broker `id`: it still runs and clients reach it, but it cannot
    /// talk to the other brokers.
    pub fn isolate(&self, id: u32) {
        for other in self.ids().into_iter().filter(|o| *o != id) {
            self.cut(id, other);
        }
    }

    /// Slows every link of broker `id`, both directions, by `delay` per chunk.
    pub fn slow_down(&self, id: u32, delay: Duration) {
        for ((from, to), link) in &self.links {
            if *from == id || *to == id {
                link.delay(delay);
            }
        }
    }

    pub fn heal_all(&self) {
        for link in self.links.values() {
            link.heal();
        }
    }

    /// `conveyor cluster info --output json` through the brokers other than `skip`.
    pub fn info(&self, skip: Option<u32>) -> Option<serde_json::Value> {
        let bootstrap = match skip {
            Some(id) => self.bootstrap_without(id),
            None => self.bootstrap(),
        };
        let out = crate::cli(&bootstrap, &["cluster", "info", "--output", "json"], "");
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits until the brokers other than `skip` report a controller (not `skip`), and
    /// returns its id.
    pub fn wait_for_controller(&self, skip: Option<u32>) -> u32 {
        wait_for("a controller", START_DEADLINE, || {
            let info = self.info(skip)?;
            let id = info["controller"].as_u64()? as u32;
            (id > 0 && Some(id) != skip).then_some(id)
        })
    }

    /// `conveyor topic describe NAME --output json`, asked of the brokers other than `skip`.
    pub fn describe(&self, topic: &str, skip: Option<u32>) -> Option<serde_json::Value> {
        let bootstrap = match skip {
            Some(id) => self.bootstrap_without(id),
            None => self.bootstrap(),
        };
        describe_at(&bootstrap, topic)
    }

    /// The leader of a partition once one is known and is not `not`.
    pub fn wait_for_leader(&self, topic: &str, partition: usize, not: Option<u32>, deadline: Duration) -> u32 {
        wait_for("a partition leader", deadline, || {
            let d = self.describe(topic, not)?;
            let leader = d["partitions"][partition]["leader"].as_u64()? as u32;
            (leader > 0 && Some(leader) != not).then_some(leader)
        })
    }

    /// Waits until every partition of `topic` has `replicas` replicas in sync, so that a read
    /// sees the end and a stopped broker has an in-sync replica to hand over to.
    pub fn wait_in_sync(&self, topic: &str, replicas: usize) {
        wait_for("every replica in sync", CONVERGE_DEADLINE, || {
            let d = self.describe(topic, None)?;
            d["partitions"]
                .as_array()?
                .iter()
                .all(|p| p["in_sync"].as_array().is_some_and(|s| s.len() == replicas))
                .then_some(())
        });
    }

    /// Moves leadership of `partition` of `topic` to broker `to` (`conveyor partition
    /// transfer-leader`); panics with the CLI's error if it is refused. A transfer the
    /// broker says to retry (the target still catching up on a loaded machine) is asked
    /// again until a deadline.
    pub fn transfer_leader(&self, topic: &str, partition: u32, to: u32) {
        let (partition, to) = (partition.to_string(), to.to_string());
        let args = ["partition", "transfer-leader", topic, &partition, "--to", &to];
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let out = loop {
            let out = crate::cli(&self.bootstrap(), &args, "");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() || !stderr.contains("retry") || std::time::Instant::now() >= deadline {
                break out;
            }
            // A pause between attempts (a refusal may come at once), not a synchronization.
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(
            out.status.success(),
            "transfer {topic}/{partition} to {to}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `conveyor topic describe NAME --output json` asked of `brokers` (a bootstrap list); `None`
/// when it fails (the topic is not known there yet, say).
pub fn describe_at(brokers: &str, topic: &str) -> Option<serde_json::Value> {
    let out = crate::cli(brokers, &["topic", "describe", topic, "--output", "json"], "");
    serde_json::from_slice(&out.stdout).ok()
}
