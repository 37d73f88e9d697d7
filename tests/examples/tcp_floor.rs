//! The floor under any broker's small request on this machine: a plain TCP echo over
//! loopback, no HTTP/2, no gRPC, no log. The client sends one 100-byte message at a time on
//! a fixed schedule of RATE messages/s and waits for its echo; the server is a tokio echo.
//! Compare the server's CPU per message with a broker's CPU per produce request at the same
//! rate (benches/request_cost.sh). docs/request_cost.md has the figures.
//!
//!   cargo run --release -p conveyor-tests --example tcp_floor -- serve 127.0.0.1:19400 [THREADS]
//!   cargo run --release -p conveyor-tests --example tcp_floor -- send 127.0.0.1:19400 [RATE] [COUNT]
//!
//! The server prints its CPU per message (the whole process's, from getrusage) each time a
//! client disconnects: run one client at a time. Run both under `taskset -c` to put them on
//! the same core or on different ones. The client paces on a thread of its own with
//! `std::thread::sleep` (tokio's timer would send in bursts at each millisecond tick), and
//! measures each round trip from its intended send time, as `conveyor bench` does.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MESSAGE: usize = 100;
/// Round trips a client measures at most (their latencies are kept to sort).
const MAX_COUNT: usize = 10_000_000;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    match args.first().map(String::as_str) {
        Some("serve") => serve(&arg(1, "127.0.0.1:19400"), arg(2, "1").parse().context("THREADS")?),
        Some("send") => send(
            &arg(1, "127.0.0.1:19400"),
            arg(2, "10000").parse().context("RATE")?,
            arg(3, "50000").parse().context("COUNT")?,
        ),
        _ => bail!("usage: tcp_floor serve ADDR [THREADS] | send ADDR [RATE] [COUNT]"),
    }
}

/// User plus system CPU of the whole process so far (zero if getrusage fails, which it
/// does not for RUSAGE_SELF).
fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the struct it is given and nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn serve(addr: &str, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(threads > 0, "THREADS must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(addr).await?;
        println!("echoing on {addr} with {threads} runtime thread(s)");
        loop {
            let mut socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            if let Err(e) = socket.set_nodelay(true) {
                eprintln!("set_nodelay: {e}");
                continue;
            }
            tokio::spawn(async move {
                let cpu = process_cpu();
                let mut buf = [0u8; MESSAGE];
                let mut echoed = 0u64;
                while socket.read_exact(&mut buf).await.is_ok() && socket.write_all(&buf).await.is_ok() {
                    echoed += 1;
                }
                let spent = process_cpu().saturating_sub(cpu);
                println!(
                    "{echoed} messages: server CPU {:.3} s, {:.1} us per message",
                    spent.as_secs_f64(),
                    spent.as_secs_f64() * 1e6 / echoed.max(1) as f64
                );
            });
        }
    })
}

fn send(addr: &str, rate: u64, count: usize) -> anyhow::Result<()> {
    anyhow::ensure!(rate > 0, "RATE must be positive");
    anyhow::ensure!((1..=MAX_COUNT).contains(&count), "COUNT must be 1 to {MAX_COUNT}");
    let mut socket = std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    socket.set_nodelay(true)?;
    let mut buf = [7u8; MESSAGE];
    let mut latencies = Vec::with_capacity(count);
    let start = Instant::now();
    for i in 0..count as u64 {
        let intended = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        socket.write_all(&buf)?;
        socket.read_exact(&mut buf)?;
        latencies.push(intended.elapsed());
    }
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "{count} messages in {:.2} s: round trip from the intended send time p50 {:?}, p99 {:?}",
        start.elapsed().as_secs_f64(),
        at(0.5),
        at(0.99)
    );
    Ok(())
}
