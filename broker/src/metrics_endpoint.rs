//! The `/metrics` endpoint: HTTP/1 over hyper on `metrics_listen`.
//!
//! A scrape reads every partition's gauges, some under locks a slow disk can hold (the
//! segment list while a snapshot install deletes segments, the Raft log while its state file
//! is fsynced), and walks every partition: it is encoded on the blocking pool, never on the
//! reactor, at most [`MAX_ENCODES`] at a time (the turn goes with the blocking job, so a
//! scraper that gives up does not free it early), so that scrapes stuck behind the disk hold
//! a bounded number of threads and no runtime worker. A HEAD is answered without encoding.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes encoded at once; others wait for a turn without holding a thread.
const MAX_ENCODES: usize = 2;

/// Serves `GET /metrics` over HTTP/1 until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    registry: Arc<crate::controller::Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let encoded = Arc::new(metrics.registry(registry));
    let turns = Arc::new(Semaphore::new(MAX_ENCODES));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let (encoded, turns) = (Arc::clone(&encoded), Arc::clone(&turns));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (encoded, turns) = (Arc::clone(&encoded), Arc::clone(&turns));
                async move { Ok::<_, Infallible>(respond(&req, encoded, turns).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    response
}

async fn respond<B>(req: &Request<B>, registry: Arc<Registry>, turns: Arc<Semaphore>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "try GET /metrics\n".into());
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "try GET /metrics\n".into(),
        );
    }
    if req.method() == Method::HEAD {
        return reply(StatusCode::OK, CONTENT_TYPE, String::new());
    }
    match encode(registry, turns).await {
        Some(body) => reply(StatusCode::OK, CONTENT_TYPE, body),
        None => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding the metrics failed\n".into(),
        ),
    }
}

/// The metrics text, encoded on the blocking pool; `None` if encoding failed.
async fn encode(registry: Arc<Registry>, turns: Arc<Semaphore>) -> Option<String> {
    // The semaphore is never closed.
    let turn = turns.acquire_owned().await.ok()?;
    let encoded = tokio::task::spawn_blocking(move || {
        let _turn = turn;
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, &registry).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => Some(body),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "encoding the metrics failed");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "encoding the metrics panicked");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::DescriptorEncoder;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc;

    /// A gauge whose read waits until the test lets it go, as a read under a lock that a
    /// slow fsync holds would; it records whether it was let go or gave up.
    #[derive(Debug)]
    struct WaitingGauge {
        go: Mutex<mpsc::Receiver<()>>,
        let_go: Arc<AtomicBool>,
    }

    impl Collector for WaitingGauge {
        fn encode(&self, _encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
            let go = self.go.lock().map_err(|_| std::fmt::Error)?;
            let let_go = go.recv_timeout(Duration::from_secs(5)).is_ok();
            self.let_go.store(let_go, Ordering::SeqCst);
            Ok(())
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_scrape_waiting_on_a_gauge_leaves_the_reactor_running() {
        let (go, wait) = mpsc::channel();
        let let_go = Arc::new(AtomicBool::new(false));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(WaitingGauge {
            go: Mutex::new(wait),
            let_go: Arc::clone(&let_go),
        }));
        let registry = Arc::new(registry);
        let turns = Arc::new(Semaphore::new(MAX_ENCODES));
        let scrape = {
            let turns = Arc::clone(&turns);
            tokio::spawn(async move { encode(registry, turns).await })
        };
        // The scrape runs first; this task, on the runtime's one thread, runs again before the
        // gauge gives up only if the scrape's wait is not on that thread.
        tokio::task::yield_now().await;
        go.send(()).expect("the gauge is waiting");
        let body = scrape.await.expect("scrape task");
        assert!(body.is_some(), "encoded");
        assert!(
            let_go.load(Ordering::SeqCst),
            "the gauge gave up waiting: the scrape held the reactor"
        );
        assert_eq!(turns.available_permits(), MAX_ENCODES, "the turn came back");
    }

    /// A gate the encodings wait at (blocking: they run on the blocking pool) until it opens.
    #[derive(Debug, Default)]
    struct Gate {
        open: Mutex<bool>,
        opened: std::sync::Condvar,
    }

    impl Gate {
        fn open(&self) {
            *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.opened.notify_all();
        }

        fn wait(&self) {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            drop(self.opened.wait_while(open, |open| !*open));
        }
    }

    /// A gauge that holds its encoding until the test opens its gate.
    #[derive(Debug)]
    struct HeldGauge {
        gate: Arc<Gate>,
    }

    impl Collector for HeldGauge {
        fn encode(&self, _encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
            self.gate.wait();
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_given_up_keeps_its_turn_until_its_encoding_ends() {
        let gate = Arc::new(Gate::default());
        // Opens the gate however the test ends, so that the runtime can stop.
        struct OpenOnDrop(Arc<Gate>);
        impl Drop for OpenOnDrop {
            fn drop(&mut self) {
                self.0.open();
            }
        }
        let _open = OpenOnDrop(Arc::clone(&gate));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HeldGauge {
            gate: Arc::clone(&gate),
        }));
        let registry = Arc::new(registry);
        let turns = Arc::new(Semaphore::new(MAX_ENCODES));
        // Scrapers that give up: their futures are dropped while the encodings run.
        for held in 1..=MAX_ENCODES {
            let scrape = tokio::spawn(encode(Arc::clone(&registry), Arc::clone(&turns)));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while turns.available_permits() > MAX_ENCODES - held {
                assert!(tokio::time::Instant::now() < deadline, "the scrape took no turn");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            scrape.abort();
            let _ = scrape.await;
        }
        assert_eq!(turns.available_permits(), 0, "both turns held by running encodings");
        gate.open();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while turns.available_permits() < MAX_ENCODES {
            assert!(tokio::time::Instant::now() < deadline, "turns not given back");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
