//! The bounded retry buffer the network sinks share: records wait here while their server
//! is away and are written in order, with backoff, when it answers again.
//!
//! A record the server refuses for a lasting reason (it answered "no": a key of the wrong
//! type, a value out of range) never blocks the records behind it: the batch is split to
//! find the records at fault, those go to the sink's dead-letter place, counted and logged
//! once each, and the rest flow on.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::SinkError;
use crate::cost::record::{RecordId, UsageRecord};

/// A snapshot of a network sink's state ([`RedisSink`](super::RedisSink),
/// [`PostgresSink`](super::PostgresSink)): at all times
/// `accepted = delivered + dead_lettered + dropped + backlog`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SinkHealth {
    /// Records handed to the sink.
    pub accepted: u64,
    /// Records stored (stored now, or found stored by an earlier attempt).
    pub delivered: u64,
    /// Of `delivered`, records that were already stored when handed over (a batch the
    /// caller sent again). The sink's own retry of a batch whose write landed but whose
    /// answer was lost does not count here: the Redis and PostgreSQL sinks remember each
    /// batch's id (Redis for its `dedupe_ttl`, PostgreSQL for a day) and answer a retry
    /// as they answered the first store.
    pub duplicates: u64,
    /// Records the server refused for a lasting reason, set aside in the sink's
    /// dead-letter place (Redis: a capped stream; PostgreSQL: `usage_dead_letters`) with
    /// the error, so the records behind them flow on. A record sent again counts again,
    /// as in `delivered`, and is set aside once.
    pub dead_lettered: u64,
    /// Records lost: the buffer was full, or the server refused both the record and its
    /// dead letter (each logged).
    pub dropped: u64,
    /// Records waiting for the server.
    pub backlog: u64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// A write that failed, possibly after storing a first part of its batch.
#[derive(Debug)]
pub(crate) struct Failure {
    /// Why. [`SinkError::Rejected`] is a lasting refusal (the server answered "no");
    /// anything else passes (connection lost, timeout, server loading or failing over).
    pub error: SinkError,
    /// The first records of the batch that were stored all the same.
    pub stored: usize,
    /// Of `stored`, how many were new.
    pub fresh: u64,
    /// Whether a lasting `error` is known to be the fault of the record at `stored` (else
    /// the batch is split to find it).
    pub pinpointed: bool,
}

impl From<SinkError> for Failure {
    /// Nothing stored, culprit unknown.
    fn from(error: SinkError) -> Self {
        Self {
            error,
            stored: 0,
            fresh: 0,
            pinpointed: false,
        }
    }
}

/// Writes one batch of records to a server; returns how many were new (the rest were
/// stored by an earlier attempt).
///
/// Each write carries a batch id. When a write goes unanswered (a lost connection, a
/// timeout: it may have landed all the same), the same records are sent again with the
/// same id, so a store that remembers its ids can answer the retry as it answered the
/// first attempt: the records the first attempt stored count as new, not as duplicates.
pub(crate) trait Store: Send + Sync + Sized + 'static {
    /// A handle on the sink that does not keep it alive (the retry timer holds one).
    type Weak: Send + Sync + 'static;

    /// The sink's backlog.
    fn backlog(&self) -> &Backlog;

    /// A handle that does not keep the sink alive.
    fn downgrade(&self) -> Self::Weak;

    /// The sink again, unless every clone of it is gone.
    fn upgrade(weak: &Self::Weak) -> Option<Self>;

    fn store(
        &self,
        batch: &[UsageRecord],
        batch_id: RecordId,
    ) -> impl Future<Output = Result<u64, Failure>> + Send;

    /// Sets aside a record the server refused for a lasting reason, with the reason; a
    /// record set aside before is not set aside twice (`Ok(false)`).
    fn dead_letter(
        &self,
        record: &UsageRecord,
        error: &str,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send;
}

/// How much a [`Backlog`] holds and writes at once, and how long it waits at most.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Records per write.
    pub max_batch: usize,
    /// Records kept while the server is away; more are dropped and counted.
    pub max_buffer: usize,
    /// The longest wait between retries.
    pub max_backoff: Duration,
}

struct State {
    buffer: VecDeque<UsageRecord>,
    health: SinkHealth,
    next_attempt: Option<tokio::time::Instant>,
    backoff: Duration,
    /// Whether a retry timer is running.
    retrying: bool,
    /// The last write, when it failed for a passing reason with nothing known stored: its
    /// batch id and how many records it held (the buffer's front). The retry sends the
    /// same records with the same id.
    unanswered: Option<(RecordId, usize)>,
}

/// Records accepted and not yet stored, in order, with the sink's counters.
pub(crate) struct Backlog {
    /// The sink's name in logs ("Redis sink").
    name: &'static str,
    limits: Limits,
    state: Mutex<State>,
    /// One writer at a time, so the buffer drains in order.
    writing: tokio::sync::Mutex<()>,
}

impl Backlog {
    pub(crate) fn new(name: &'static str, limits: Limits) -> Self {
        Self {
            name,
            limits,
            state: Mutex::new(State {
                buffer: VecDeque::new(),
                health: SinkHealth::default(),
                next_attempt: None,
                backoff: Duration::ZERO,
                retrying: false,
                unanswered: None,
            }),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // the state is plain counters and a queue: consistent even after a panic
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The backlog, the counters and the last error.
    pub(crate) fn health(&self) -> SinkHealth {
        let s = self.state();
        let mut h = s.health.clone();
        h.backlog = s.buffer.len() as u64;
        h
    }

    /// Buffers `batch` (dropping and counting what does not fit) and writes the buffer.
    /// A server that is away is not an error here: the records wait and are retried with
    /// backoff, by a timer of their own (which ends with the sink), on the next batch, or
    /// at [`flush`](Self::flush).
    pub(crate) async fn record_batch<S: Store>(
        &self,
        store: &S,
        batch: &[UsageRecord],
    ) -> Result<(), SinkError> {
        {
            let mut s = self.state();
            s.health.accepted += batch.len() as u64;
            let room = self.limits.max_buffer.saturating_sub(s.buffer.len());
            let keep = batch.len().min(room);
            s.buffer.extend(batch[..keep].iter().cloned());
            let lost = (batch.len() - keep) as u64;
            if lost > 0 {
                s.health.dropped += lost;
                tracing::error!(target: "palisade::cost", dropped = lost,
                    "{} buffer full: records dropped", self.name);
            }
        }
        let _ = self.drain(store, false).await;
        Ok(())
    }

    /// Writes everything buffered now (no backoff); `Err` when the server is still away.
    pub(crate) async fn flush<S: Store>(&self, store: &S) -> Result<(), SinkError> {
        self.drain(store, true).await
    }

    /// Writes buffered records in order until the buffer is empty or an attempt fails
    /// for a passing reason.
    async fn drain<S: Store>(&self, store: &S, force: bool) -> Result<(), SinkError> {
        let result = self.drain_now(store, force).await;
        if result.is_err() {
            self.retry_later(store);
        }
        result
    }

    /// Starts a timer that writes the buffer when its backoff ends, and again after each
    /// failed attempt, until the buffer is empty or the sink is gone (it holds no strong
    /// handle while it waits). One timer at a time; none outside a Tokio runtime (the next
    /// batch or flush retries then).
    fn retry_later<S: Store>(&self, store: &S) {
        {
            let mut s = self.state();
            if s.retrying || s.buffer.is_empty() || s.next_attempt.is_none() {
                return;
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            s.retrying = true;
            drop(s);
            let weak = store.downgrade();
            runtime.spawn(async move {
                loop {
                    let at = {
                        let Some(sink) = S::upgrade(&weak) else {
                            return;
                        };
                        let mut s = sink.backlog().state();
                        match s.next_attempt {
                            Some(at) if !s.buffer.is_empty() => at,
                            _ => {
                                s.retrying = false;
                                return;
                            }
                        }
                    };
                    tokio::time::sleep_until(at).await;
                    let Some(sink) = S::upgrade(&weak) else {
                        return;
                    };
                    let _ = sink.backlog().drain_now(&sink, false).await;
                }
            });
        }
    }

    /// [`drain`](Self::drain) without starting the retry timer.
    async fn drain_now<S: Store>(&self, store: &S, force: bool) -> Result<(), SinkError> {
        let _writer = self.writing.lock().await;
        loop {
            let (chunk, id): (Vec<UsageRecord>, RecordId) = {
                let s = self.state();
                if !force
                    && s.next_attempt
                        .is_some_and(|t| tokio::time::Instant::now() < t)
                {
                    return Ok(()); // backing off: the records wait in the buffer
                }
                let (id, len) = s
                    .unanswered
                    .unwrap_or_else(|| (RecordId::generate(), self.limits.max_batch.max(1)));
                (s.buffer.iter().take(len).cloned().collect(), id)
            };
            if chunk.is_empty() {
                return Ok(());
            }
            self.write(store, &chunk, id).await?;
        }
    }

    /// Writes `chunk` (the front of the buffer) as batch `id`. A lasting refusal splits
    /// it until the records at fault are found and set aside; the others are stored in
    /// order.
    async fn write<S: Store>(
        &self,
        store: &S,
        chunk: &[UsageRecord],
        id: RecordId,
    ) -> Result<(), SinkError> {
        // Parts still to write, the next one last; each part follows the one before in
        // the buffer, so what is done is always the buffer's front.
        let mut parts = vec![(0, chunk.len())];
        let mut id = Some(id);
        while let Some((lo, hi)) = parts.pop() {
            // the chunk's id for the chunk itself, a new one for each part of it
            let batch_id = id.take().unwrap_or_else(RecordId::generate);
            let result = store.store(&chunk[lo..hi], batch_id).await;
            self.state().unanswered = match &result {
                Err(f) if f.stored == 0 && f.error.is_retryable() => Some((batch_id, hi - lo)),
                _ => None,
            };
            let failure = match result {
                Ok(fresh) => {
                    self.delivered(hi - lo, fresh);
                    continue;
                }
                Err(f) => f,
            };
            let Failure {
                error,
                stored,
                fresh,
                pinpointed,
            } = failure;
            let stored = stored.min(hi - lo);
            if stored > 0 {
                self.delivered(stored, fresh);
            }
            let lo = lo + stored;
            if lo >= hi {
                continue;
            }
            if error.is_retryable() {
                self.failed(&error);
                return Err(error);
            }
            if pinpointed || hi - lo == 1 {
                self.set_aside(store, &chunk[lo], &error).await?;
                if lo + 1 < hi {
                    parts.push((lo + 1, hi));
                }
            } else {
                let mid = lo + (hi - lo) / 2;
                parts.push((mid, hi));
                parts.push((lo, mid));
            }
        }
        Ok(())
    }

    /// The first `n` buffered records are stored, `fresh` of them new.
    fn delivered(&self, n: usize, fresh: u64) {
        let mut s = self.state();
        s.buffer.drain(..n);
        let n = n as u64;
        s.health.delivered += n;
        s.health.duplicates += n.saturating_sub(fresh);
        s.health.last_error = None;
        s.next_attempt = None;
        s.backoff = Duration::ZERO;
    }

    /// An attempt failed for a passing reason: the records wait, with backoff.
    fn failed(&self, e: &SinkError) {
        let mut s = self.state();
        s.health.last_error = Some(e.to_string());
        s.backoff = (s.backoff * 2)
            .max(Duration::from_millis(100))
            .min(self.limits.max_backoff);
        s.next_attempt = Some(tokio::time::Instant::now() + s.backoff);
        tracing::warn!(target: "palisade::cost", error = %e, backlog = s.buffer.len(),
            "{}: write failed, records kept for a retry", self.name);
    }

    /// The first buffered record, `record`, was refused for a lasting reason: it goes to
    /// the dead letters (or, refused there too, is dropped), counted and logged once.
    /// `Err` when the dead letter could not be written for a passing reason: the record
    /// stays first in the buffer and is tried again later.
    async fn set_aside<S: Store>(
        &self,
        store: &S,
        record: &UsageRecord,
        error: &SinkError,
    ) -> Result<(), SinkError> {
        let reason = error.to_string();
        let outcome = store.dead_letter(record, &reason).await;
        let mut s = self.state();
        match outcome {
            Ok(new) => {
                s.buffer.pop_front();
                s.health.dead_lettered += 1;
                s.health.last_error = Some(reason.clone());
                if new {
                    tracing::error!(target: "palisade::cost", record = %record.id, error = %reason,
                        "{}: record refused, set aside as a dead letter", self.name);
                }
                Ok(())
            }
            Err(e) if e.is_retryable() => {
                drop(s);
                self.failed(&e);
                Err(e)
            }
            Err(e) => {
                s.buffer.pop_front();
                s.health.dropped += 1;
                s.health.last_error = Some(reason.clone());
                tracing::error!(target: "palisade::cost", record = %record.id, error = %reason,
                    dead_letter_error = %e, "{}: record refused, and its dead letter too: record dropped",
                    self.name);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;
    use crate::cost::sink::tests::rec;

    /// An in-process server that is away while `down` is set.
    struct Server {
        backlog: Backlog,
        down: AtomicBool,
        attempts: AtomicU32,
        stored: Mutex<Vec<u64>>,
        /// Every attempt: its batch id and its records.
        batches: Mutex<Vec<(RecordId, Vec<u64>)>>,
    }

    #[derive(Clone)]
    struct Sink(Arc<Server>);

    impl Store for Sink {
        type Weak = std::sync::Weak<Server>;

        fn backlog(&self) -> &Backlog {
            &self.0.backlog
        }

        fn downgrade(&self) -> Self::Weak {
            Arc::downgrade(&self.0)
        }

        fn upgrade(weak: &Self::Weak) -> Option<Self> {
            weak.upgrade().map(Sink)
        }

        async fn store(&self, batch: &[UsageRecord], id: RecordId) -> Result<u64, Failure> {
            self.0.attempts.fetch_add(1, Ordering::SeqCst);
            let tokens = batch.iter().map(|r| r.usage.input_tokens).collect();
            self.0.batches.lock().unwrap().push((id, tokens));
            if self.0.down.load(Ordering::SeqCst) {
                return Err(SinkError::Unavailable("connection refused".into()).into());
            }
            let mut stored = self.0.stored.lock().unwrap();
            stored.extend(batch.iter().map(|r| r.usage.input_tokens));
            Ok(batch.len() as u64)
        }

        async fn dead_letter(&self, _: &UsageRecord, _: &str) -> Result<bool, SinkError> {
            Ok(true)
        }
    }

    fn sink(down: bool) -> Sink {
        Sink(Arc::new(Server {
            backlog: Backlog::new(
                "test sink",
                Limits {
                    max_batch: 2,
                    max_buffer: 100,
                    max_backoff: Duration::from_secs(30),
                },
            ),
            down: AtomicBool::new(down),
            attempts: AtomicU32::new(0),
            stored: Mutex::new(Vec::new()),
            batches: Mutex::new(Vec::new()),
        }))
    }

    async fn record(s: &Sink, batch: &[UsageRecord]) {
        s.backlog().record_batch(s, batch).await.unwrap();
    }

    /// Traffic stops while the server is away: the backlog is written when the server
    /// is back, with no new batch and no flush.
    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_retried_on_its_own_when_traffic_stops() {
        let s = sink(true);
        record(&s, &[rec(1), rec(2), rec(3)]).await;
        assert_eq!(s.backlog().health().backlog, 3);
        // backing off: 100 ms, 200 ms, 400 ms, … up to 30 s
        tokio::time::sleep(Duration::from_secs(2)).await;
        let tries = s.0.attempts.load(Ordering::SeqCst);
        assert!((4..=6).contains(&tries), "{tries} attempts in 2 s");
        s.0.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let h = s.backlog().health();
        assert_eq!((h.accepted, h.delivered, h.backlog), (3, 3, 0), "{h:?}");
        assert_eq!(h.last_error, None);
        assert_eq!(*s.0.stored.lock().unwrap(), [1, 2, 3]);
        // the timer ended with the backlog: nothing more is tried
        let tries = s.0.attempts.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(s.0.attempts.load(Ordering::SeqCst), tries);
        // and a later outage starts a timer again
        s.0.down.store(true, Ordering::SeqCst);
        record(&s, &[rec(4)]).await;
        s.0.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(*s.0.stored.lock().unwrap(), [1, 2, 3, 4]);
    }

    /// A write that failed with nothing known stored (it may have landed) is sent again
    /// as it was: the same records under the same batch id, though more wait behind
    /// them; the next batch has an id of its own.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_batch_is_retried_whole_under_its_own_id() {
        let s = sink(true);
        record(&s, &[rec(1), rec(2), rec(3)]).await;
        record(&s, &[rec(4)]).await;
        s.0.down.store(false, Ordering::SeqCst);
        s.backlog().flush(&s).await.unwrap();
        let batches = s.0.batches.lock().unwrap().clone();
        let first = batches[0].0;
        let (retried, rest) = batches.split_at(batches.len() - 1);
        for (id, tokens) in retried {
            assert_eq!((*id, tokens.as_slice()), (first, &[1, 2][..]));
        }
        assert_eq!(rest[0].1, [3, 4]);
        assert_ne!(rest[0].0, first);
        assert_eq!(*s.0.stored.lock().unwrap(), [1, 2, 3, 4]);
    }

    /// The timer holds no strong handle while it waits: dropping the sink ends it.
    #[tokio::test(start_paused = true)]
    async fn the_retry_timer_ends_with_the_sink() {
        let s = sink(true);
        record(&s, &[rec(1)]).await;
        let weak = s.downgrade();
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 1, "one retry timer");
        drop(s);
        assert!(
            Sink::upgrade(&weak).is_none(),
            "the timer keeps the sink alive"
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 0, "the timer outlived the sink");
    }

    /// A failed flush starts the timer too.
    #[tokio::test(start_paused = true)]
    async fn a_failed_flush_is_retried_on_its_own() {
        let s = sink(false);
        s.0.down.store(true, Ordering::SeqCst);
        record(&s, &[rec(1)]).await;
        assert!(s.backlog().flush(&s).await.is_err());
        s.0.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.backlog().health().backlog, 0);
    }
}
