//! Open connections with nothing in flight, against the gateway's server loop over real
//! sockets on 127.0.0.1: an HTTP/2 client that answers every ping but sends no request
//! and an HTTP/1.1 keep-alive connection between requests are closed once
//! `PALISADE_GATEWAY_IDLE_TIMEOUT` passes; a request or a stream that lasts longer than
//! that is in flight, and is never cut. Tokio's paused clock makes the waits instant.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::time::Duration;

use http::Method;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use fixture::{Gateway, NO_RETRIES, TLS_CERT, TLS_KEY, USER};
use sse_upstream::slow_stream_upstream;

/// The gateway on its own server loop, idle timeout 30 s, with `vars` on top.
async fn start(vars: &[(&str, &str)]) -> Gateway {
    let base = fixture::with(NO_RETRIES, &[("PALISADE_GATEWAY_IDLE_TIMEOUT", "30s")]);
    let config = fixture::config(&fixture::with(&base, vars));
    assert_eq!(config.idle_timeout, Duration::from_secs(30));
    fixture::serve_own(config).await
}

const PING: u8 = 6;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;
const ACK: u8 = 1;

/// An HTTP/2 frame's header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The preface and an empty SETTINGS frame, then `GET /health` on stream 1 (HEADERS with
/// END_STREAM | END_HEADERS; HPACK: indexed :method GET and :scheme, literal :path and
/// :authority).
fn h2_hello_and_one_request(scheme_https: bool) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut block = vec![0x82, if scheme_https { 0x87 } else { 0x86 }, 0x04, 7];
    block.extend_from_slice(b"/health");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"127.0.0.1");
    out.extend(frame(1, 0x05, 1, &block));
    out
}

/// What a polite but idle HTTP/2 client saw before the server closed the connection.
#[derive(Debug, Default)]
struct Seen {
    pings_answered: usize,
    goaway: bool,
    /// When the connection closed, from the start; `None` if still open at 300 s.
    closed_after: Option<Duration>,
}

/// Reads frames until the server closes the connection, acknowledging every SETTINGS and
/// PING as a live client does, and sending nothing else.
async fn answer_pings_until_closed<S>(io: &mut S, start: Instant) -> Seen
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut seen = Seen::default();
    let ended = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let mut head = [0u8; 9];
            if io.read_exact(&mut head).await.is_err() {
                return;
            }
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return;
            }
            let answer = match kind {
                SETTINGS if flags & ACK == 0 => Some(frame(SETTINGS, ACK, 0, &[])),
                PING if flags & ACK == 0 => {
                    seen.pings_answered += 1;
                    Some(frame(PING, ACK, 0, &payload))
                }
                GOAWAY => {
                    seen.goaway = true;
                    None
                }
                _ => None,
            };
            if let Some(answer) = answer
                && io.write_all(&answer).await.is_err()
            {
                return;
            }
        }
    })
    .await;
    seen.closed_after = ended.ok().map(|()| start.elapsed());
    seen
}

fn assert_closed_at_the_idle_timeout(seen: &Seen) {
    assert!(seen.pings_answered > 0, "the server pinged: {seen:?}");
    assert!(seen.goaway, "closed gracefully, with a GOAWAY: {seen:?}");
    assert!(
        seen.closed_after
            .is_some_and(|w| (Duration::from_secs(30)..Duration::from_secs(36)).contains(&w)),
        "an idle HTTP/2 connection that answers pings: {seen:?}"
    );
}

/// The client makes one request, then answers the server's pings (every 10 s, the header
/// timeout) and does nothing else: held forever before the idle timeout existed.
#[tokio::test(start_paused = true)]
async fn an_http2_client_that_answers_pings_but_sends_nothing_is_closed_after_the_idle_timeout() {
    let gw = start(&[]).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(&h2_hello_and_one_request(false))
        .await
        .unwrap();
    let seen = answer_pings_until_closed(&mut tcp, Instant::now()).await;
    assert_closed_at_the_idle_timeout(&seen);
}

/// The same over TLS, where ALPN has chosen h2.
#[tokio::test(start_paused = true)]
async fn an_h2_tls_client_that_answers_pings_but_sends_nothing_is_closed_after_the_idle_timeout() {
    let gw = start(&[
        ("PALISADE_GATEWAY_TLS_CERT", TLS_CERT),
        ("PALISADE_GATEWAY_TLS_KEY", TLS_KEY),
    ])
    .await;
    let connector =
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(fixture::tls_client_config(&[b"h2"])));
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(&h2_hello_and_one_request(true))
        .await
        .unwrap();
    let seen = answer_pings_until_closed(&mut tls, Instant::now()).await;
    assert_closed_at_the_idle_timeout(&seen);
}

/// After a first answer, a keep-alive connection that sends nothing more, under a header
/// timeout longer than the idle timeout: the idle timeout closes it.
#[tokio::test(start_paused = true)]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let gw = start(&[("PALISADE_GATEWAY_HEADER_TIMEOUT", "120s")]).await;
    let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let start = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(300), async {
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .ok()
    .map(|()| start.elapsed());
    assert!(
        closed.is_some_and(|w| (Duration::from_secs(30)..Duration::from_secs(31)).contains(&w)),
        "an idle keep-alive connection closed after {closed:?}"
    );
}

/// A stream of 100 s (an event every 20 s) through a gateway whose idle timeout is 30 s:
/// delivered whole, since it is in flight to its last byte.
#[tokio::test(start_paused = true)]
async fn a_stream_longer_than_the_idle_timeout_is_delivered_whole() {
    let upstream = slow_stream_upstream(5, Duration::from_secs(20)).await;
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", upstream.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
    ])
    .await;
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    let start = Instant::now();
    let r = gw
        .call(Method::POST, "/v1/messages", Some(USER), Some(body), &[])
        .await;
    let text = r.text();
    assert_eq!(r.status, 200, "{text}");
    assert!(
        start.elapsed() >= Duration::from_secs(100),
        "{:?}",
        start.elapsed()
    );
    for i in 0..5 {
        assert!(text.contains(&format!("part {i} ")), "{text}");
    }
    assert!(text.contains("event: message_stop"), "{text}");
}

/// An upstream that waits 50 s between events, under a 10 s write timeout: the client
/// waits and reads, nothing waits to be written, so the stream is not cut.
#[tokio::test(start_paused = true)]
async fn an_upstream_slower_than_the_write_timeout_is_not_cut() {
    let upstream = slow_stream_upstream(3, Duration::from_secs(50)).await;
    let gw = start(&[
        ("ANTHROPIC_BASE_URL", upstream.as_str()),
        ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ("PALISADE_GATEWAY_WRITE_TIMEOUT", "10s"),
    ])
    .await;
    let mut body = fixture::chat("claude-sonnet-4-5");
    body["stream"] = serde_json::Value::Bool(true);
    let r = gw
        .call(Method::POST, "/v1/messages", Some(USER), Some(body), &[])
        .await;
    let text = r.text();
    assert_eq!(r.status, 200, "{text}");
    for i in 0..3 {
        assert!(text.contains(&format!("part {i} ")), "{text}");
    }
    assert!(text.contains("event: message_stop"), "{text}");
}

/// A request whose answer takes 100 s to start (the mock's slow model) under a 30 s idle
/// timeout: answered, not closed while it waits.
#[tokio::test(start_paused = true)]
async fn a_request_slower_than_the_idle_timeout_is_answered() {
    let gw = start(&[("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "100s")]).await;
    let start = Instant::now();
    let r = gw.chat(USER, "mock-slow").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        start.elapsed() >= Duration::from_secs(100),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_zero_or_malformed_idle_timeout_is_reported() {
    for bad in ["0s", "soon"] {
        let mut env = palisade::config::Env::from_pairs([("PALISADE_GATEWAY_IDLE_TIMEOUT", bad)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert!(
            err.problems()
                .iter()
                .any(|p| p.name == "PALISADE_GATEWAY_IDLE_TIMEOUT"),
            "{bad}: {err}"
        );
    }
}

/// Shutdown does not wait for connections that have not begun a request: one that sent
/// nothing yet (plain) and one that has not begun its TLS handshake.
#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_connections_that_sent_nothing() {
    for tls in [false, true] {
        let mut vars = vec![];
        if tls {
            vars.push(("PALISADE_GATEWAY_TLS_CERT", TLS_CERT));
            vars.push(("PALISADE_GATEWAY_TLS_KEY", TLS_KEY));
        }
        let (gw, server) = fixture::serve_own_stoppable(fixture::config(&vars)).await;
        let _silent = TcpStream::connect(gw.addr).await.unwrap();
        // Let the server accept it.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let start = Instant::now();
        server.shutdown().await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "tls {tls}: {:?}",
            start.elapsed()
        );
    }
}
