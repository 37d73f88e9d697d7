//! Admission of produce messages against the broker's queued-bytes budget (`[limits]
//! produce_queue_bytes`), before tonic reads them.
//!
//! tonic buffers a whole message before a handler sees it, so a bound checked in the
//! handler comes too late: a thousand concurrent 16 MiB requests would already be 16 GB.
//! [`Admission`] wraps the `Produce` service at the HTTP level and wraps each request's body
//! in an [`AdmittedBody`], which reads each message's gRPC length prefix (5 bytes), takes
//! that many bytes from the budget, and only then passes the message on. Until it has the
//! share it reads nothing more from the connection, so the client's bytes stay behind
//! HTTP/2 flow control (at most the stream and connection windows, see `server.rs`). This
//! holds for any client, since it looks only at the wire format.
//!
//! - A unary `Produce` waits at most [`crate::byte_budget::MAX_WAIT`] and is then answered
//!   `BUSY` (RESOURCE_EXHAUSTED, retriable) without its body being read.
//! - A `ProduceStream` waits as long as it takes: its client is held by flow control and
//!   sends on once earlier appends are answered.
//!
//! Once a message holds its share, its body must keep arriving (see [`BodyDeadline`]); when it
//! stalls the body yields an error, tonic drops the request and the share comes back. So a
//! client that sends a prefix and then nothing (or whose host died) cannot hold the budget.
//! A unary request's deadline lasts until its body ends, since tonic answers only then.
//!
//! Shares are handed to the handler in message order through [`Admitted`] (a request
//! extension); the handler moves each into the appends of its message, which return it when
//! they are answered. A share nobody took is returned when the request is dropped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Sleep;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::byte_budget::{Acquiring, ByteBudget, Reservation};

/// gRPC framing: a compressed flag, then the message's length as a big-endian `u32`.
const PREFIX_LEN: usize = 5;

/// The shares of a request's messages, in the order their prefixes were read; the handler
/// takes one for each message it decodes.
#[derive(Debug, Clone, Default)]
pub struct Admitted(Arc<Mutex<VecDeque<Reservation>>>);

impl Admitted {
    /// The admission of `request` (none for a request that did not pass through
    /// [`Admission`], such as one made in a unit test).
    pub fn of<T>(request: &tonic::Request<T>) -> Admitted {
        request.extensions().get::<Admitted>().cloned().unwrap_or_default()
    }

    /// The share of the next message decoded.
    pub fn next(&self) -> Reservation {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
            .unwrap_or_default()
    }

    fn push(&self, share: Reservation) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push_back(share);
    }
}

/// How long an admitted message's body may go without progress: `grace` plus the rest of its
/// length at `min_rate` bytes per second, counted from the message's admission and again from
/// each piece of it that arrives (`[limits] produce_body_timeout`, `produce_body_min_rate`).
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadline {
    pub grace: Duration,
    pub min_rate: u64,
}

impl BodyDeadline {
    fn for_message(&self, len: usize) -> Duration {
        let transfer = Duration::from_secs_f64(len as f64 / self.min_rate.max(1) as f64);
        self.grace.saturating_add(transfer)
    }
}

/// The `Produce` service behind the broker's queued-bytes budget (see the module docs).
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    budget: Arc<ByteBudget>,
    /// tonic refuses a message above this after reading only its prefix; it takes no share.
    max_message: usize,
    deadline: BodyDeadline,
}

impl<S> Admission<S> {
    pub fn new(inner: S, budget: Arc<ByteBudget>, max_message: usize, deadline: BodyDeadline) -> Admission<S> {
        Admission {
            inner,
            budget,
            max_message,
            deadline,
        }
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Admission<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // Only the stream may wait without end; every other method is answered in time.
        let stream = request.uri().path().ends_with("/ProduceStream");
        let wait = (!stream).then(|| self.budget.max_wait());
        let admitted = Admitted::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(admitted.clone());
        let body = AdmittedBody::new(body, Arc::clone(&self.budget), wait, self.max_message, admitted)
            .with_deadline(self.deadline);
        self.inner.call(http::Request::from_parts(parts, Body::new(body)))
    }
}

/// A request body that passes each message on only once the budget holds its share.
pub struct AdmittedBody<B> {
    inner: B,
    budget: Arc<ByteBudget>,
    wait: Option<Duration>,
    max_message: usize,
    admitted: Admitted,
    /// Bytes of the current message's body still to pass on.
    remaining: usize,
    /// The next message's prefix, as far as it has arrived.
    prefix: Vec<u8>,
    /// The share of the message whose prefix was read, while the budget has not granted it.
    acquiring: Option<Acquiring>,
    /// Read from `inner` and not passed on yet: at most one HTTP/2 DATA frame.
    read: Bytes,
    /// The body ended, failed or was refused: nothing more follows.
    done: bool,
    deadline: Option<BodyDeadline>,
    /// While a message holds a share and its body (for unary, the request's body) has not
    /// fully arrived: when it fires, the request fails and the share comes back.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<B> std::fmt::Debug for AdmittedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittedBody")
            .field("remaining", &self.remaining)
            .field("waiting", &self.acquiring.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> AdmittedBody<B> {
    pub fn new(
        inner: B,
        budget: Arc<ByteBudget>,
        wait: Option<Duration>,
        max_message: usize,
        admitted: Admitted,
    ) -> AdmittedBody<B> {
        AdmittedBody {
            inner,
            budget,
            wait,
            max_message,
            admitted,
            remaining: 0,
            prefix: Vec::with_capacity(PREFIX_LEN),
            acquiring: None,
            read: Bytes::new(),
            done: false,
            deadline: None,
            timer: None,
        }
    }

    /// Fails the request when an admitted message's body does not arrive in time.
    pub fn with_deadline(mut self, deadline: BodyDeadline) -> AdmittedBody<B> {
        self.deadline = Some(deadline);
        self
    }
}

impl<B> HttpBody for AdmittedBody<B>
where
    B: HttpBody<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(acquiring) = this.acquiring.as_mut() {
                let granted = ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                match granted {
                    Ok(share) => {
                        let len = u32::from_be_bytes([this.prefix[1], this.prefix[2], this.prefix[3], this.prefix[4]]);
                        if share.bytes() > 0
                            && let Some(deadline) = this.deadline
                            && this.timer.is_none()
                        {
                            this.timer = Some(Box::pin(tokio::time::sleep(deadline.for_message(len as usize))));
                        }
                        this.admitted.push(share);
                        this.remaining = len as usize;
                        let prefix = Bytes::from(std::mem::take(&mut this.prefix));
                        return Poll::Ready(Some(Ok(Frame::data(prefix))));
                    }
                    Err(busy) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(busy.into())));
                    }
                }
            }
            if !this.read.is_empty() {
                if this.remaining > 0 {
                    let out = this.read.split_to(this.remaining.min(this.read.len()));
                    this.remaining -= out.len();
                    // A stream's message is whole: what follows may wait as long as it likes.
                    if this.remaining == 0 && this.wait.is_none() {
                        this.timer = None;
                    } else if let (Some(timer), Some(deadline)) = (this.timer.as_mut(), this.deadline) {
                        // Progress re-arms the deadline for what is left: HTTP/2 shares the
                        // link between streams, so a healthy client's message may take longer
                        // than its length at the minimum rate, but it keeps arriving.
                        let left = deadline.for_message(this.remaining);
                        timer.as_mut().reset(tokio::time::Instant::now() + left);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                let take = (PREFIX_LEN - this.prefix.len()).min(this.read.len());
                this.prefix.extend_from_slice(&this.read.split_to(take));
                if this.prefix.len() == PREFIX_LEN {
                    let len =
                        u32::from_be_bytes([this.prefix[1], this.prefix[2], this.prefix[3], this.prefix[4]]) as usize;
                    // tonic refuses a message above its limit as soon as it sees the prefix.
                    let share = if len > this.max_message { 0 } else { len };
                    let what = move || format!("a produce message of {len} bytes");
                    this.acquiring = Some(this.budget.acquire(share, this.wait, what));
                }
                continue;
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending()
                && let Some(timer) = this.timer.as_mut()
            {
                ready!(timer.as_mut().poll(cx));
                this.done = true;
                this.timer = None;
                return Poll::Ready(Some(Err(Status::deadline_exceeded(
                    "the produce message's body stalled: nothing more of it arrived within [limits] \
                     produce_body_timeout plus the rest of its length at produce_body_min_rate; its share \
                     of produce_queue_bytes is returned",
                ))));
            }
            match ready!(polled) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.read = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => {
                    this.done = true;
                    this.timer = None;
                    // A cut-off prefix goes on as it came, for tonic to report.
                    if !this.prefix.is_empty() {
                        let prefix = Bytes::from(std::mem::take(&mut this.prefix));
                        return Poll::Ready(Some(Ok(Frame::data(prefix))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
            || (self.read.is_empty()
                && self.prefix.is_empty()
                && self.acquiring.is_none()
                && self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::byte_budget::MAX_WAIT;
    use conveyor_proto::v1::{ErrorCode, ErrorDetail};
    use prost::Message;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A body of given frames that counts how many were read.
    struct Frames {
        frames: VecDeque<Bytes>,
        read: Arc<AtomicUsize>,
        /// After the frames, wait forever (a client that stalled) rather than end.
        stall: bool,
    }

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            let next = self.frames.pop_front();
            if next.is_some() {
                self.read.fetch_add(1, Ordering::SeqCst);
            } else if self.stall {
                return Poll::Pending;
            }
            Poll::Ready(next.map(|f| Ok(Frame::data(f))))
        }
    }

    fn message(len: usize, fill: u8) -> Vec<u8> {
        let mut out = vec![0u8];
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend(std::iter::repeat_n(fill, len));
        out
    }

    fn body(
        frames: Vec<Vec<u8>>,
        budget: &Arc<ByteBudget>,
        wait: Option<Duration>,
    ) -> (AdmittedBody<Frames>, Admitted, Arc<AtomicUsize>) {
        let read = Arc::new(AtomicUsize::new(0));
        let admitted = Admitted::default();
        let inner = Frames {
            frames: frames.into_iter().map(Bytes::from).collect(),
            read: Arc::clone(&read),
            stall: false,
        };
        let body = AdmittedBody::new(inner, Arc::clone(budget), wait, 64 << 20, admitted.clone());
        (body, admitted, read)
    }

    async fn next_frame(body: &mut AdmittedBody<Frames>) -> Option<Result<Bytes, Status>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx))
            .await
            .map(|f| f.map(|f| f.into_data().unwrap_or_default()))
    }

    async fn read_all(body: &mut AdmittedBody<Frames>) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(frame) = next_frame(body).await {
            out.extend_from_slice(&frame.expect("data"));
        }
        out
    }

    #[tokio::test]
    async fn each_message_takes_its_share_from_its_prefix_even_when_frames_split_it() {
        let budget = Arc::new(ByteBudget::new(1 << 20, MAX_WAIT, "produce queue memory"));
        let (first, second) = (message(4 << 10, 1), message(2 << 10, 2));
        let wire: Vec<u8> = [first.clone(), second.clone()].concat();
        // Split inside the first prefix, and so that the second prefix straddles two frames.
        let cut = first.len() + 2;
        let frames = vec![wire[..3].to_vec(), wire[3..cut].to_vec(), wire[cut..].to_vec()];
        let (mut body, admitted, _) = body(frames, &budget, None);
        assert_eq!(read_all(&mut body).await, wire, "the bytes pass on unchanged");
        assert_eq!(budget.held(), 6 << 10, "both messages hold their share");
        let one = admitted.next();
        let two = admitted.next();
        assert_eq!((one.bytes(), two.bytes()), (4 << 10, 2 << 10), "in message order");
        drop(body);
        drop(one);
        assert_eq!(
            budget.held(),
            2 << 10,
            "a share stays with its message, not the request"
        );
        drop(two);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn a_unary_message_that_finds_the_budget_full_is_answered_busy_without_reading_its_body() {
        let budget = Arc::new(ByteBudget::new(1 << 20, MAX_WAIT, "produce queue memory"));
        let full = budget.reserve(1 << 20, || "others".into()).await.expect("fits");
        let wire = message(256 << 10, 3);
        let frames = vec![wire[..16 << 10].to_vec(), wire[16 << 10..].to_vec()];
        let (mut body, admitted, read) = body(frames, &budget, Some(Duration::from_millis(50)));
        let status = next_frame(&mut body).await.expect("an answer").expect_err("busy");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        let detail = ErrorDetail::decode(status.details()).expect("detail");
        assert_eq!(detail.code, ErrorCode::Busy as i32);
        assert!(detail.retriable, "{detail:?}");
        assert!(detail.message.contains("produce queue memory"), "{}", detail.message);
        assert_eq!(
            read.load(Ordering::SeqCst),
            1,
            "only the frame with the prefix was read"
        );
        assert!(next_frame(&mut body).await.is_none(), "nothing after the answer");
        assert_eq!(admitted.next().bytes(), 0, "no share was taken");
        drop(full);
    }

    #[tokio::test]
    async fn a_stream_message_waits_for_its_share_reading_nothing_more_then_passes_on() {
        let budget = Arc::new(ByteBudget::new(
            1 << 20,
            Duration::from_millis(20),
            "produce queue memory",
        ));
        let full = budget.reserve(1 << 20, || "others".into()).await.expect("fits");
        let wire = message(512 << 10, 4);
        let frames = vec![wire[..16 << 10].to_vec(), wire[16 << 10..].to_vec()];
        let (mut body, admitted, read) = body(frames, &budget, None);
        let waited = tokio::time::timeout(Duration::from_millis(200), next_frame(&mut body)).await;
        assert!(
            waited.is_err(),
            "a stream waits past the bounded wait rather than failing"
        );
        assert_eq!(read.load(Ordering::SeqCst), 1, "nothing more is read while it waits");
        drop(full);
        assert_eq!(read_all(&mut body).await, wire);
        assert_eq!(admitted.next().bytes(), 512 << 10);
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn an_admitted_message_whose_body_stalls_fails_at_its_deadline_and_returns_its_share() {
        let budget = Arc::new(ByteBudget::new(1 << 20, MAX_WAIT, "produce queue memory"));
        let deadline = BodyDeadline {
            grace: Duration::from_millis(100),
            min_rate: 5 << 20,
        };
        for wait in [None, Some(MAX_WAIT)] {
            // The prefix declares 512 KiB; only 1 KiB of it comes, then silence.
            let wire = message(512 << 10, 5);
            let admitted = Admitted::default();
            let inner = Frames {
                frames: VecDeque::from([Bytes::copy_from_slice(&wire[..1 << 10])]),
                read: Arc::new(AtomicUsize::new(0)),
                stall: true,
            };
            let mut body =
                AdmittedBody::new(inner, Arc::clone(&budget), wait, 64 << 20, admitted.clone()).with_deadline(deadline);
            let started = std::time::Instant::now();
            let mut passed = 0;
            let failed = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match next_frame(&mut body).await.expect("no end") {
                        Ok(data) => passed += data.len(),
                        Err(status) => break status,
                    }
                }
            });
            let status = failed.await.expect("a stalled body fails at its deadline");
            assert_eq!(passed, 1 << 10, "what came passed on");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            assert!(status.message().contains("produce_body_timeout"), "{status:?}");
            // 100 ms grace plus 512 KiB at 5 MiB/s.
            assert!(
                started.elapsed() >= Duration::from_millis(200),
                "{:?}",
                started.elapsed()
            );
            assert!(next_frame(&mut body).await.is_none(), "nothing after the error");
            // tonic drops the failed request: its extension and body go, and the share with them.
            drop(body);
            drop(admitted);
            assert_eq!(budget.held(), 0, "{wait:?}");
        }
    }

    /// A body whose frames arrive one every `every`, as over a link shared with other streams.
    struct Trickle {
        frames: VecDeque<Bytes>,
        every: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }

    impl HttpBody for Trickle {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if self.frames.is_empty() {
                return Poll::Ready(None);
            }
            let every = self.every;
            let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
            ready!(sleep.as_mut().poll(cx));
            self.sleep = None;
            Poll::Ready(self.frames.pop_front().map(|f| Ok(Frame::data(f))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_arriving_outlasts_its_whole_length_deadline() {
        let budget = Arc::new(ByteBudget::new(1 << 20, MAX_WAIT, "produce queue memory"));
        // 64 KiB at 1 MiB/s plus 60 ms: about 120 ms for the whole message, while its pieces
        // come every 40 ms for 360 ms.
        let deadline = BodyDeadline {
            grace: Duration::from_millis(60),
            min_rate: 1 << 20,
        };
        let wire = message(64 << 10, 8);
        let inner = Trickle {
            frames: wire.chunks(8 << 10).map(Bytes::copy_from_slice).collect(),
            every: Duration::from_millis(40),
            sleep: None,
        };
        let admitted = Admitted::default();
        let mut body =
            AdmittedBody::new(inner, Arc::clone(&budget), None, 64 << 20, admitted.clone()).with_deadline(deadline);
        let started = tokio::time::Instant::now();
        let mut out = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let frame = frame.expect("a body that keeps arriving is not cut off");
            out.extend_from_slice(&frame.into_data().unwrap_or_default());
        }
        assert!(
            started.elapsed() > Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(out, wire);
    }

    #[tokio::test]
    async fn a_stream_whose_message_arrived_whole_may_then_stay_silent() {
        let budget = Arc::new(ByteBudget::new(1 << 20, MAX_WAIT, "produce queue memory"));
        let deadline = BodyDeadline {
            grace: Duration::from_millis(20),
            min_rate: 1 << 20,
        };
        let wire = message(4 << 10, 6);
        let inner = Frames {
            frames: VecDeque::from([Bytes::from(wire.clone())]),
            read: Arc::new(AtomicUsize::new(0)),
            stall: true,
        };
        let mut body =
            AdmittedBody::new(inner, Arc::clone(&budget), None, 64 << 20, Admitted::default()).with_deadline(deadline);
        let mut passed = Vec::new();
        while passed.len() < wire.len() {
            passed.extend_from_slice(&next_frame(&mut body).await.expect("data").expect("data"));
        }
        let silent = tokio::time::timeout(Duration::from_millis(300), next_frame(&mut body)).await;
        assert!(
            silent.is_err(),
            "an idle stream between messages is not failed: {silent:?}"
        );
    }
}
