//! The gateway's server loop, for plain http and for https (`tls.rs`): HTTP/1.1 and
//! HTTP/2, no Nagle delay, graceful shutdown, a deadline on every request head, and an idle
//! timeout on open connections.
//!
//! A client that opens a connection and sends its request head slowly, or never finishes
//! it (slowloris), would otherwise hold a connection and a task for as long as it likes.
//! Here the head must arrive within `PALISADE_GATEWAY_HEADER_TIMEOUT` (10 s by default):
//! hyper's `header_read_timeout` on HTTP/1.1 (on tokio's clock), and the same deadline on
//! the first bytes that tell HTTP/1.1 from HTTP/2 and on the TLS handshake; and a
//! connection (HTTP/2 above all, which has no head deadline in hyper) that has not made a
//! whole first request by then is closed too.
//!
//! After its first request, a connection with no request in flight (none being read,
//! answered or streamed) for `PALISADE_GATEWAY_IDLE_TIMEOUT` (60 s by default) is closed
//! gracefully: an HTTP/2 client gets a GOAWAY, an HTTP/1.1 keep-alive connection is closed
//! between requests (sooner when the header timeout is shorter: hyper's head deadline also
//! covers the wait for the next request head). A client that answers HTTP/2 pings but never sends a request is thus
//! not kept forever, and a long stream is never cut, since it is in flight until its last
//! byte. An HTTP/1.1 answer given before its request's body was read to its end (a
//! refusal: no key, a rate limit, a budget, a body too large) says `connection: close`,
//! and the connection closes after it: hyper reads on only what of such a body has
//! already arrived. That close lingers: the write side is shut, and what the client still
//! sends is read and discarded (2 s and 16 MiB at most) before the socket closes, so that a
//! client still sending its body gets the answer rather than a reset.
//!
//! A client that stops reading mid-answer (slow read: a long stream, a large body) keeps
//! its request in flight, so the idle timeout never applies to it. When a response body
//! has a frame waiting to be written for `PALISADE_GATEWAY_WRITE_TIMEOUT` (30 s by
//! default) — over HTTP/1.1 with not a byte sent to the socket meanwhile, over HTTP/2
//! with the client's flow-control window closed — the connection is closed and its
//! response body (and upstream stream) dropped, so its usage is recorded as partial. Over
//! HTTP/1.1 this holds for a body's last frame too (a whole answer is one), which hyper
//! takes before it is written: the request stays in flight until the socket is flushed.
//! Over HTTP/2 a last frame handed to the connection is covered by the idle timeout. Each
//! connection's kernel send buffer is bounded (64 KiB) so that a client that reads slowly
//! but steadily (a few KiB a second) lets bytes through within the timeout and is not
//! cut; an upstream slow to answer leaves nothing waiting to be written and is not cut
//! either (the stream idle timeout covers it).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

/// What an HTTP/2 connection without TLS (prior knowledge) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The kernel send buffer of each connection (Linux doubles it): the client must read
/// a part of this within the write timeout for its response to be written on.
const SEND_BUFFER: usize = 64 * 1024;

/// How long a connection closing gracefully (idle, or at shutdown with nothing in flight)
/// may take to say goodbye before it is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// The server loop's deadlines.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A request head (and a TLS handshake, and a first request) must arrive within this.
    pub header: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle: Duration,
    /// A connection whose writes make no progress for this long is closed.
    pub write: Duration,
}

impl Timeouts {
    /// The deadlines the configuration names.
    pub fn from_config(config: &crate::config::GatewayConfig) -> Self {
        Self {
            header: config.header_timeout,
            idle: config.idle_timeout,
            write: config.write_timeout,
        }
    }
}

type Service = Tracked<TowerToHyperService<Router>>;

/// Serves `router` (over TLS when `tls` is set) until `stop` turns true, then waits for
/// open connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let router = match acceptor {
        Some(_) => router.layer(axum::middleware::map_request(crate::tls::mark_https)),
        None => router,
    };
    // Every connection task holds a sender; all of them dropped means all connections ended.
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Streamed answers are many small writes: without TCP_NODELAY, Nagle's algorithm
        // and the client's delayed ACK hold each one for about 40 ms.
        let _ = tcp.set_nodelay(true);
        // A bounded send buffer, so that a client that reads at all lets writes through
        // within the write timeout (the kernel would otherwise buffer up to megabytes,
        // and wake the writer only once much of them is read).
        let _ = socket2::SockRef::from(&tcp).set_send_buffer_size(SEND_BUFFER);
        let acceptor = acceptor.clone();
        let activity = Arc::new(Activity::new());
        let service = Tracked {
            inner: TowerToHyperService::new(router.clone()),
            activity: Arc::clone(&activity),
            peer,
        };
        let mut stop = stop.clone();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            let deadline = Instant::now() + timeouts.header;
            let result = match acceptor {
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => r,
                        // Shutdown: no request has begun here, nothing to finish.
                        () = stopped(&mut stop) => return,
                    };
                    let tls = match handshake {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    // ALPN has chosen the protocol: no preface to wait for.
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let builder = builder(timeouts.header, Some(h2));
                    let conn = builder.serve_connection_with_upgrades(
                        Watched::new(TokioIo::new(tls), &activity),
                        service,
                    );
                    drive(conn.into_owned(), &activity, deadline, timeouts, stop).await
                }
                None => {
                    let first_bytes = tokio::select! {
                        r = tokio::time::timeout_at(deadline, preface(&tcp)) => r,
                        () = stopped(&mut stop) => return,
                    };
                    if first_bytes.is_err() {
                        tracing::debug!(%peer, "no request head within the header timeout");
                        return;
                    }
                    let builder = builder(timeouts.header, None);
                    let conn = builder.serve_connection_with_upgrades(
                        Watched::new(TokioIo::new(tcp), &activity),
                        service,
                    );
                    drive(conn.into_owned(), &activity, deadline, timeouts, stop).await
                }
            };
            match result {
                Ok(Ended::Done) => {}
                Ok(Ended::NoRequest) => {
                    tracing::debug!(%peer, "no request within the header timeout");
                }
                Ok(Ended::Idle) => {
                    tracing::debug!(%peer, "connection idle for the idle timeout; closed");
                }
                Ok(Ended::WriteStalled) => {
                    tracing::debug!(%peer, "client read nothing for the write timeout; closed");
                }
                Err(e) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
            }
        });
    }
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
}

/// Ends when `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// How a connection ended.
enum Ended {
    /// The peer closed it, or it closed after a graceful shutdown.
    Done,
    /// No whole request arrived within the header timeout.
    NoRequest,
    /// Nothing was in flight for the idle timeout.
    Idle,
    /// A write waited for the write timeout without a byte sent (the client stopped
    /// reading).
    WriteStalled,
}

/// Runs one connection to its end: closed when no request came by `deadline`, closed
/// gracefully after `idle` with nothing in flight, closed at once when a write has made no
/// progress for the write timeout, and gracefully when `stop` turns true (in-flight
/// requests and streams finish; the caller bounds that wait).
async fn drive<I>(
    conn: auto::UpgradeableConnection<'static, Watched<I>, Service, TokioExecutor>,
    activity: &Activity,
    deadline: Instant,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) -> Result<Ended, palisade::BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut conn = std::pin::pin!(conn);
    let idle_close = tokio::select! {
        r = conn.as_mut() => return r.map(|()| Ended::Done),
        // Dropping the connection closes it: nothing is in flight on it.
        () = no_request_by(activity, deadline) => return Ok(Ended::NoRequest),
        // Dropping the connection drops the stalled response body (and its upstream
        // stream): its usage is recorded as partial.
        () = activity.write_stalled_for(timeouts.write) => return Ok(Ended::WriteStalled),
        () = activity.idle_for(timeouts.idle) => true,
        () = stopped(&mut stop) => false,
    };
    if !idle_close && !activity.seen.load(Ordering::Relaxed) {
        // Shutdown before a first request began (its head still arriving): nothing to
        // finish, and a graceful close would wait for that head up to the header timeout.
        return Ok(Ended::Done);
    }
    conn.as_mut().graceful_shutdown();
    if !idle_close {
        // Shutdown: in-flight requests and streams finish first, unless their client
        // stopped reading.
        return tokio::select! {
            r = conn => r.map(|()| Ended::Done),
            () = activity.write_stalled_for(timeouts.write) => Ok(Ended::WriteStalled),
        };
    }
    // Idle: nothing is in flight, so the goodbye is quick, unless the peer is gone silent.
    match tokio::time::timeout(CLOSE_GRACE, conn).await {
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) | Err(_) => Ok(Ended::Idle),
    }
}

/// One connection's requests: whether one has arrived, how many are in flight (from their
/// head to their response body's end), and since when none has been.
struct Activity {
    started: Instant,
    seen: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// Woken when the last request in flight ends.
    went_idle: Notify,
    /// Response bodies that gave a frame and have not been asked for the next one yet
    /// (by id), and since when: the frame waits for the client to read.
    unread: Mutex<Unread>,
    /// Woken when a body starts to wait.
    body_waiting: Notify,
    /// Milliseconds after `started` at which bytes last went to the socket.
    written_ms: AtomicU64,
    /// Whether `unread.ended` is not empty (read on every flush without the lock).
    ended: AtomicBool,
    /// Whether an answer was given before its request's body was read: the connection's
    /// close then lingers (see [`Linger`]).
    linger: AtomicBool,
}

/// See [`Activity::unread`].
#[derive(Default)]
struct Unread {
    next_id: u64,
    /// By body id: since when, and whether over HTTP/1 (where bytes written to the socket
    /// for any request show that the client reads). A few entries at most (one per body in
    /// flight), in a vector that keeps its room: no allocation per frame.
    since: Vec<(u64, Instant, bool)>,
    /// HTTP/1 bodies dropped with their last frame not yet written (a whole answer is one
    /// such frame): hyper drops a body as soon as it takes its last frame, and flushes the
    /// socket once all it holds is written, which ends their wait. Their requests stay in
    /// flight until then.
    ended: Vec<u64>,
}

impl Unread {
    /// Body `id` waits no more.
    fn remove(&mut self, id: u64) {
        if let Some(at) = self.since.iter().position(|(body, ..)| *body == id) {
            self.since.swap_remove(at);
        }
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            seen: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            went_idle: Notify::new(),
            unread: Mutex::new(Unread::default()),
            body_waiting: Notify::new(),
            written_ms: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            linger: AtomicBool::new(false),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.seen.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Ends once no request has been in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // `notify_one` keeps a permit when no one waits, so no wake-up is lost.
                self.went_idle.notified().await;
                continue;
            }
            let since =
                self.started + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
            let deadline = since + idle;
            if Instant::now() >= deadline {
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }

    fn unread(&self) -> std::sync::MutexGuard<'_, Unread> {
        self.unread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A new body's id.
    fn body_id(&self) -> u64 {
        let mut unread = self.unread();
        unread.next_id += 1;
        unread.next_id
    }

    /// Milliseconds since the connection started (the clock the deadlines are kept in).
    fn elapsed_ms(&self) -> u64 {
        self.started
            .elapsed()
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX)
    }

    /// Bytes went to the socket.
    fn written(&self) {
        self.written_ms
            .fetch_max(self.elapsed_ms(), Ordering::AcqRel);
    }

    /// Body `id` gave a frame: it waits until it is asked for the next one.
    fn body_gave_frame(&self, id: u64, http1: bool) {
        let now = Instant::now();
        {
            let mut unread = self.unread();
            match unread.since.iter_mut().find(|(body, ..)| *body == id) {
                Some(entry) => *entry = (id, now, http1),
                None => unread.since.push((id, now, http1)),
            }
        }
        self.body_waiting.notify_one();
    }

    /// Body `id` is asked for a frame (its last one was written).
    fn body_asked(&self, id: u64) {
        self.unread().remove(id);
    }

    /// Body `id` is gone: over HTTP/1 a frame it gave last may still wait to be written
    /// (until the next flush of the socket).
    fn body_dropped(&self, id: u64, http1: bool) {
        let mut unread = self.unread();
        if http1 && unread.since.iter().any(|(body, ..)| *body == id) {
            unread.ended.push(id);
            // In flight until written (the body's own guard drops after this).
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.ended.store(true, Ordering::Release);
        } else {
            unread.remove(id);
        }
    }

    /// The socket was flushed: over HTTP/1 everything the connection held is written.
    fn flushed(&self) {
        if self.ended.swap(false, Ordering::AcqRel) {
            let ended = {
                let mut unread = self.unread();
                let ended = std::mem::take(&mut unread.ended);
                for id in &ended {
                    unread.remove(*id);
                }
                ended
            };
            for _ in ended {
                self.end_request();
            }
        }
    }

    /// A request in flight ended (its response written, or given up).
    fn end_request(&self) {
        self.idle_since_ms
            .fetch_max(self.elapsed_ms(), Ordering::AcqRel);
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.went_idle.notify_one();
        }
    }

    /// Ends once a response body has waited `timeout` for its last frame to be written
    /// (over HTTP/2: the client's window stayed closed; over HTTP/1.1: not a byte went to
    /// the socket either, since hyper buffers a few frames): its client has stopped
    /// reading.
    async fn write_stalled_for(&self, timeout: Duration) {
        loop {
            let written =
                self.started + Duration::from_millis(self.written_ms.load(Ordering::Acquire));
            let oldest = self
                .unread()
                .since
                .iter()
                .map(|&(_, since, http1)| if http1 { since.max(written) } else { since })
                .min();
            let Some(since) = oldest else {
                // `notify_one` keeps a permit when no one waits, so no wake-up is lost.
                self.body_waiting.notified().await;
                continue;
            };
            let deadline = since + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A request in flight; dropped when its response body has ended (or was dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// The connection's service: each request is in flight from its head to its body's end.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The client's address, given to every request as a `SocketAddr` extension: the rate
    /// limiter keys anonymous callers by it (and reads `X-Forwarded-For` only from trusted
    /// proxies), so without it every anonymous client shared one bucket.
    peer: std::net::SocketAddr,
}

impl<S, R, B> hyper::service::Service<http::Request<R>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<ReadBody<R>>, Response = http::Response<B>>,
    R: http_body::Body,
{
    type Response = http::Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: http::Request<R>) -> Self::Future {
        req.extensions_mut().insert(self.peer);
        let guard = self.activity.begin();
        let http1 = req.version() < http::Version::HTTP_2;
        let read = Arc::new(AtomicBool::new(req.body().is_end_stream()));
        let req = req.map(|inner| ReadBody {
            inner,
            read: Arc::clone(&read),
        });
        TrackedFuture {
            inner: self.inner.call(req),
            guard: Some(guard),
            http1,
            read,
        }
    }
}

pin_project! {
    /// A request body, telling its request's future whether it was read to its end.
    pub struct ReadBody<R> {
        #[pin]
        inner: R,
        read: Arc<AtomicBool>,
    }
}

impl<R: http_body::Body> http_body::Body for ReadBody<R> {
    type Data = R::Data;
    type Error = R::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<R::Data>, R::Error>>> {
        let mut this = self.project();
        let poll = this.inner.as_mut().poll_frame(cx);
        let ended = match &poll {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            this.read.store(true, Ordering::Release);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The service's future, keeping its request in flight (and knowing whether its body
    /// was read to its end).
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
        http1: bool,
        // Whether the request's body was read to its end.
        read: Arc<AtomicBool>,
    }
}

impl<F, B, E> std::future::Future for TrackedFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        let guard = this.guard.take();
        let unread_body = *this.http1 && !this.read.load(Ordering::Acquire);
        Poll::Ready(res.map(|mut res| {
            // An HTTP/1.1 answer given before its request's body was read (a refusal: no
            // key, a rate limit, a budget, a body too large): hyper reads on only what of
            // that body has already arrived and otherwise closes the connection after the
            // answer. The answer says so, or the client would send its next request on a
            // connection about to close ("Server disconnected without sending a response").
            if unread_body && res.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                if let Some(guard) = &guard {
                    guard.0.linger.store(true, Ordering::Release);
                }
                res.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            res.map(|inner| {
                let id = guard.as_ref().map(|g| g.0.body_id()).unwrap_or_default();
                TrackedBody {
                    inner,
                    id,
                    http1: *this.http1,
                    _guard: guard,
                }
            })
        }))
    }
}

pin_project! {
    /// A response body, keeping its request in flight until it ends or is dropped, and
    /// telling the connection when a frame it gave has not been written yet.
    struct TrackedBody<B> {
        #[pin]
        inner: B,
        id: u64,
        http1: bool,
        _guard: Option<InFlight>,
    }

    impl<B> PinnedDrop for TrackedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(guard) = this._guard.as_ref() {
                guard.0.body_dropped(*this.id, *this.http1);
            }
        }
    }
}

impl<B> http_body::Body for TrackedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let activity = this._guard.as_ref().map(|g| &g.0);
        if let Some(activity) = activity {
            activity.body_asked(*this.id);
        }
        let poll = this.inner.poll_frame(cx);
        if let (Some(activity), Poll::Ready(Some(Ok(_)))) = (activity, &poll) {
            activity.body_gave_frame(*this.id, *this.http1);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A connection's socket, telling its [`Activity`] when bytes go through, and lingering
    /// at its close when an answer left a request body unread.
    struct Watched<I> {
        #[pin]
        io: I,
        activity: Arc<Activity>,
        lingering: Option<Linger>,
    }
}

impl<I> Watched<I> {
    fn new(io: I, activity: &Arc<Activity>) -> Self {
        Self {
            io,
            activity: Arc::clone(activity),
            lingering: None,
        }
    }
}

impl<I: hyper::rt::Read> hyper::rt::Read for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<I: hyper::rt::Read + hyper::rt::Write> hyper::rt::Write for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.written();
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let poll = this.io.poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.written();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let poll = this.io.poll_flush(cx);
        if matches!(poll, Poll::Ready(Ok(()))) {
            this.activity.flushed();
        }
        poll
    }

    /// Shuts the write side; after an answer given before its request's body was read, the
    /// close then lingers (see [`Linger`]).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut this = self.project();
        if this.lingering.is_none() {
            ready!(this.io.as_mut().poll_shutdown(cx))?;
            if !this.activity.linger.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            *this.lingering = Some(Linger::new());
        }
        let Some(linger) = this.lingering.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while linger.discarded < LINGER_BYTES && linger.until.as_mut().poll(cx).is_pending() {
            let mut buf = hyper::rt::ReadBuf::new(&mut linger.buf);
            match hyper::rt::Read::poll_read(this.io.as_mut(), cx, buf.unfilled()) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    linger.discarded += buf.filled().len();
                }
                // The end of the stream, or an error: nothing more will come.
                Poll::Ready(_) => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// How long a lingering close reads on, at most.
const LINGER: Duration = Duration::from_secs(2);

/// How many bytes a lingering close discards, at most.
const LINGER_BYTES: usize = 16 * 1024 * 1024;

/// A lingering close: after an HTTP/1.1 answer given before its request's body was read (a
/// refusal), the connection's write side is shut, then what the client still sends is read
/// and discarded until it ends its side, for [`LINGER`] and [`LINGER_BYTES`] at most,
/// before the socket is closed. Closing a socket with unread bytes (or bytes still
/// arriving) answers them with a reset, which a client still sending its body meets on its
/// next write, before it reads the answer waiting for it.
struct Linger {
    until: Pin<Box<tokio::time::Sleep>>,
    discarded: usize,
    buf: Box<[u8]>,
}

impl Linger {
    fn new() -> Self {
        Self {
            until: Box::pin(tokio::time::sleep(LINGER)),
            discarded: 0,
            buf: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }
}

/// Ends at `deadline` if no request has been seen by then; otherwise never.
async fn no_request_by(activity: &Activity, deadline: Instant) {
    tokio::time::sleep_until(deadline).await;
    if activity.seen.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
}
/// A connection builder: HTTP/1.1 with the header deadline, HTTP/2, or either (`None`:
/// told apart by the first bytes).
fn builder(header_timeout: Duration, h2: Option<bool>) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    // HTTP/2 has no head deadline after the first request: a peer that stops answering
    // (not even pings) is closed after a ping unanswered for another `header_timeout`.
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_timeout)
        .keep_alive_timeout(header_timeout);
    match h2 {
        Some(true) => b.http2_only(),
        Some(false) => b.http1_only(),
        None => b,
    }
}

/// Waits until the first bytes tell HTTP/1.1 from HTTP/2 (what hyper's detection reads
/// without a deadline of its own): 24 bytes, bytes that are not the HTTP/2 preface, or
/// the end of the stream.
async fn preface(tcp: &TcpStream) {
    let mut buf = [0u8; 24];
    loop {
        match tcp.peek(&mut buf).await {
            Ok(n) if n > 0 && n < buf.len() && buf[..n] == H2_PREFACE[..n] => {
                // A prefix of the preface so far: wait for more (peek does not consume).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ => return,
        }
    }
}
