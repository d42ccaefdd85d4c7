//! The gateway's server loop under hostile input, over real sockets on 127.0.0.1: deadlines
//! at their configured extremes, whole answers under the write timeout, keep-alive
//! connections after refusals, hop-by-hop headers, and the histogram upkeep.
#![allow(dead_code)]

include!("chat_gateway_support/modules.rs");

use fixture::USER;

/// The server loop's deadlines: each must be given as a positive duration it can add to
/// the clock. A duration past what tokio's clock can hold (`Instant + Duration`
/// overflows, about 292 billion years on Linux) was accepted and made every connection's
/// task panic: the header deadline on accept, the idle and write deadlines on the first
/// request.
const DEADLINES: [&str; 3] = [
    "PALISADE_GATEWAY_HEADER_TIMEOUT",
    "PALISADE_GATEWAY_IDLE_TIMEOUT",
    "PALISADE_GATEWAY_WRITE_TIMEOUT",
];

#[test]
fn an_absurd_server_deadline_is_a_configuration_error() {
    for name in DEADLINES {
        for bad in ["200000000000000d", "18446744073709551615s", "100000000h"] {
            let mut env = palisade::config::Env::from_pairs([(name, bad)]);
            let _ = config::GatewayConfig::from_env(&mut env);
            let err = env.finish().expect_err(&format!("{name}={bad} is refused"));
            assert!(
                err.problems().iter().any(|p| p.name == name),
                "{name}={bad}: {err}"
            );
        }
    }
}

/// The longest deadline the configuration takes is served: a request is answered and the
/// connection stays usable.
#[tokio::test]
async fn the_longest_accepted_deadlines_serve_requests() {
    let vars = [
        ("PALISADE_GATEWAY_HEADER_TIMEOUT", "24h"),
        ("PALISADE_GATEWAY_IDLE_TIMEOUT", "24h"),
        ("PALISADE_GATEWAY_WRITE_TIMEOUT", "24h"),
    ];
    let gw = fixture::serve_own(fixture::config(&vars)).await;
    for _ in 0..2 {
        let r = gw.get("/v1/usage", USER).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

/// `name{labels} value` in Prometheus text: the value.
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    let head = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(head.as_str()))
        .unwrap_or_else(|| panic!("no {head} in\n{text}"))
        .parse()
        .unwrap()
}

/// Histogram samples folded by the upkeep every 5 s and by scrapes are neither lost nor
/// counted twice: counts and sums stay exact over many upkeeps and scrapes.
#[tokio::test(start_paused = true)]
async fn histogram_counts_and_sums_stay_exact_across_upkeeps_and_scrapes() {
    let app = crate::app::build(fixture::config(&[]))
        .await
        .expect("gateway builds");
    let metrics = &app.state.metrics;
    let ok = || axum::response::IntoResponse::into_response(http::StatusCode::OK);
    let mut n = 0u64;
    let mut sum = 0.0f64;
    for round in 0..40u64 {
        for i in 0..25u64 {
            // Binary fractions: every sum is exact in f64.
            let total = std::time::Duration::from_secs_f64(0.25 * (1 + (i + round) % 4) as f64);
            metrics.request("/late", &http::Method::POST, &ok(), total, None);
            n += 1;
            sum += total.as_secs_f64();
        }
        // Upkeeps on the paused clock, and a scrape every third round.
        tokio::time::sleep(std::time::Duration::from_millis(2_500)).await;
        tokio::task::yield_now().await;
        if round % 3 == 0 {
            let text = metrics.render(&app.state);
            let count = sample(
                &text,
                "palisade_gateway_request_duration_seconds_count",
                r#"route="/late""#,
            );
            assert_eq!(count, n as f64, "round {round}");
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(11)).await;
    let text = metrics.render(&app.state);
    let labels = r#"route="/late""#;
    assert_eq!(
        sample(
            &text,
            "palisade_gateway_request_duration_seconds_count",
            labels
        ),
        n as f64
    );
    assert_eq!(
        sample(
            &text,
            "palisade_gateway_request_duration_seconds_sum",
            labels
        ),
        sum
    );
    let requests = sample(
        &text,
        "palisade_gateway_requests_total",
        r#"route="/late",method="POST",status="200""#,
    );
    assert_eq!(requests, n as f64);
    // A second scrape with nothing new says the same.
    let again = metrics.render(&app.state);
    assert_eq!(
        sample(
            &again,
            "palisade_gateway_request_duration_seconds_count",
            labels
        ),
        n as f64
    );
    assert_eq!(
        sample(
            &again,
            "palisade_gateway_request_duration_seconds_sum",
            labels
        ),
        sum
    );
}

/// The upkeep task ends with its registry: building metrics many times (as tests build the
/// gateway) leaves no task behind once they are dropped.
#[tokio::test(start_paused = true)]
async fn the_upkeep_task_ends_with_its_registry() {
    let runtime = tokio::runtime::Handle::current();
    let before = runtime.metrics().num_alive_tasks();
    let built: Vec<_> = (0..50)
        .map(|_| crate::metrics::Metrics::new().unwrap())
        .collect();
    tokio::task::yield_now().await;
    assert_eq!(runtime.metrics().num_alive_tasks(), before + 50);
    drop(built);
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(runtime.metrics().num_alive_tasks(), before);
}

/// The text of the whole (not streamed) answer: about 1.5 MB, more than the sockets
/// between the gateway and the client hold.
const BIG_TEXT: usize = 1_500_000;

/// A gateway on its own loop (write timeout 30 s, idle timeout `idle`, header timeout
/// 120 s: hyper's applies between keep-alive requests too) in front of an upstream that
/// answers every POST with one large JSON message.
async fn big_json_gateway(idle: &str) -> fixture::Gateway {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            axum::Json(serde_json::json!({
                "id": "msg_1", "type": "message", "role": "assistant",
                "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
                "content": [{"type": "text", "text": "x".repeat(BIG_TEXT)}],
                "usage": {"input_tokens": 10, "output_tokens": 7}
            }))
        }),
    );
    let upstream = sse_upstream::serve(app).await;
    let vars = fixture::with(
        fixture::NO_RETRIES,
        &[
            ("ANTHROPIC_BASE_URL", upstream.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
            ("PALISADE_GATEWAY_WRITE_TIMEOUT", "30s"),
            ("PALISADE_GATEWAY_IDLE_TIMEOUT", idle),
            ("PALISADE_GATEWAY_HEADER_TIMEOUT", "120s"),
        ],
    );
    fixture::serve_own(fixture::config(&vars)).await
}

/// A whole answer is one body frame, its last: the body ends (and is dropped by hyper) as
/// soon as that frame is handed over, before a byte of it is written. A client that stops
/// reading it must still be cut after the write timeout, not held until the idle timeout
/// (and its grace) long after.
#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_whole_answer_is_closed_after_the_write_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = big_json_gateway("60s").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut tcp = socket.connect(gw.addr).await.unwrap();
    let body = serde_json::to_vec(&fixture::chat("claude-sonnet-4-5")).unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    let mut first = vec![0u8; 1024];
    let n = tcp.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200 "));
    // The client stops reading; past the write timeout (not the idle timeout) the
    // connection is closed.
    tokio::time::sleep(std::time::Duration::from_secs(35)).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = vec![0u8; 65536];
        while let Ok(k @ 1..) = tcp.read(&mut buf).await {
            rest.extend_from_slice(&buf[..k]);
        }
    })
    .await;
    assert!(
        ended.is_ok() && rest.len() < BIG_TEXT,
        "closed: {}, {} bytes read after the stop",
        ended.is_ok(),
        rest.len()
    );
    // Its usage was recorded once, when the whole answer came from upstream.
    let records = gw.usage_records(1).await;
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(gw.records().len(), 1, "{records:?}");
}

/// A client that reads a whole answer slowly but steadily gets all of it, though that
/// takes longer than the idle timeout and its grace: the request is in flight until its
/// last frame is written (hyper drops the body as soon as it takes that frame, which ended
/// the request and let the idle timeout cut the answer after 65 s). Its keep-alive
/// connection, then quiet past the write timeout, serves a second request: a written last
/// frame no longer waits.
#[tokio::test(start_paused = true)]
async fn a_slow_reader_of_a_whole_answer_gets_it_and_keeps_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for idle in ["60s", "300s"] {
        let gw = big_json_gateway(idle).await;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * 1024).unwrap();
        let mut tcp = socket.connect(gw.addr).await.unwrap();
        let body = serde_json::to_vec(&fixture::chat("claude-sonnet-4-5")).unwrap();
        let head = format!(
            "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let rounds = if idle == "60s" { 1 } else { 2 };
        for round in 0..rounds {
            let start = tokio::time::Instant::now();
            tcp.write_all(head.as_bytes()).await.unwrap();
            tcp.write_all(&body).await.unwrap();
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            // At most 64 KiB every 2 s: never the write timeout without a byte written.
            while !all.ends_with(b"}") || all.len() < BIG_TEXT {
                let k = tcp.read(&mut buf).await.unwrap();
                assert!(
                    k > 0,
                    "idle {idle}, round {round}: closed after {} bytes",
                    all.len()
                );
                all.extend_from_slice(&buf[..k]);
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            let text = String::from_utf8_lossy(&all);
            assert!(text.starts_with("HTTP/1.1 200 "), "{}", &text[..200]);
            assert!(start.elapsed() > std::time::Duration::from_secs(65));
            // Quiet past the write timeout (within the idle timeout).
            tokio::time::sleep(std::time::Duration::from_secs(45)).await;
        }
        assert_eq!(gw.usage_records(rounds).await.len(), rounds);
    }
}

/// An HTTP/1.1 keep-alive connection waits for its next request head under hyper's header
/// deadline: with the defaults (header 10 s, idle 60 s) it is closed 10 s after its last
/// answer, as the README now says, not after the idle timeout.
#[tokio::test(start_paused = true)]
async fn an_http1_keep_alive_connection_waits_for_its_next_head_at_most_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = fixture::serve_own(fixture::config(&[])).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!("GET /v1/usage HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    let quiet = tokio::time::Instant::now();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while tcp.read(&mut buf).await.is_ok_and(|k| k > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "still open after 30 s");
    let after = quiet.elapsed();
    assert!(
        after >= std::time::Duration::from_secs(10) && after < std::time::Duration::from_secs(11),
        "{after:?}"
    );
}

/// Reads one HTTP/1.1 answer (head and `content-length` body) from `tcp`: `None` when the
/// connection ends first.
async fn read_answer(tcp: &mut tokio::net::TcpStream) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if let Some(end) = all.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&all[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if all.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&all[..end + 4 + len]).into_owned());
            }
        }
        match tcp.read(&mut buf).await {
            Ok(k @ 1..) => all.extend_from_slice(&buf[..k]),
            _ => return None,
        }
    }
}

/// A refusal answered before its request's body arrived (no key, a wrong key, the rate
/// limit) leaves a keep-alive connection the client can use: either the answer says
/// `connection: close`, or the next request on the connection is answered. hyper gave up
/// reading a body the service dropped unread when its bytes were not there yet, and closed
/// the connection after an answer that had promised to keep it open, so the client's next
/// request on it met "Server disconnected without sending a response".
#[tokio::test]
async fn a_refusal_before_the_body_arrived_never_breaks_a_keep_alive_connection() {
    let plain = fixture::serve_own(fixture::config(&[])).await;
    for key in ["", "x-api-key: sk-wrong\r\n"] {
        refused_then_next(&plain, key, "401").await;
    }
    let rules = r#"[{"name":"chat","method":"POST","route":"/v1/messages","key":"principal","limit":1,"window":"1m","skip_anonymous":true}]"#;
    let limited =
        fixture::serve_own(fixture::config(&[("PALISADE_RATE_LIMIT_RULES", rules)])).await;
    let key = format!("x-api-key: {USER}\r\n");
    // The first request takes the one allowed (its body is read, and refused as empty).
    let mut tcp = tokio::net::TcpStream::connect(limited.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}content-type: application/json\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .unwrap();
    let first = read_answer(&mut tcp).await.expect("an answer");
    assert!(first.starts_with("HTTP/1.1 400 "), "{first}");
    refused_then_next(&limited, &key, "429").await;
}

/// On a new connection to `gw`: a chat request head (with `key`), answered `status` before
/// its body is sent; then the body and a second request.
async fn refused_then_next(gw: &fixture::Gateway, key: &str, status: &str) {
    use tokio::io::AsyncWriteExt;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = serde_json::to_vec(&fixture::chat("claude-sonnet-4-5")).unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n{key}content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let refused = read_answer(&mut tcp).await.expect("the refusal");
    assert!(
        refused.starts_with(&format!("HTTP/1.1 {status} ")),
        "{refused}"
    );
    let closes = refused
        .to_ascii_lowercase()
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    // The body arrives after the answer, and the next request behind it.
    let next = format!("GET /v1/usage HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\n\r\n");
    let mut rest = body.clone();
    rest.extend_from_slice(next.as_bytes());
    let answer = match tcp.write_all(&rest).await {
        Ok(()) => read_answer(&mut tcp).await,
        Err(_) => None,
    };
    match answer {
        Some(a) => assert!(a.starts_with("HTTP/1.1 200 "), "{a}"),
        None => assert!(closes, "closed without saying so: {refused}"),
    }
}

/// An upstream answer loses its hop-by-hop headers and every header its `connection`
/// headers name, whatever their case, spacing and number; end-to-end headers stay.
#[test]
fn the_pass_through_drops_hop_by_hop_headers_and_the_names_connection_lists() {
    let mut res = http::Response::new(axum::body::Body::empty());
    let h = res.headers_mut();
    h.append("connection", "  X-Foo ,Keep-Alive,,".parse().unwrap());
    h.append("connection", "x-BAR\t, close".parse().unwrap());
    let dropped = [
        "x-foo",
        "x-bar",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    for name in dropped {
        h.insert(name, "1".parse().unwrap());
    }
    h.insert("x-kept", "1".parse().unwrap());
    h.insert("request-id", "req_1".parse().unwrap());
    let out = routes::pass_through(res);
    let h = out.headers();
    for name in dropped.iter().chain(&["connection"]) {
        assert!(!h.contains_key(*name), "{name} passed: {h:?}");
    }
    assert_eq!(h.len(), 2, "{h:?}");
}

/// Each hop-by-hop header is dropped when it is the only one an answer holds (the
/// pass-through looks for any of them before it removes them).
#[test]
fn each_hop_by_hop_header_alone_is_dropped() {
    let hop_by_hop = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];
    for name in hop_by_hop {
        let mut res = http::Response::new(axum::body::Body::empty());
        let h = res.headers_mut();
        h.insert("content-type", "application/json".parse().unwrap());
        h.insert(name, "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let out = routes::pass_through(res);
        let h = out.headers();
        assert!(!h.contains_key(name), "{name} passed: {h:?}");
        assert_eq!(h.len(), 2, "{name}: {h:?}");
    }
}

/// A `connection` header holding bytes that are not visible ASCII still has the names it
/// lists dropped: it used to be skipped whole, so the upstream's hop-by-hop headers it named
/// were forwarded to the client.
#[test]
fn connection_headers_with_non_ascii_bytes_still_have_the_names_they_list_dropped() {
    let mut res = http::Response::new(axum::body::Body::empty());
    let h = res.headers_mut();
    h.append(
        "connection",
        http::HeaderValue::from_bytes(b"x-hop, caf\xe9, X-Other").unwrap(),
    );
    h.insert("x-hop", "1".parse().unwrap());
    h.insert("x-other", "1".parse().unwrap());
    h.insert("x-kept", "1".parse().unwrap());
    let out = routes::pass_through(res);
    let h = out.headers();
    for name in ["x-hop", "x-other", "connection"] {
        assert!(!h.contains_key(name), "{name} passed: {h:?}");
    }
    assert_eq!(h.len(), 1, "{h:?}");
}

/// A refusal answered before its request's body arrived ends with a lingering close: the
/// gateway shuts its side, then reads and discards what the client still sends, so a client
/// that sends its whole body before it reads (as most do) meets no reset on its writes.
/// The gateway closed at once, and the body's bytes arriving at a closed socket were
/// answered with a reset, failing the client's writes before it read the answer.
#[tokio::test]
async fn a_refusal_before_the_body_arrived_lingers_while_the_client_still_sends_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = fixture::serve_own(fixture::config(&[])).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    let chunks = 64;
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        chunk.len() * chunks
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // No key: refused at once, before the body, and the gateway ends its side.
    let refused = read_answer(&mut tcp).await.expect("the refusal");
    assert!(refused.starts_with("HTTP/1.1 401 "), "{refused}");
    let mut rest = [0u8; 1];
    assert_eq!(
        tcp.read(&mut rest).await.unwrap(),
        0,
        "the gateway ends its side"
    );
    for i in 0..chunks {
        if let Err(e) = tcp.write_all(&chunk).await {
            panic!("the body's chunk {i} met {e}: the gateway did not linger");
        }
    }
    tcp.shutdown().await.unwrap();
}

/// A lingering close cannot be held open: a client that trickles a byte of its body every
/// 100 ms after a refusal has its connection closed 2 s after the answer (its writes then
/// fail), not kept for as long as it keeps sending.
#[tokio::test(start_paused = true)]
async fn a_lingering_close_ends_after_two_seconds_however_the_client_trickles() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = fixture::serve_own(fixture::config(&[])).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Each trickled byte goes at once (Nagle would hold them while one is unacknowledged).
    tcp.set_nodelay(true).unwrap();
    tcp.write_all(
        b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n",
    )
    .await
    .unwrap();
    let refused = read_answer(&mut tcp).await.expect("the refusal");
    assert!(refused.starts_with("HTTP/1.1 401 "), "{refused}");
    let mut rest = [0u8; 1];
    assert_eq!(
        tcp.read(&mut rest).await.unwrap(),
        0,
        "the gateway ends its side"
    );
    let answered = tokio::time::Instant::now();
    let mut closed = None;
    for _ in 0..100 {
        if tcp.write_all(b" ").await.is_err() {
            closed = Some(answered.elapsed());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let closed = closed.expect("the gateway still read the trickle 10 s after its answer");
    assert!(
        closed >= std::time::Duration::from_secs(2) && closed < std::time::Duration::from_secs(4),
        "{closed:?}"
    );
}

/// A client that hangs up before the answer is counted in the metrics as it is logged
/// (status 499): in `palisade_gateway_requests_total` and in the request histogram. The
/// metrics counted only answered requests, so the requests whose clients gave up waiting
/// (a slow upstream) had their log line and were missing from `/metrics`.
#[tokio::test(start_paused = true)]
async fn a_request_whose_client_hangs_up_before_the_answer_is_counted_in_the_metrics() {
    use tokio::io::AsyncWriteExt;
    let gw = fixture::start(&[("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "100s")]).await;
    let body = serde_json::to_vec(&fixture::chat("mock-slow")).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {USER}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    drop(tcp);
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let r = gw
        .call(http::Method::GET, "/metrics", None, None, &[])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("palisade_gateway_requests_total{")
                && l.contains(r#"route="/v1/messages""#)
        })
        .collect();
    assert_eq!(
        counted,
        [r#"palisade_gateway_requests_total{route="/v1/messages",method="POST",status="499"} 1"#],
        "{text}"
    );
    let waited = sample(
        &text,
        "palisade_gateway_request_duration_seconds_count",
        r#"route="/v1/messages""#,
    );
    assert_eq!(waited, 1.0, "{text}");
}

/// The names an upstream's `connection` header lists are its own hop-by-hop headers: they
/// never take away the headers the gateway sets on the answer (its cost, which the request
/// log reads too). The pass-through ran after the cost meter had added its headers, so an
/// upstream answering `connection: x-palisade-cost-usd` hid the cost from the client and
/// from the log line.
#[tokio::test]
async fn an_upstreams_connection_header_never_drops_the_gateways_own_headers() {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            (
                [
                    (
                        http::header::CONNECTION,
                        "x-palisade-cost-usd, X-Palisade-Input-Tokens, x-upstream-hop",
                    ),
                    (http::HeaderName::from_static("x-upstream-hop"), "1"),
                ],
                axum::Json(serde_json::json!({
                    "id": "msg_1", "type": "message", "role": "assistant",
                    "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": "hi"}],
                    "usage": {"input_tokens": 10, "output_tokens": 7}
                })),
            )
        }),
    );
    let upstream = sse_upstream::serve(app).await;
    let vars = fixture::with(
        fixture::NO_RETRIES,
        &[
            ("ANTHROPIC_BASE_URL", upstream.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ],
    );
    let gw = fixture::start(&vars).await;
    let r = gw.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-upstream-hop").is_none(), "{:?}", r.headers);
    assert!(r.header("connection").is_none(), "{:?}", r.headers);
    assert!(r.header("x-palisade-cost-usd").is_some(), "{:?}", r.headers);
    assert_eq!(
        r.header("x-palisade-input-tokens"),
        Some("10"),
        "{:?}",
        r.headers
    );
}

/// The `x-palisade-*` headers the upstream sends on every answer of
/// [`an_upstreams_x_palisade_headers_never_reach_the_client`]: some the gateway sets, some
/// only where it served a fallback, one it never sets.
const UPSTREAM_OWN_PALISADE: [(&str, &str); 5] = [
    ("x-palisade-cost-usd", "999.99"),
    ("x-palisade-input-tokens", "123456"),
    ("x-palisade-output-tokens", "654321"),
    ("x-palisade-fallback", "model:not-the-gateways"),
    ("x-palisade-budget-remaining", "1000000"),
];

/// An upstream that answers every call with its own `x-palisade-*` headers (and one header
/// of its own, which passes): a priced JSON answer for `claude-sonnet-4-5`, an unpriced one
/// for `house-model`, a 400 error for `error-model`, and an SSE stream when the request
/// says `stream: true`.
fn namespace_squatting_upstream() -> axum::Router {
    axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(
            |axum::Json(req): axum::Json<serde_json::Value>| async move {
                let mut res = if req["stream"] == true {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(async move {
                        let _ = tx.send(sse_upstream::message_start()).await;
                        let _ = tx.send(sse_upstream::text_delta("hi")).await;
                        for event in sse_upstream::message_end() {
                            let _ = tx.send(event).await;
                        }
                    });
                    sse_upstream::answer(rx)
                } else if req["model"] == "error-model" {
                    axum::response::IntoResponse::into_response((
                        http::StatusCode::BAD_REQUEST,
                        axum::Json(serde_json::json!({
                            "type": "error",
                            "error": {"type": "invalid_request_error", "message": "no"}
                        })),
                    ))
                } else {
                    axum::response::IntoResponse::into_response(axum::Json(serde_json::json!({
                        "id": "msg_1", "type": "message", "role": "assistant",
                        "model": req["model"], "stop_reason": "end_turn",
                        "content": [{"type": "text", "text": "hi"}],
                        "usage": {"input_tokens": 10, "output_tokens": 7}
                    })))
                };
                let h = res.headers_mut();
                for (name, value) in UPSTREAM_OWN_PALISADE {
                    h.insert(
                        http::HeaderName::from_static(name),
                        http::HeaderValue::from_static(value),
                    );
                }
                h.insert("x-upstream-own", http::HeaderValue::from_static("1"));
                res
            },
        ),
    )
}

/// The `x-palisade-*` namespace is the gateway's: an upstream's own `x-palisade-*` headers
/// are dropped as its answer arrives, so the client sees only those the gateway set (the
/// cost meter's on a whole JSON answer with its usage, `unknown` cost for an unpriced model;
/// none elsewhere). They reached the client as if the gateway had said them wherever the
/// gateway set none of that name: an error answer, a stream, every answer with the layers
/// off, and any name the gateway never sets (a made-up `x-palisade-fallback` claimed a
/// fallback that never served).
#[tokio::test]
async fn an_upstreams_x_palisade_headers_never_reach_the_client() {
    let upstream = sse_upstream::serve(namespace_squatting_upstream()).await;
    let meter = [
        "x-palisade-cost-usd",
        "x-palisade-input-tokens",
        "x-palisade-output-tokens",
        "x-palisade-cache-write-tokens",
        "x-palisade-cache-read-tokens",
    ];
    for layers in ["on", "off"] {
        let vars = fixture::with(
            fixture::NO_RETRIES,
            &[
                ("ANTHROPIC_BASE_URL", upstream.as_str()),
                ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
                ("PALISADE_GATEWAY_LAYERS", layers),
                (
                    "PALISADE_GATEWAY_MODELS",
                    "claude-sonnet-4-5,house-model,error-model",
                ),
                ("PALISADE_BUDGET_ALLOW_UNPRICED", "true"),
            ],
        );
        let gw = fixture::start(&vars).await;
        let cases = [
            ("priced", "claude-sonnet-4-5", false, 200),
            ("unpriced", "house-model", false, 200),
            ("error", "error-model", false, 400),
            ("streamed", "claude-sonnet-4-5", true, 200),
        ];
        for (case, model, stream, status) in cases {
            let mut body = fixture::chat(model);
            if stream {
                body["stream"] = serde_json::Value::Bool(true);
            }
            let r = gw.post("/v1/messages", USER, body).await;
            let what = format!("layers {layers}, {case}: {:?}", r.headers);
            assert_eq!(r.status, status, "{what}: {}", r.text());
            assert_eq!(r.header("x-upstream-own"), Some("1"), "{what}");
            let mut ours: Vec<&str> = r
                .headers
                .keys()
                .map(http::HeaderName::as_str)
                .filter(|name| name.starts_with("x-palisade-"))
                .collect();
            ours.sort_unstable();
            let metered = layers == "on" && matches!(case, "priced" | "unpriced");
            let mut expected = if metered { meter.to_vec() } else { Vec::new() };
            expected.sort_unstable();
            assert_eq!(ours, expected, "{what}");
            for name in ours {
                let values: Vec<_> = r.headers.get_all(name).iter().collect();
                assert_eq!(values.len(), 1, "{what}");
            }
            if !expected.is_empty() {
                // The meter's own values, not the upstream's.
                assert_eq!(r.header("x-palisade-input-tokens"), Some("10"), "{what}");
                assert_eq!(r.header("x-palisade-output-tokens"), Some("7"), "{what}");
                let cost = if case == "unpriced" {
                    Some("unknown")
                } else {
                    Some("0.000135")
                };
                assert_eq!(r.header("x-palisade-cost-usd"), cost, "{what}");
            }
        }
    }
}

/// The answer's `x-request-id` is the gateway's (the id its log lines and usage records
/// carry), whatever the upstream answers with: an upstream's own `x-request-id` went to the
/// client in its place, so the client could not name its request to the gateway's operator.
/// The upstream's `request-id` still passes through.
#[tokio::test]
async fn the_answers_request_id_is_the_gateways_whatever_the_upstream_says() {
    let app = axum::Router::new().route(
        "/v1/messages",
        axum::routing::post(|| async {
            (
                [
                    (http::HeaderName::from_static("x-request-id"), "upstream-1"),
                    (http::HeaderName::from_static("request-id"), "req_upstream"),
                ],
                axum::Json(serde_json::json!({
                    "id": "msg_1", "type": "message", "role": "assistant",
                    "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
                    "content": [{"type": "text", "text": "hi"}],
                    "usage": {"input_tokens": 10, "output_tokens": 7}
                })),
            )
        }),
    );
    let upstream = sse_upstream::serve(app).await;
    let vars = fixture::with(
        fixture::NO_RETRIES,
        &[
            ("ANTHROPIC_BASE_URL", upstream.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
        ],
    );
    let gw = fixture::start(&vars).await;
    let r = gw.chat(USER, "claude-sonnet-4-5").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ids: Vec<_> = r.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{:?}", r.headers);
    assert!(
        ids[0].to_str().unwrap().starts_with("req_"),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("request-id"),
        Some("req_upstream"),
        "{:?}",
        r.headers
    );
}

/// Random paths (each a 404) never make a label of their own: they count under
/// `route="unmatched"`, so a client cannot grow the registry (or the kept labels) with them.
#[tokio::test]
async fn random_paths_count_under_one_unmatched_route_label() {
    let gw = fixture::start(&[]).await;
    for i in 0..50 {
        let r = gw
            .call(
                http::Method::GET,
                &format!("/no/such/{i}/path"),
                None,
                None,
                &[],
            )
            .await;
        assert_eq!(r.status, 404, "{}", r.text());
    }
    let r = gw
        .call(http::Method::GET, "/metrics", None, None, &[])
        .await;
    let text = r.text();
    assert_eq!(
        sample(
            &text,
            "palisade_gateway_requests_total",
            r#"route="unmatched",method="GET",status="404""#
        ),
        50.0,
        "{text}"
    );
    assert!(!text.contains("/no/such/"), "{text}");
}

/// An upstream on a raw socket that answers every request with `head` (its status line and
/// headers, CRLF-separated, without the blank line) and `body`, then closes the connection:
/// the headers reach the gateway exactly as written, whatever a server library would add
/// or drop. Its base URL.
async fn raw_upstream(head: &'static str, body: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                // The request head, then its body (the gateway sends a content-length).
                let (head_len, length) = loop {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway hung up mid-request");
                    seen.extend_from_slice(&buf[..n]);
                    if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let text = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                        break (end + 4, length);
                    }
                };
                while seen.len() < head_len + length {
                    let n = sock.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway hung up mid-body");
                    seen.extend_from_slice(&buf[..n]);
                }
                let answer = format!("{head}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                sock.write_all(answer.as_bytes()).await.unwrap();
                let _ = sock.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

/// Every hop-by-hop header of RFC 9110, section 7.6.1 (`Proxy-Connection` among them) and
/// every name an upstream's `Connection` header lists stay between the upstream and the
/// gateway: none reaches the client, on a JSON answer or on a stream, and the end-to-end
/// headers beside them do.
#[tokio::test]
async fn no_hop_by_hop_header_of_an_upstream_answer_reaches_the_client() {
    const HOP: &str = "HTTP/1.1 200 OK\r\n\
        Proxy-Connection: keep-alive\r\n\
        Keep-Alive: timeout=5, max=100\r\n\
        TE: trailers\r\n\
        Trailer: X-Checksum\r\n\
        Upgrade: h2c\r\n\
        Connection: X-Named, close\r\n\
        X-Named: hop\r\n\
        X-Kept: end-to-end";
    const JSON: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":7}}"#;
    const SSE: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"content\":[],\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let json_head: &'static str = format!("{HOP}\r\nContent-Type: application/json").leak();
    let sse_head: &'static str = format!("{HOP}\r\nContent-Type: text/event-stream").leak();
    for (head, body, stream) in [(json_head, JSON, false), (sse_head, SSE, true)] {
        let upstream = raw_upstream(head, body).await;
        let gw = fixture::start(&[
            ("ANTHROPIC_BASE_URL", upstream.as_str()),
            ("ANTHROPIC_API_KEY", "sk-ant-upstream-test"),
            ("PALISADE_RETRY_MAX_RETRIES", "0"),
        ])
        .await;
        let mut chat = fixture::chat("claude-sonnet-4-5");
        chat["stream"] = serde_json::Value::Bool(stream);
        let r = gw.post("/v1/messages", USER, chat).await;
        assert_eq!(r.status, 200, "stream={stream}: {}", r.text());
        for name in [
            "proxy-connection",
            "keep-alive",
            "te",
            "trailer",
            "upgrade",
            "x-named",
        ] {
            assert!(
                !r.headers.contains_key(name),
                "stream={stream}: {name} reached the client: {:?}",
                r.headers
            );
        }
        if let Some(c) = r.headers.get("connection") {
            let c = c.to_str().unwrap().to_ascii_lowercase();
            assert!(!c.contains("x-named"), "stream={stream}: connection: {c}");
        }
        assert_eq!(r.header("x-kept"), Some("end-to-end"), "stream={stream}");
    }
}
