//! Error tracking: with the crate's `sentry` feature and `SENTRY_DSN` set, panics and every
//! 5xx answer are reported through the `sentry` crate.
//!
//! ```text
//! cargo run --example chat_gateway --features sentry   # with SENTRY_DSN=https://key@host/1
//! ```
//!
//! Nothing private leaves: a report names the route template, method, status, request id and
//! user, never a request or response body, a header, a query string or an IP address; every
//! configured API key and anything shaped like one (`sk-…`) is replaced by `[redacted]`
//! wherever it appears (panic messages included). Envelopes go out through a hyper-util
//! client on a thread of their own (rustls for https), so no second HTTP stack is built.

use palisade::config::{Env, ProblemKind};

/// The `SENTRY_*` settings.
#[derive(Clone, Default)]
pub struct SentryConfig {
    /// `SENTRY_DSN`: where reports go (`https://<public key>@<host>/<project id>`).
    pub dsn: Option<String>,
    /// `SENTRY_ENVIRONMENT` (default: `PALISADE_ENV`'s value).
    pub environment: Option<String>,
}

impl std::fmt::Debug for SentryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentryConfig")
            .field("dsn", &self.dsn.as_ref().map(|_| "[set]"))
            .field("environment", &self.environment)
            .finish()
    }
}

impl SentryConfig {
    /// Reads `SENTRY_DSN` and `SENTRY_ENVIRONMENT`, recording a malformed DSN in `env`.
    pub fn from_env(env: &mut Env) -> Self {
        let dsn = env.secret_with(
            "SENTRY_DSN",
            "https://0123456789abcdef@o1.ingest.sentry.io/42",
            check_dsn,
        );
        let environment = env.raw("SENTRY_ENVIRONMENT").map(|s| s.trim().to_owned());
        if dsn.is_some() && !cfg!(feature = "sentry") {
            env.problem(
                "SENTRY_DSN",
                ProblemKind::Invalid {
                    value: "[set]".into(),
                    reason: "this build has no error tracking: run with `--features sentry`, or unset SENTRY_DSN"
                        .into(),
                },
                "cargo run --example chat_gateway --features sentry",
            );
        }
        Self { dsn, environment }
    }
}

#[cfg(feature = "sentry")]
fn check_dsn(s: &str) -> Result<String, String> {
    s.trim()
        .parse::<sentry::types::Dsn>()
        .map(|_| s.trim().to_owned())
        .map_err(|e| format!("not a Sentry DSN ({e})"))
}

#[cfg(not(feature = "sentry"))]
fn check_dsn(s: &str) -> Result<String, String> {
    Ok(s.trim().to_owned())
}

/// Replaces every secret in `secrets` and every `sk-…` token in `text` by `[redacted]`.
#[cfg(feature = "sentry")]
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "[redacted]");
        }
    }
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("sk-") {
        let token_len = rest[i + 3..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
            .unwrap_or(rest.len() - i - 3);
        let boundary = i == 0 || !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric());
        result.push_str(&rest[..i]);
        if boundary && token_len >= 8 {
            result.push_str("[redacted]");
        } else {
            result.push_str(&rest[i..i + 3 + token_len]);
        }
        rest = &rest[i + 3 + token_len..];
    }
    result.push_str(rest);
    result
}

#[cfg(feature = "sentry")]
pub use enabled::{Sentry, report};

#[cfg(feature = "sentry")]
mod enabled {
    use std::borrow::Cow;
    use std::sync::Arc;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use axum::extract::{MatchedPath, Request, State};
    use axum::middleware::Next;
    use axum::response::Response;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use sentry::protocol::{Event, Level, Value};
    use sentry::{ClientInitGuard, ClientOptions, Envelope, Transport};
    use serde_json::Map;

    use super::{SentryConfig, redact};
    use crate::config::{GatewayConfig, UpstreamTarget};

    /// Error tracking, on: the client (bound to the process's main hub, so panics are
    /// reported) and what flushes it.
    #[derive(Clone)]
    pub struct Sentry {
        client: Arc<sentry::Client>,
        _guard: Arc<ClientInitGuard>,
    }

    impl std::fmt::Debug for Sentry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Sentry").finish_non_exhaustive()
        }
    }

    impl Sentry {
        /// Starts error tracking when `SENTRY_DSN` is set (`None` otherwise). It binds the
        /// process's main hub and panic hook: one gateway per process reports.
        pub fn init(config: &GatewayConfig) -> Result<Option<Self>, palisade::BoxError> {
            let SentryConfig { dsn, environment } = &config.sentry;
            let Some(dsn) = dsn else { return Ok(None) };
            let mut secrets: Vec<String> = config
                .api_keys
                .iter()
                .chain(&config.admin_keys)
                .map(|k| k.key.clone())
                .collect();
            if let UpstreamTarget::Remote { api_key, .. } = &config.upstream {
                secrets.push(api_key.clone());
            }
            let secrets = Arc::new(secrets);
            let environment = environment.clone().unwrap_or_else(|| {
                let production = config.settings.environment.is_production();
                (if production {
                    "production"
                } else {
                    "development"
                })
                .to_owned()
            });
            let options = ClientOptions {
                dsn: Some(dsn.parse()?),
                environment: Some(Cow::Owned(environment)),
                release: Some(Cow::Borrowed(concat!(
                    "chat_gateway@",
                    env!("CARGO_PKG_VERSION")
                ))),
                send_default_pii: false,
                attach_stacktrace: true,
                before_send: Some(Arc::new(move |event| Some(scrub(event, &secrets)))),
                before_breadcrumb: Some(Arc::new(|_| None)),
                transport: Some(Arc::new(|options: &ClientOptions| {
                    Arc::new(HyperTransport::start(options)) as Arc<dyn Transport>
                })),
                ..ClientOptions::default()
            };
            let guard = sentry::init(options);
            let client = sentry::Hub::main()
                .client()
                .ok_or("the Sentry client did not start")?;
            tracing::info!("error tracking on: panics and 5xx answers go to Sentry");
            Ok(Some(Self {
                client,
                _guard: Arc::new(guard),
            }))
        }

        /// Sends what is queued, waiting at most `timeout`.
        pub fn flush(&self, timeout: Duration) -> bool {
            self.client.flush(Some(timeout))
        }

        fn capture(&self, event: Event<'static>) {
            self.client.capture_event(event, None);
        }
    }

    /// Keeps of an event only what cannot hold a secret or a message: no request body,
    /// headers, query string or cookies, no IP address; keys redacted in every text.
    pub fn scrub(mut event: Event<'static>, secrets: &[String]) -> Event<'static> {
        let text = |s: &mut String| *s = redact(s, secrets);
        if let Some(req) = &mut event.request {
            req.data = None;
            req.query_string = None;
            req.cookies = None;
            req.headers.clear();
            req.env.clear();
            if let Some(url) = &mut req.url {
                url.set_query(None);
                url.set_fragment(None);
                let _ = url.set_password(None);
                let _ = url.set_username("");
            }
        }
        if let Some(user) = &mut event.user {
            user.ip_address = None;
            user.email = None;
            user.other.clear();
        }
        if let Some(m) = &mut event.message {
            text(m);
        }
        if let Some(log) = &mut event.logentry {
            text(&mut log.message);
            log.params.iter_mut().for_each(|v| value(v, secrets));
        }
        for e in &mut event.exception.values {
            if let Some(v) = &mut e.value {
                text(v);
            }
        }
        event.breadcrumbs.values.clear();
        for v in event.tags.values_mut() {
            text(v);
        }
        event.extra.values_mut().for_each(|v| value(v, secrets));
        if let Some(c) = &mut event.culprit {
            text(c);
        }
        event
    }

    fn value(v: &mut Value, secrets: &[String]) {
        match v {
            Value::String(s) => *s = redact(s, secrets),
            Value::Array(a) => a.iter_mut().for_each(|v| value(v, secrets)),
            Value::Object(o) => o.values_mut().for_each(|v| value(v, secrets)),
            _ => {}
        }
    }

    /// The middleware: reports every 5xx answer (route template, method, status, request
    /// id, user, timings; never a body or header).
    pub async fn report(State(sentry): State<Sentry>, req: Request, next: Next) -> Response {
        let start = Instant::now();
        let method = req.method().to_string();
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
        let request_id = crate::app::request_id(&req);
        let res = next.run(req).await;
        let status = res.status();
        if status.is_server_error() {
            let mut event = Event {
                level: Level::Error,
                message: Some(format!("{method} {route} answered {}", status.as_u16())),
                fingerprint: Cow::Owned(vec![
                    Cow::Borrowed("chat_gateway-5xx"),
                    Cow::Owned(route.clone()),
                    Cow::Owned(status.as_u16().to_string()),
                ]),
                ..Event::default()
            };
            event.tags.insert("route".into(), route);
            event.tags.insert("method".into(), method);
            event
                .tags
                .insert("status".into(), status.as_u16().to_string());
            event.tags.insert("request_id".into(), request_id);
            if let Some(user) = res.extensions().get::<crate::log::LoggedUser>() {
                event.user = Some(sentry::protocol::User {
                    id: Some(user.0.to_string()),
                    ..sentry::protocol::User::default()
                });
            }
            let mut extra = Map::new();
            extra.insert(
                "duration_ms".into(),
                Value::from(start.elapsed().as_millis() as u64),
            );
            if let Some(up) = res.extensions().get::<crate::upstream::UpstreamTime>() {
                extra.insert("upstream_ms".into(), Value::from(up.0.as_millis() as u64));
            }
            if let Some(fallback) = res
                .headers()
                .get(crate::upstream::X_PALISADE_FALLBACK)
                .and_then(|v| v.to_str().ok())
            {
                extra.insert("fallback".into(), Value::from(fallback));
            }
            event.extra = extra.into_iter().collect();
            sentry.capture(event);
        }
        res
    }

    enum Msg {
        Envelope(Vec<u8>),
        Flush(mpsc::Sender<()>),
    }

    /// Sends envelopes from a thread with its own small runtime, so reporting never waits
    /// on (or panics with) the gateway's runtime.
    struct HyperTransport {
        tx: mpsc::SyncSender<Msg>,
    }

    impl HyperTransport {
        fn start(options: &ClientOptions) -> Self {
            let (tx, rx) = mpsc::sync_channel::<Msg>(256);
            let target = options.dsn.as_ref().map(|dsn| {
                (
                    dsn.envelope_api_url().to_string(),
                    dsn.to_auth(Some(&options.user_agent)).to_string(),
                )
            });
            let spawned = std::thread::Builder::new()
                .name("sentry-transport".into())
                .spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    let connector = hyper_rustls::HttpsConnectorBuilder::new()
                        .with_webpki_roots()
                        .https_or_http()
                        .enable_http1()
                        .build();
                    let client: Client<_, Full<Bytes>> =
                        Client::builder(TokioExecutor::new()).build(connector);
                    while let Ok(msg) = rx.recv() {
                        match msg {
                            Msg::Envelope(body) => {
                                let Some((url, auth)) = &target else { continue };
                                rt.block_on(send(&client, url, auth, body));
                            }
                            Msg::Flush(done) => {
                                let _ = done.send(());
                            }
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the Sentry transport thread");
            }
            Self { tx }
        }
    }

    async fn send<C>(client: &Client<C, Full<Bytes>>, url: &str, auth: &str, body: Vec<u8>)
    where
        C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        let req = http::Request::post(url)
            .header("content-type", "application/x-sentry-envelope")
            .header("x-sentry-auth", auth)
            .body(Full::new(Bytes::from(body)));
        let Ok(req) = req else { return };
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(res)) => {
                let status = res.status();
                let _ = res.into_body().collect().await;
                if !status.is_success() {
                    tracing::warn!(status = status.as_u16(), "Sentry refused a report");
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot reach Sentry"),
            Err(_) => tracing::warn!("Sentry did not answer within 10 s"),
        }
    }

    impl Transport for HyperTransport {
        fn send_envelope(&self, envelope: Envelope) {
            let mut body = Vec::new();
            if envelope.to_writer(&mut body).is_ok()
                && self.tx.try_send(Msg::Envelope(body)).is_err()
            {
                tracing::warn!("Sentry queue full: a report was dropped");
            }
        }

        fn flush(&self, timeout: Duration) -> bool {
            let (done, wait) = mpsc::channel();
            if self.tx.send(Msg::Flush(done)).is_err() {
                return false;
            }
            wait.recv_timeout(timeout).is_ok()
        }

        fn shutdown(&self, timeout: Duration) -> bool {
            self.flush(timeout)
        }
    }
}

/// Error tracking, off (this build has no `sentry` feature).
#[cfg(not(feature = "sentry"))]
#[derive(Debug, Clone)]
pub struct Sentry;

#[cfg(not(feature = "sentry"))]
impl Sentry {
    /// Always `None`: `SentryConfig::from_env` already refused a DSN for this build.
    pub fn init(
        _config: &crate::config::GatewayConfig,
    ) -> Result<Option<Self>, palisade::BoxError> {
        Ok(None)
    }

    /// Nothing to send.
    pub fn flush(&self, _timeout: std::time::Duration) -> bool {
        true
    }
}
