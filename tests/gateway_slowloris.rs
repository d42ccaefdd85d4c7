//! Slow clients against the gateway's server loop over real sockets on 127.0.0.1: a
//! request head that never finishes (slowloris), a prefix of the HTTP/2 preface and a TLS
//! handshake that never starts are closed once `PALISADE_GATEWAY_HEADER_TIMEOUT` passes,
//! not before. Tokio's paused clock makes the wait instant and exact.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use std::net::SocketAddr;
use std::time::Duration;

use palisade::config::Env;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use fixture::{TLS_CERT, TLS_KEY};

/// Starts the gateway with a header timeout of 10 s (from the environment), over TLS when
/// asked.
async fn start(tls: bool) -> SocketAddr {
    let mut vars = vec![("PALISADE_GATEWAY_HEADER_TIMEOUT", "10s")];
    if tls {
        vars.push(("PALISADE_GATEWAY_TLS_CERT", TLS_CERT));
        vars.push(("PALISADE_GATEWAY_TLS_KEY", TLS_KEY));
    }
    let config = fixture::config(&vars);
    assert_eq!(config.header_timeout, Duration::from_secs(10));
    fixture::serve_own(config).await.addr
}

/// Sends `bytes`, then asserts the connection stays open for 9 s and is closed (with no
/// answer, or a refusal) by 10 s.
async fn closed_at_the_header_timeout(addr: SocketAddr, bytes: &[u8]) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(bytes).await.unwrap();
    let mut buf = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_secs(9), tcp.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the connection answered or closed before the timeout: {early:?}"
    );
    let mut got = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open 14 s after a half-sent head");
    let waited = start.elapsed();
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(11)).contains(&waited),
        "closed after {waited:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        !text.contains(" 200 "),
        "a half-sent request was answered: {text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_head_that_never_ends_is_closed_after_the_header_timeout() {
    let addr = start(false).await;
    closed_at_the_header_timeout(
        addr,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a",
    )
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_few_bytes_of_a_request_line_are_closed_after_the_header_timeout() {
    let addr = start(false).await;
    closed_at_the_header_timeout(addr, b"GET /").await;
}

/// hyper tells HTTP/1.1 from HTTP/2 by the first 24 bytes, with no deadline of its own.
#[tokio::test(start_paused = true)]
async fn a_prefix_of_the_http2_preface_is_closed_after_the_header_timeout() {
    let addr = start(false).await;
    closed_at_the_header_timeout(addr, b"PRI * HTTP/2.0\r\n").await;
}

#[tokio::test(start_paused = true)]
async fn a_tls_handshake_that_never_starts_is_closed_after_the_header_timeout() {
    let addr = start(true).await;
    closed_at_the_header_timeout(addr, b"").await;
}

/// A whole request on the same server is answered, and a keep-alive connection serves a
/// second one.
#[tokio::test(start_paused = true)]
async fn a_whole_request_head_is_answered() {
    let addr = start(false).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf))
            .await
            .expect("answered at once")
            .unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    }
}

#[test]
fn a_zero_or_malformed_header_timeout_is_reported() {
    for bad in ["0s", "soon"] {
        let mut env = Env::from_pairs([("PALISADE_GATEWAY_HEADER_TIMEOUT", bad)]);
        let _ = config::GatewayConfig::from_env(&mut env);
        let err = env.finish().unwrap_err();
        assert!(
            err.problems()
                .iter()
                .any(|p| p.name == "PALISADE_GATEWAY_HEADER_TIMEOUT"),
            "{bad}: {err}"
        );
    }
}

/// Reads whatever the server sends (its own SETTINGS frame, say) until the connection
/// closes; returns when it closed, measured from `start`, or `None` if still open at 30 s.
async fn closed_after(tcp: &mut TcpStream, start: Instant) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
    .map(|()| start.elapsed())
}

/// A whole HTTP/2 preface (prior knowledge) and its SETTINGS, then no request at all:
/// hyper's HTTP/2 server has no header deadline of its own.
#[tokio::test(start_paused = true)]
async fn an_http2_connection_that_never_sends_a_request_is_closed_after_the_header_timeout() {
    let addr = start(false).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let waited = closed_after(&mut tcp, start).await;
    assert!(
        waited.is_some_and(|w| (Duration::from_secs(10)..Duration::from_secs(12)).contains(&w)),
        "an idle HTTP/2 connection closed after {waited:?}"
    );
}

/// The same over TLS, where ALPN has chosen h2: the handshake done, nothing more.
#[tokio::test(start_paused = true)]
async fn an_h2_tls_connection_that_never_sends_a_request_is_closed_after_the_header_timeout() {
    let addr = start(true).await;
    let client = fixture::tls_client_config(&[b"h2"]);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    let waited = start.elapsed();
    assert!(
        closed.is_ok() && (Duration::from_secs(10)..Duration::from_secs(12)).contains(&waited),
        "an idle h2 connection over TLS closed after {waited:?} ({closed:?})"
    );
}

/// After a first answer, a keep-alive connection that never sends its next request head.
#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let addr = start(false).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    let waited = closed_after(&mut tcp, start).await;
    assert!(
        waited.is_some_and(|w| w < Duration::from_secs(12)),
        "an idle keep-alive connection closed after {waited:?}"
    );
}

/// An HTTP/2 client (prior knowledge) that makes one request, then holds the connection
/// open and answers nothing (not even the server's pings): closed, not kept forever.
#[tokio::test(start_paused = true)]
async fn an_http2_connection_gone_silent_after_a_request_is_closed() {
    let addr = start(false).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET http://127.0.0.1/health
    // (HPACK: indexed :method GET, :scheme http; :path and :authority as literals).
    let mut block = vec![0x82, 0x86, 0x04, 7];
    block.extend_from_slice(b"/health");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"127.0.0.1");
    let len = block.len();
    let mut frame = vec![0, 0, len as u8, 1, 0x05, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    tcp.write_all(&frame).await.unwrap();
    let start = Instant::now();
    // Still open at the header timeout (so the request was seen); closed once a ping has
    // gone unanswered.
    let waited = closed_after(&mut tcp, start).await;
    assert!(
        waited.is_some_and(|w| (Duration::from_secs(11)..=Duration::from_secs(25)).contains(&w)),
        "a silent HTTP/2 connection closed after {waited:?}"
    );
}
