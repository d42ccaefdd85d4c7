// One start-up for every gateway test crate: the demo keys, a configuration read from
// test-chosen variables, the gateway built in-process and served on a free loopback port,
// a hyper client, and the helpers most tests call (a request, its reply, the ledger).
//
// Mounted by `modules.rs` as `crate::fixture`, beside the example's modules it uses.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use palisade::config::Env;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Alice's API key (a user).
pub const USER: &str = "sk-test-alice-0123456789";
/// Bob's API key (another user).
pub const OTHER: &str = "sk-test-bob-0123456789ab";
/// The operator's admin key.
pub const ADMIN: &str = "sk-test-admin-0123456789";
/// A well-formed key that no one holds.
pub const WRONG: &str = "sk-test-nobody-987654321";

/// A certificate for `localhost`, self-signed, for the TLS tests.
pub const TLS_CERT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/chat_gateway_data/localhost.cert.pem"
);
/// `TLS_CERT`'s private key.
pub const TLS_KEY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/chat_gateway_data/localhost.key.pem"
);

/// Retries that wait milliseconds, not the defaults' hundreds of them.
pub const FAST_RETRIES: &[(&str, &str)] = &[
    ("PALISADE_RETRY_BASE_DELAY", "1ms"),
    ("PALISADE_RETRY_MAX_DELAY", "5ms"),
];

/// No retry at all: every upstream answer reaches the client as it came.
pub const NO_RETRIES: &[(&str, &str)] = &[("PALISADE_RETRY_MAX_RETRIES", "0")];

/// `a` then `b`: a set of variables with a test's own on top (a later pair wins).
pub fn with<'a>(a: &[(&'a str, &'a str)], b: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    [a, b].concat()
}

/// The gateway's configuration from the demo keys (alice, bob and the admin `ops`) and
/// `vars`; a later pair replaces an earlier one of the same name. Panics with every problem
/// when the variables are invalid.
pub fn config(vars: &[(&str, &str)]) -> crate::config::GatewayConfig {
    let mut pairs = vec![
        (
            "PALISADE_GATEWAY_API_KEYS",
            format!("alice={USER},bob={OTHER}"),
        ),
        ("PALISADE_GATEWAY_ADMIN_KEYS", format!("ops={ADMIN}")),
    ];
    for (k, v) in vars {
        pairs.retain(|(name, _)| name != k);
        pairs.push((k, (*v).to_owned()));
    }
    let mut env = Env::from_pairs(pairs);
    let config = crate::config::GatewayConfig::from_env(&mut env);
    env.finish().expect("test configuration is valid");
    config
}

/// A gateway built from `config(vars)`, served by `axum::serve` on a free loopback port.
pub async fn start(vars: &[(&str, &str)]) -> Gateway {
    serve_axum(config(vars)).await
}

/// A gateway built from `config`, served by `axum::serve` on a free loopback port.
pub async fn serve_axum(config: crate::config::GatewayConfig) -> Gateway {
    let app = crate::app::build(config).await.expect("gateway builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app.router;
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Gateway::new(addr, app.state)
}

/// A gateway built from `config`, served by the gateway's own loop (`serve.rs`: header
/// and idle deadlines, TLS when the configuration names a certificate) on a free loopback
/// port, as `main.rs` serves it, until the test ends.
pub async fn serve_own(config: crate::config::GatewayConfig) -> Gateway {
    let (gateway, server) = serve_own_stoppable(config).await;
    // Dropping the stop signal would stop the server: keep it for the test's lifetime.
    tokio::spawn(async move {
        let _server = server;
        std::future::pending::<()>().await;
    });
    gateway
}

/// As `serve_own`, with the means to stop the server as SIGTERM does in `main.rs`.
pub async fn serve_own_stoppable(config: crate::config::GatewayConfig) -> (Gateway, Server) {
    let tls: Option<Arc<ServerConfig>> = config
        .tls
        .as_ref()
        .map(|(cert, key)| crate::tls::load(cert, key).expect("the test certificate loads"));
    let timeouts = crate::serve::Timeouts::from_config(&config);
    let app = crate::app::build(config).await.expect("gateway builds");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(crate::serve::serve(
        listener,
        app.router,
        tls,
        timeouts,
        stop_rx,
    ));
    (Gateway::new(addr, app.state), Server { stop, task })
}

/// A server started by `serve_own_stoppable`; dropping it stops the server too.
pub struct Server {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Server {
    /// Stops accepting, lets open connections finish, and waits (5 s at most) for the end.
    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the server stops within 5 s")
            .expect("the server task ends without a panic");
    }
}

/// A rustls client configuration that trusts `TLS_CERT` and offers `alpn`.
pub fn tls_client_config(alpn: &[&[u8]]) -> ClientConfig {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(TLS_CERT).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = tokio_rustls::rustls::crypto::ring::default_provider();
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// A hyper client for `https://localhost:PORT` that trusts `TLS_CERT`: HTTP/1.1 and
/// HTTP/2 chosen by ALPN (`None`), or only HTTP/2 (`Some(true)`) or HTTP/1.1 (`Some(false)`).
pub fn https_client(
    http2_only: Option<bool>,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_client_config(&[]))
        .https_only();
    let https = match http2_only {
        None => builder.enable_http1().enable_http2().build(),
        Some(true) => builder.enable_http2().build(),
        Some(false) => builder.enable_http1().build(),
    };
    Client::builder(TokioExecutor::new())
        .http2_only(http2_only == Some(true))
        .build(https)
}

/// A gateway served on a loopback port, and a client for it.
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state (stores, ledger, breakers), for assertions beside the HTTP answers.
    pub state: crate::app::AppState,
    /// A pooled HTTP/1.1 client.
    pub client: Client<HttpConnector, Full<Bytes>>,
}

/// An answer, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value, when present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A header's value; panics when it is missing.
    pub fn expect_header(&self, name: &str) -> &str {
        self.header(name)
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    /// Asserts an error in Anthropic's format, of `kind`, and returns its `error` member.
    pub fn anthropic_error(&self, status: u16, kind: &str) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], kind, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        body["error"].clone()
    }
}

impl Gateway {
    fn new(addr: SocketAddr, state: crate::app::AppState) -> Self {
        Self {
            addr,
            state,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// `method path` with `key` in `x-api-key`, `body` as JSON and extra `headers`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(key) = key {
            req = req.header("x-api-key", key);
        }
        let bytes = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Bytes::from(serde_json::to_vec(&b).unwrap())
            }
            None => Bytes::new(),
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send(req.body(Full::new(bytes)).unwrap()).await
    }

    /// Sends `req` and reads the whole answer.
    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> Reply {
        let res = self.client.request(req).await.expect("gateway answers");
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// `POST path` with `key` and a JSON body.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(key), Some(body), &[])
            .await
    }

    /// `GET path` with `key`.
    pub async fn get(&self, path: &str, key: &str) -> Reply {
        self.call(Method::GET, path, Some(key), None, &[]).await
    }

    /// `PUT path` with `key` and a JSON body.
    pub async fn put(&self, path: &str, key: &str, body: Value) -> Reply {
        self.call(Method::PUT, path, Some(key), Some(body), &[])
            .await
    }

    /// `DELETE path` with `key`.
    pub async fn delete(&self, path: &str, key: &str) -> Reply {
        self.call(Method::DELETE, path, Some(key), None, &[]).await
    }

    /// `method path` with `key` and `anthropic-version` (as the SDKs send it).
    pub async fn call_versioned(
        &self,
        method: Method,
        path: &str,
        key: &str,
        body: Option<Value>,
    ) -> Reply {
        self.call(
            method,
            path,
            Some(key),
            body,
            &[("anthropic-version", "2023-06-01")],
        )
        .await
    }

    /// A small chat (`chat(model)`) on `/v1/messages` as `key`.
    pub async fn chat(&self, key: &str, model: &str) -> Reply {
        self.post("/v1/messages", key, chat(model)).await
    }

    /// The ledger's records so far.
    pub fn records(&self) -> Vec<crate::store::LedgerEntry> {
        self.state.ledger.entries(
            UNIX_EPOCH,
            SystemTime::now() + Duration::from_secs(60),
            |_| true,
        )
    }

    /// Waits (a few milliseconds at most, normally) until the ledger holds `n` records.
    pub async fn usage_records(&self, n: usize) -> Vec<crate::store::LedgerEntry> {
        for _ in 0..1000 {
            let entries = self.records();
            if entries.len() >= n {
                return entries;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("the ledger never held {n} records");
    }
}

impl Gateway {
    /// The ledger once every record of the requests answered so far is in it: a marker
    /// request (the admin's, on the cheapest model) is sent and its record waited for;
    /// records are written in the order their requests ended, so what came before it is
    /// in. Returned without the marker's record.
    pub async fn records_settled(&self) -> Vec<crate::store::LedgerEntry> {
        let before = self.records().len();
        let r = self
            .call_versioned(
                Method::POST,
                "/v1/messages",
                ADMIN,
                Some(chat("claude-3-haiku-20240307")),
            )
            .await;
        assert_eq!(r.status, 200, "the marker request: {}", r.text());
        let mut entries = self.usage_records(before + 1).await;
        let marker = entries
            .iter()
            .rposition(|e| e.record.attribution.user.as_deref() == Some("ops"))
            .expect("the marker's record");
        entries.remove(marker);
        entries
    }
}

/// A small valid Messages request for `model`.
pub fn chat(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 256,
        "messages": [{"role": "user", "content": "Hello there"}]
    })
}

/// A wiremock upstream whose first POST fails with a 500 in Anthropic's error format and
/// whose later POSTs answer 200 with `ok`.
pub async fn upstream_failing_once(ok: Value) -> wiremock::MockServer {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(500).set_body_json(
                json!({"type":"error","error":{"type":"api_error","message":"boom"}}),
            ),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(ok))
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

/// Installs, once per test crate, a JSON tracing subscriber with `filter` (the first call's
/// filter holds) whose output the tests read back: the buffer it writes to.
pub fn captured_logs(filter: &str) -> &'static Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> =
        std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Arc::clone(&logs);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .json()
            .with_writer(move || Capture(Arc::clone(&writer)))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        logs
    })
}

/// The writer of [`captured_logs`]: appends to the shared buffer.
struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
