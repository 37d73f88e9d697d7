//! `conveyor bench --broker-metrics`: what the brokers spent on a run, read from their
//! Prometheus endpoints before and after it (`process_cpu_seconds_total` and the request
//! counters), so anyone can repeat the CPU-per-request measurement of
//! `docs/request_cost.md`.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest metrics page read from a broker.
const MAX_PAGE_BYTES: usize = 16 << 20;
/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The counters summed over the brokers scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub produce_requests: f64,
    pub fetch_requests: f64,
    pub context_switches: f64,
}

impl Usage {
    fn add(&mut self, other: Usage) {
        self.cpu_seconds += other.cpu_seconds;
        self.produce_requests += other.produce_requests;
        self.fetch_requests += other.fetch_requests;
        self.context_switches += other.context_switches;
    }

    fn minus(self, before: Usage) -> Usage {
        Usage {
            cpu_seconds: self.cpu_seconds - before.cpu_seconds,
            produce_requests: self.produce_requests - before.produce_requests,
            fetch_requests: self.fetch_requests - before.fetch_requests,
            context_switches: self.context_switches - before.context_switches,
        }
    }
}

/// Reads the counters from a metrics page in the Prometheus text format.
pub fn parse(page: &str) -> anyhow::Result<Usage> {
    let mut usage = Usage::default();
    let mut cpu = false;
    for line in page.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        match name {
            "process_cpu_seconds_total" => {
                usage.cpu_seconds += value;
                cpu = true;
            }
            "conveyor_produce_requests_total" => usage.produce_requests += value,
            "conveyor_fetch_requests_total" => usage.fetch_requests += value,
            "conveyor_process_context_switches_total" => usage.context_switches += value,
            _ => {}
        }
    }
    anyhow::ensure!(
        cpu,
        "the page has no process_cpu_seconds_total: is this a conveyor-broker metrics endpoint of this version?"
    );
    Ok(usage)
}

/// Fetches `http://ADDRESS/metrics`.
async fn scrape(address: &str) -> anyhow::Result<Usage> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        // HTTP/1.0: the answer is the whole page, never chunked, and the connection closes.
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut page = Vec::new();
        stream.take(MAX_PAGE_BYTES as u64 + 1).read_to_end(&mut page).await?;
        anyhow::ensure!(
            page.len() <= MAX_PAGE_BYTES,
            "the metrics page is larger than {MAX_PAGE_BYTES} bytes"
        );
        let page = String::from_utf8_lossy(&page).into_owned();
        let (head, body) = page.split_once("\r\n\r\n").context("no HTTP response")?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "answered {}",
            head.lines().next().unwrap_or_default()
        );
        parse(body)
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {SCRAPE_TIMEOUT:?}"))?
        .with_context(|| format!("reading broker metrics from http://{address}/metrics"))
}

/// Scrapes every address and sums what they report.
pub async fn scrape_all(addresses: &[String]) -> anyhow::Result<Usage> {
    let mut total = Usage::default();
    for address in addresses {
        total.add(scrape(address).await?);
    }
    Ok(total)
}

/// What the brokers spent between two scrapes `seconds` apart, for `records` records.
#[derive(Debug, Clone, Copy)]
pub struct Spent {
    usage: Usage,
    records: u64,
    seconds: f64,
}

impl Spent {
    pub fn between(before: Usage, after: Usage, records: u64, seconds: f64) -> Spent {
        Spent {
            usage: after.minus(before),
            records,
            seconds,
        }
    }

    fn requests(&self) -> f64 {
        self.usage.produce_requests + self.usage.fetch_requests
    }

    fn per(&self, n: f64) -> Option<f64> {
        (n > 0.0).then(|| self.usage.cpu_seconds * 1e6 / n)
    }

    pub fn text(&self) -> String {
        let per = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} µs"));
        let switches = if self.requests() > 0.0 {
            self.usage.context_switches / self.requests()
        } else {
            0.0
        };
        format!(
            "broker CPU: {:.2} s in {:.2} s ({:.0}% of a core) for {:.0} produce and {:.0} fetch requests: {} per request, {} per record, {switches:.2} context switches per request",
            self.usage.cpu_seconds,
            self.seconds,
            100.0 * self.usage.cpu_seconds / self.seconds.max(1e-9),
            self.usage.produce_requests,
            self.usage.fetch_requests,
            per(self.per(self.requests())),
            per(self.per(self.records as f64)),
        )
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "cpu_seconds": self.usage.cpu_seconds,
            "produce_requests": self.usage.produce_requests,
            "fetch_requests": self.usage.fetch_requests,
            "context_switches": self.usage.context_switches,
            "cpu_us_per_request": self.per(self.requests()),
            "cpu_us_per_record": self.per(self.records as f64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_are_read_from_a_metrics_page() {
        let page = "# HELP process_cpu_seconds x\n# TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total 1.5\n\
                    conveyor_produce_requests_total 100\nconveyor_fetch_requests_total 20\n\
                    conveyor_process_context_switches_total{kind=\"voluntary\"} 7\n\
                    conveyor_process_context_switches_total{kind=\"involuntary\"} 3\n\
                    conveyor_produce_requests_other 5\n# EOF\n";
        let usage = parse(page).expect("parsed");
        assert_eq!(
            usage,
            Usage {
                cpu_seconds: 1.5,
                produce_requests: 100.0,
                fetch_requests: 20.0,
                context_switches: 10.0,
            }
        );
        let after = Usage {
            cpu_seconds: 2.7,
            produce_requests: 200.0,
            ..usage
        };
        let spent = Spent::between(usage, after, 50, 2.0);
        let json = spent.json();
        assert!(
            (json["cpu_us_per_request"].as_f64().expect("per request") - 12_000.0).abs() < 1e-6,
            "{json}"
        );
        assert!(
            (json["cpu_us_per_record"].as_f64().expect("per record") - 24_000.0).abs() < 1e-6,
            "{json}"
        );
        assert!(spent.text().contains("12000.0 µs per request"), "{}", spent.text());
    }

    #[test]
    fn a_page_without_process_cpu_is_refused() {
        assert!(parse("conveyor_produce_requests_total 1\n").is_err());
    }
}
