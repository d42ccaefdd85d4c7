//! The chat_gateway binary as users run it: start-up errors, the request log, and graceful
//! shutdown on SIGTERM. `cargo test` builds the example beside the test binaries.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const KEY: &str = "sk-process-test-0123456789";

fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/examples/chat_gateway
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir
        .join("examples")
        .join(format!("chat_gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --example chat_gateway`",
        path.display()
    );
    path
}

fn gateway(vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("PALISADE_GATEWAY_ADDR", "127.0.0.1:0")
        .env("PALISADE_GATEWAY_API_KEYS", format!("carol={KEY}"))
        .env("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "700ms")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Reads stdout until the listening line; returns the address and the reader.
fn wait_listening(child: &mut Child) -> (String, BufReader<std::process::ChildStdout>) {
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read stdout");
        assert!(n > 0, "the gateway exited before listening");
        if let Some(rest) = line
            .trim()
            .strip_prefix("chat_gateway listening on http://")
        {
            return (rest.to_owned(), out);
        }
    }
}

#[test]
fn bad_configuration_exits_with_every_problem_listed() {
    let out = gateway(&[
        ("PALISADE_GATEWAY_ADDR", "nowhere"),
        // Not a redis:// URL: a problem with or without the `redis` feature.
        ("REDIS_URL", "http://:hunter2@127.0.0.1:6379/"),
        ("PALISADE_GATEWAY_MAX_TOKENS", "0"),
        ("PALISADE_GATEWAY_ENV_FILE", "/nonexistent/gateway.env"),
        ("RUST_LOG", "info,=="),
    ])
    .output()
    .expect("run the gateway");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("5 problems"), "{err}");
    for name in [
        "PALISADE_GATEWAY_ADDR",
        "REDIS_URL",
        "PALISADE_GATEWAY_MAX_TOKENS",
        "PALISADE_GATEWAY_ENV_FILE",
        "RUST_LOG",
    ] {
        assert!(err.contains(name), "{name} missing in {err}");
    }
    assert!(!err.contains("hunter2"), "a secret was echoed: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_stream_in_flight_logs_without_secrets_and_exits() {
    let mut child = gateway(&[]).spawn().expect("start the gateway");
    let (addr, mut stdout) = wait_listening(&mut child);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let secret_words = "my secret recipe for plum cake";
    let body = format!(
        r#"{{"model":"mock-slow","max_tokens":64,"stream":true,"messages":[{{"role":"user","content":"{secret_words}"}}]}}"#
    );
    let req = http::Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let wrong = "sk-process-test-WRONG-key-42";
    let denied = client
        .request(
            http::Request::post(format!("http://{addr}/v1/messages"))
                .header("x-api-key", wrong)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap(),
        )
        .await
        .expect("answer");
    assert_eq!(denied.status(), 401);
    let streamed = client
        .request(
            http::Request::post(format!("http://{addr}/v1/messages"))
                .header("x-api-key", KEY)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
                )))
                .unwrap(),
        )
        .await
        .expect("answer");
    let streamed = streamed.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&streamed).contains(": palisade-cost usd="));
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move {
            let res = client.request(req).await.expect("answer");
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .expect("whole stream")
                .to_bytes();
            (status, body)
        }
    });
    // Let the request reach the mock's delay, then ask the gateway to stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("message_stop"),
        "the stream finished"
    );

    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let mut logs = String::new();
    stdout.read_to_string(&mut logs).unwrap();
    assert!(logs.contains("chat_gateway::request"), "{logs}");
    assert!(
        logs.contains("carol"),
        "the request line names the user: {logs}"
    );
    assert!(logs.contains("usage recorder flushed"), "{logs}");
    assert!(
        logs.contains("chat_gateway::audit") && logs.contains("auth_failed"),
        "{logs}"
    );
    assert!(!logs.contains(KEY), "a key was logged: {logs}");
    assert!(!logs.contains(wrong), "a presented key was logged: {logs}");
    assert!(
        !logs.contains("plum cake"),
        "message content was logged: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_waiting_for_requests_after_the_grace_period() {
    let mut child = gateway(&[
        ("PALISADE_GATEWAY_SHUTDOWN_GRACE", "200ms"),
        ("PALISADE_GATEWAY_MOCK_SLOW_DELAY", "30s"),
    ])
    .spawn()
    .expect("start the gateway");
    let (addr, _stdout) = wait_listening(&mut child);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{addr}/v1/messages"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"mock-slow","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#,
        )))
        .unwrap();
    let in_flight = tokio::spawn(async move { client.request(req).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the gateway waited {:?}",
        started.elapsed()
    );
    assert!(
        in_flight.await.unwrap().is_err(),
        "the slow request was cut at the deadline"
    );
}
