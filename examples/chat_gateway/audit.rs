//! Security events: authentication failures, rate-limit and budget refusals, admin actions
//! and changes to bots. Each one is a log line on the `chat_gateway::audit` target and,
//! with `DATABASE_URL`, a row in `audit_logs` (actor, action, target, outcome, time,
//! request id), written in batches by a background task so that no request waits for
//! PostgreSQL. An event never holds an API key: an unknown key is named by its hash.

use std::borrow::Cow;

/// One security event.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// What happened: `auth_failed`, `auth_throttled`, `auth_failures_unaudited`,
    /// `forbidden`, `rate_limited`, `budget_refused`, `refusals_unaudited`,
    /// `rate_limits_reset`, `budget_set`, `bot_created`, `bot_deleted`.
    pub action: &'static str,
    /// `refused`, `allowed` or `done`.
    pub outcome: &'static str,
    /// Who acted: a user, or `key:<hash>` for a key no one holds.
    pub actor: Option<String>,
    /// What it was done to: a route, a user, a bot.
    pub target: Option<String>,
    /// More (never a secret).
    pub detail: Option<Cow<'static, str>>,
    /// The gateway's request id.
    pub request_id: Option<String>,
}

impl AuditEntry {
    /// An event with `action` and `outcome`.
    pub fn new(action: &'static str, outcome: &'static str) -> Self {
        Self {
            action,
            outcome,
            actor: None,
            target: None,
            detail: None,
            request_id: None,
        }
    }

    /// Sets who acted.
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets what it was done to.
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Sets the detail.
    pub fn detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Sets the request id.
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// This refusal as the stand-in for its caller's refusals past `per_minute` audited
    /// this minute: `refusals_unaudited`, same actor, target and request id.
    pub fn unaudited_rest(self, per_minute: u64) -> Self {
        Self {
            action: "refusals_unaudited",
            detail: Some(
                format!(
                    "{} past {per_minute} refusals of this caller this minute: the rest of \
                     this minute's are not audited one by one",
                    self.action
                )
                .into(),
            ),
            ..self
        }
    }
}

/// Where audit events go. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    #[cfg(feature = "postgres")]
    writer: Option<pg::Writer>,
}

/// The PostgreSQL writer's counters, for `/health`. Every event recorded is either
/// queued or dropped because the queue was full; every event queued is written, failed,
/// or still in the backlog: `queued = written + failed + backlog`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditHealth {
    /// Events accepted into the writer's queue.
    pub queued: u64,
    /// Events written to `audit_logs`.
    pub written: u64,
    /// Events queued and not yet written or given up on.
    pub backlog: u64,
    /// Events lost: `queue_full` + `failed`.
    pub dropped: u64,
    /// Events not queued because the queue was full.
    pub queue_full: u64,
    /// Events queued that PostgreSQL refused after every retry.
    pub failed: u64,
    /// The last write error, if the last write failed.
    pub last_error: Option<String>,
}

impl Audit {
    /// Events go to the log only.
    pub fn log_only() -> Self {
        Self::default()
    }

    /// Events go to the log and to `sink`'s `audit_logs` table.
    #[cfg(feature = "postgres")]
    pub fn postgres(sink: palisade::cost::sink::PostgresSink) -> Self {
        Self::postgres_with_capacity(sink, pg::CAPACITY)
    }

    /// As `postgres`, queueing at most `capacity` events for the writer (more are dropped
    /// and counted).
    #[cfg(feature = "postgres")]
    pub fn postgres_with_capacity(
        sink: palisade::cost::sink::PostgresSink,
        capacity: usize,
    ) -> Self {
        Self {
            writer: Some(pg::Writer::spawn(sink, capacity)),
        }
    }

    /// Records `entry`: logs it now and queues it for PostgreSQL (never waits).
    pub fn record(&self, entry: AuditEntry) {
        let actor = entry.actor.as_deref().unwrap_or("-");
        let target = entry.target.as_deref().unwrap_or("-");
        let request_id = entry.request_id.as_deref().unwrap_or("-");
        let detail = entry.detail.as_deref().unwrap_or("");
        if entry.outcome == "refused" {
            tracing::warn!(target: "chat_gateway::audit", event = entry.action, outcome = entry.outcome,
                actor, subject = target, request_id, detail);
        } else {
            tracing::info!(target: "chat_gateway::audit", event = entry.action, outcome = entry.outcome,
                actor, subject = target, request_id, detail);
        }
        #[cfg(feature = "postgres")]
        if let Some(w) = &self.writer {
            w.send(entry);
        }
    }

    /// Waits until every event recorded so far is written (or given up on); `false` when
    /// nothing is written to PostgreSQL.
    pub async fn flush(&self) -> bool {
        #[cfg(feature = "postgres")]
        if let Some(w) = &self.writer {
            return w.flush().await;
        }
        false
    }

    /// The PostgreSQL writer's counters (`None` without `DATABASE_URL`).
    pub fn health(&self) -> Option<AuditHealth> {
        #[cfg(feature = "postgres")]
        if let Some(w) = &self.writer {
            return Some(w.health());
        }
        None
    }
}

#[cfg(feature = "postgres")]
mod pg {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};
    use std::time::{Duration, SystemTime};

    use palisade::cost::sink::{AuditEvent, PostgresSink};
    use tokio::sync::{mpsc, oneshot};

    use super::{AuditEntry, AuditHealth};

    /// Events queued at most by default; more are dropped and counted.
    pub(super) const CAPACITY: usize = 10_000;
    /// Events per `INSERT`.
    const MAX_BATCH: usize = 500;
    /// Attempts per batch before it is counted as dropped.
    const ATTEMPTS: u32 = 5;

    enum Msg {
        Event(AuditEvent),
        Flush(oneshot::Sender<()>),
    }

    #[derive(Debug, Default)]
    struct Counters {
        queued: AtomicU64,
        written: AtomicU64,
        /// Not queued: the queue was full.
        queue_full: AtomicU64,
        /// Queued, then refused by PostgreSQL after every retry.
        failed: AtomicU64,
        last_error: Mutex<Option<String>>,
    }

    #[derive(Debug, Clone)]
    pub(super) struct Writer {
        tx: mpsc::Sender<Msg>,
        counters: Arc<Counters>,
    }

    impl Writer {
        pub(super) fn spawn(sink: PostgresSink, capacity: usize) -> Self {
            let (tx, rx) = mpsc::channel(capacity.max(1));
            let counters = Arc::new(Counters::default());
            tokio::spawn(run(sink, rx, Arc::clone(&counters)));
            Self { tx, counters }
        }

        pub(super) fn send(&self, e: AuditEntry) {
            let mut event = AuditEvent::new(e.action, e.outcome);
            event.time = SystemTime::now();
            event.actor = e.actor;
            event.target = e.target;
            event.detail = e.detail.map(|d| d.into_owned());
            event.request_id = e.request_id;
            // A place in the queue first: an event is counted as queued only once it has
            // one (never for a moment before a full queue refuses it), and before the
            // writer can see it, so `written` never passes `queued`.
            match self.tx.try_reserve() {
                Ok(place) => {
                    self.counters.queued.fetch_add(1, Ordering::Release);
                    place.send(Msg::Event(event));
                }
                Err(_) => {
                    self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(target: "chat_gateway::audit", "audit queue full: an event was not written to PostgreSQL");
                }
            }
        }

        pub(super) async fn flush(&self) -> bool {
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Msg::Flush(tx)).await.is_err() {
                return false;
            }
            rx.await.is_ok()
        }

        pub(super) fn health(&self) -> AuditHealth {
            let c = &self.counters;
            // Read the outcomes before `queued`: an event counted in either is in `queued`.
            let written = c.written.load(Ordering::Acquire);
            let failed = c.failed.load(Ordering::Acquire);
            let queue_full = c.queue_full.load(Ordering::Relaxed);
            let queued = c.queued.load(Ordering::Acquire);
            AuditHealth {
                queued,
                written,
                backlog: queued.saturating_sub(written + failed),
                dropped: queue_full + failed,
                queue_full,
                failed,
                last_error: c
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            }
        }
    }

    async fn run(sink: PostgresSink, mut rx: mpsc::Receiver<Msg>, counters: Arc<Counters>) {
        let mut batch: Vec<AuditEvent> = Vec::new();
        let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
        while let Some(msg) = rx.recv().await {
            let mut next = Some(msg);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(e),
                    Msg::Flush(done) => waiting.push(done),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            write(&sink, &mut batch, &counters).await;
            for done in waiting.drain(..) {
                let _ = done.send(());
            }
        }
    }

    async fn write(sink: &PostgresSink, batch: &mut Vec<AuditEvent>, counters: &Counters) {
        if batch.is_empty() {
            return;
        }
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match sink.audit(batch).await {
                Ok(()) => {
                    counters
                        .written
                        .fetch_add(batch.len() as u64, Ordering::Release);
                    *counters
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = None;
                    batch.clear();
                    return;
                }
                Err(e) => {
                    tracing::warn!(target: "chat_gateway::audit", error = %e, attempt,
                        "audit events not written to PostgreSQL yet");
                    *counters
                        .last_error
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            }
        }
        counters
            .failed
            .fetch_add(batch.len() as u64, Ordering::Release);
        tracing::error!(target: "chat_gateway::audit", dropped = batch.len(),
            "audit events dropped: PostgreSQL refused them after every retry");
        batch.clear();
    }
}
