//! [`WebhookSink`]: alert events POSTed as JSON from a background task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::{AlertEvent, AlertSink};

/// Where and how the webhook sink delivers. Its `Debug` shows the receiver's scheme, host
/// and port only: a webhook URL often carries its secret in the path (Slack's) or query.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct WebhookConfig {
    /// The receiver's URL (`http://…`; `https://` needs a TLS connector, see
    /// [`WebhookSink::with_client`]).
    pub url: String,
    /// The longest one attempt may take.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// Retries after a failed attempt (a transport error, 408, 429 or 5xx).
    pub retries: u32,
    /// Wait before the first retry, doubled each time.
    #[serde(with = "crate::config::duration")]
    pub retry_backoff: Duration,
    /// Events queued at most; more are dropped and counted.
    pub capacity: usize,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout: Duration::from_secs(5),
            retries: 3,
            retry_backoff: Duration::from_millis(500),
            capacity: 1024,
        }
    }
}

/// A webhook URL made safe for logs: scheme, host and port; the rest (where a secret
/// token often sits) becomes `/***`.
fn redact_webhook_url(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(u) if u.host().is_some() => {
            let mut out = format!(
                "{}://{}",
                u.scheme_str().unwrap_or("http"),
                u.host().unwrap_or_default()
            );
            if let Some(port) = u.port_u16() {
                out.push_str(&format!(":{port}"));
            }
            if u.path_and_query().is_some_and(|pq| pq.as_str() != "/") {
                out.push_str("/***");
            }
            out
        }
        _ => "<webhook url>".to_owned(),
    }
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &redact_webhook_url(&self.url))
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl WebhookConfig {
    /// The default settings for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The webhook sink's counters: nothing is lost without a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct WebhookStats {
    /// Events accepted into the queue (counted as the event is handed over, so an event
    /// the full queue then drops may show here for an instant).
    pub queued: u64,
    /// Events the receiver accepted (2xx).
    pub delivered: u64,
    /// Events given up on after the retries (or refused by the receiver with a 4xx).
    pub failed: u64,
    /// Events dropped because the queue was full or the task had stopped.
    pub dropped: u64,
}

/// POSTs each [`AlertEvent`] as JSON ([`AlertEvent::to_json`]) to a URL.
///
/// `send` only queues (bounded; full: dropped and counted): a slow or dead receiver never
/// slows the request that raised the event. A background task delivers in order, each
/// attempt under the timeout, retrying transport errors, 408, 429 and 5xx with backoff.
#[derive(Debug, Clone)]
pub struct WebhookSink {
    tx: mpsc::Sender<AlertEvent>,
    counters: Arc<Counters>,
}

impl WebhookSink {
    /// A sink over plain HTTP (must be called inside a tokio runtime).
    pub fn spawn(config: WebhookConfig) -> Result<Self, String> {
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        Self::with_client(config, client)
    }

    /// A sink using `client` (for example with an HTTPS connector).
    pub fn with_client<C>(
        config: WebhookConfig,
        client: Client<C, Full<Bytes>>,
    ) -> Result<Self, String>
    where
        C: Connect + Clone + Send + Sync + 'static,
    {
        let uri: Uri = config
            .url
            .parse()
            .map_err(|e| format!("webhook url `{}`: {e}", redact_webhook_url(&config.url)))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(format!(
                "webhook url `{}` must be http:// or https:// with a host",
                redact_webhook_url(&config.url)
            ));
        }
        let (tx, rx) = mpsc::channel(config.capacity.max(1));
        let counters = Arc::new(Counters::default());
        tokio::spawn(deliver(client, uri, config, rx, Arc::clone(&counters)));
        Ok(Self { tx, counters })
    }

    /// The counters. `delivered + failed` never exceeds `queued` in a snapshot: an event
    /// is counted queued before the delivery task can see it, and the outcomes are read
    /// before `queued`.
    pub fn stats(&self) -> WebhookStats {
        let c = &self.counters;
        let delivered = c.delivered.load(Ordering::Acquire);
        let failed = c.failed.load(Ordering::Acquire);
        WebhookStats {
            queued: c.queued.load(Ordering::Relaxed),
            delivered,
            failed,
            dropped: c.dropped.load(Ordering::Relaxed),
        }
    }
}

impl AlertSink for WebhookSink {
    fn send(&self, event: AlertEvent) {
        // counted before the delivery task can see it (and taken back if the queue is
        // full), so `delivered` never passes `queued`
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(_) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "palisade::cost::alert", "alert webhook queue full: event dropped");
            }
        }
    }
}

enum Attempt {
    Delivered,
    Retry(String),
    GiveUp(String),
}

async fn attempt<C>(
    client: &Client<C, Full<Bytes>>,
    uri: &Uri,
    body: &Bytes,
    timeout: Duration,
) -> Attempt
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let req = match Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "palisade-alerts")
        .body(Full::new(body.clone()))
    {
        Ok(r) => r,
        Err(e) => return Attempt::GiveUp(e.to_string()),
    };
    let call = async {
        let res = client.request(req).await?;
        let status = res.status();
        // read (and discard) the body so the connection can be reused
        let _ = res.into_body().collect().await;
        Ok::<_, hyper_util::client::legacy::Error>(status)
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Attempt::Retry("timed out".into()),
        Ok(Err(e)) => Attempt::Retry(e.to_string()),
        Ok(Ok(s)) if s.is_success() => Attempt::Delivered,
        Ok(Ok(s)) if s.is_server_error() || s.as_u16() == 408 || s.as_u16() == 429 => {
            Attempt::Retry(format!("status {s}"))
        }
        Ok(Ok(s)) => Attempt::GiveUp(format!("status {s}")),
    }
}

async fn deliver<C>(
    client: Client<C, Full<Bytes>>,
    uri: Uri,
    config: WebhookConfig,
    mut rx: mpsc::Receiver<AlertEvent>,
    counters: Arc<Counters>,
) where
    C: Connect + Clone + Send + Sync + 'static,
{
    while let Some(event) = rx.recv().await {
        let body = Bytes::from(serde_json::to_vec(&event.to_json()).unwrap_or_default());
        let mut backoff = config.retry_backoff;
        let mut tries = 0;
        loop {
            match attempt(&client, &uri, &body, config.timeout).await {
                Attempt::Delivered => {
                    counters.delivered.fetch_add(1, Ordering::Release);
                    break;
                }
                Attempt::Retry(why) if tries < config.retries => {
                    tracing::debug!(target: "palisade::cost::alert", error = %why, "alert webhook failed: retrying");
                    tries += 1;
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2);
                }
                Attempt::Retry(why) | Attempt::GiveUp(why) => {
                    counters.failed.fetch_add(1, Ordering::Release);
                    tracing::warn!(target: "palisade::cost::alert", error = %why, "alert webhook failed: event lost");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_the_webhook_secret() {
        for url in [
            "https://hooks.slack.com/services/T000/B000/s3cret",
            "http://alerts.internal:8080/hook?token=s3cret",
            "http://user:s3cret@alerts.internal/",
            "not a url s3cret",
        ] {
            let dbg = format!("{:?}", WebhookConfig::new(url));
            assert!(!dbg.contains("s3cret"), "{dbg}");
        }
        let dbg = format!(
            "{:?}",
            WebhookConfig::new("http://alerts.internal:8080/hook")
        );
        assert!(dbg.contains("http://alerts.internal:8080/***"), "{dbg}");
    }
}
