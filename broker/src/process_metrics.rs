//! The broker process's own resource use, as any Prometheus exporter reports it:
//! `process_cpu_seconds_total` and `process_resident_memory_bytes`, plus the context switches
//! of all its threads. CPU per request is the figure the request-cost work is judged by
//! (`docs/request_cost.md`); `conveyor bench --broker-metrics` reads these before and after
//! a run.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// CPU time and context switches of every thread of the process, live or exited.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    pub cpu_seconds: f64,
    pub voluntary_switches: u64,
    pub involuntary_switches: u64,
}

impl ProcessUsage {
    /// Reads the process's usage; zeros if the kernel refuses (it does not for `RUSAGE_SELF`).
    pub fn now() -> ProcessUsage {
        // SAFETY: `getrusage` only writes the struct it is given, which is plain data.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a live, writable `rusage`.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return ProcessUsage::default();
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        ProcessUsage {
            cpu_seconds: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            voluntary_switches: u64::try_from(usage.ru_nvcsw).unwrap_or(0),
            involuntary_switches: u64::try_from(usage.ru_nivcsw).unwrap_or(0),
        }
    }
}

/// Times the calling thread has blocked (given up its CPU to wait) so far; always 0 where
/// the kernel does not count it per thread (not Linux).
#[cfg(not(target_os = "linux"))]
pub fn thread_waits() -> u64 {
    0
}

/// Times the calling thread has blocked (given up its CPU to wait) so far.
#[cfg(target_os = "linux")]
pub fn thread_waits() -> u64 {
    // SAFETY: as in `ProcessUsage::now`, for the calling thread.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live, writable `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0;
    }
    u64::try_from(usage.ru_nvcsw).unwrap_or(0)
}

/// Resident memory from `/proc/self/statm` (pages), if it can be read.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: `sysconf` has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Encodes the process metrics on each scrape.
#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let usage = ProcessUsage::now();
        let cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time of the broker process, in seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(usage.cpu_seconds).encode(cpu)?;
        let mut switches = encoder.encode_descriptor(
            "conveyor_process_context_switches",
            "Context switches of the broker's threads: voluntary (a thread waited) or involuntary (preempted)",
            None,
            MetricType::Counter,
        )?;
        for (kind, n) in [
            ("voluntary", usage.voluntary_switches),
            ("involuntary", usage.involuntary_switches),
        ] {
            ConstCounter::new(n).encode(switches.encode_family(&[("kind", kind)])?)?;
        }
        if let Some(rss) = resident_bytes() {
            let resident = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the broker process, in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss).encode(resident)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_and_switches_grow_with_work() {
        let before = ProcessUsage::now();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        let after = ProcessUsage::now();
        assert!(after.cpu_seconds > before.cpu_seconds, "{before:?} -> {after:?}");
        assert!(
            after.voluntary_switches > before.voluntary_switches,
            "a sleep is a voluntary switch"
        );
        assert!(resident_bytes().is_some_and(|b| b > 0));
        let waits = thread_waits();
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(thread_waits() > waits, "a sleep blocks the thread");
    }
}
