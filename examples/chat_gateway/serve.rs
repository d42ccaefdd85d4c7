//! The gateway's server loop, for plain http and for https (`tls.rs`): HTTP/1.1 and
//! HTTP/2, no Nagle delay, graceful shutdown, and a deadline on every request head.
//!
//! A client that opens a connection and sends its request head slowly, or never finishes
//! it (slowloris), would otherwise hold a connection and a task for as long as it likes.
//! Here the head must arrive within `PALISADE_GATEWAY_HEADER_TIMEOUT` (10 s by default):
//! hyper's `header_read_timeout` on HTTP/1.1 (on tokio's clock), and the same deadline on
//! the first bytes that tell HTTP/1.1 from HTTP/2 and on the TLS handshake; and a
//! connection (HTTP/2 above all, which has no head deadline in hyper) that has not made a
//! whole first request by then is closed too. After it, the connection is closed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;

/// What an HTTP/2 connection without TLS (prior knowledge) starts with.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `router` (over TLS when `tls` is set) until `stop` turns true, then waits for
/// open connections to finish their requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<ServerConfig>>,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    let router = match acceptor {
        Some(_) => router.layer(axum::middleware::map_request(crate::tls::mark_https)),
        None => router,
    };
    let graceful = GracefulShutdown::new();
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
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        // Streamed answers are many small writes: without TCP_NODELAY, Nagle's algorithm
        // and the client's delayed ACK hold each one for about 40 ms.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let seen = Arc::new(AtomicBool::new(false));
        let service = FirstRequest {
            inner: TowerToHyperService::new(router.clone()),
            seen: Arc::clone(&seen),
        };
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + header_timeout;
            let result = match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
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
                    let builder = builder(header_timeout, Some(h2));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    let conn = watcher.watch(conn.into_owned());
                    tokio::select! {
                        r = conn => r,
                        () = no_request_by(&seen, deadline) => {
                            tracing::debug!(%peer, "no request within the header timeout");
                            return;
                        }
                    }
                }
                None => {
                    if tokio::time::timeout_at(deadline, preface(&tcp))
                        .await
                        .is_err()
                    {
                        tracing::debug!(%peer, "no request head within the header timeout");
                        return;
                    }
                    let builder = builder(header_timeout, None);
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    let conn = watcher.watch(conn.into_owned());
                    tokio::select! {
                        r = conn => r,
                        () = no_request_by(&seen, deadline) => {
                            tracing::debug!(%peer, "no request within the header timeout");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The connection's service, noting that a whole request head has arrived.
#[derive(Clone)]
struct FirstRequest<S> {
    inner: S,
    seen: Arc<AtomicBool>,
}

impl<S, R> hyper::service::Service<R> for FirstRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.seen.store(true, Ordering::Relaxed);
        self.inner.call(req)
    }
}

/// Ends at `deadline` if no request has been seen by then; otherwise never. Dropping the
/// connection then closes it: nothing is in flight on it.
async fn no_request_by(seen: &AtomicBool, deadline: tokio::time::Instant) {
    tokio::time::sleep_until(deadline).await;
    if seen.load(Ordering::Relaxed) {
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
