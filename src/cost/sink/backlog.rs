//! The bounded retry buffer the network sinks share: records wait here while their server
//! is away and are written in order, with backoff, when it answers again.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

use super::SinkError;
use crate::cost::record::UsageRecord;

/// A snapshot of a network sink's state ([`RedisSink`](super::RedisSink),
/// [`PostgresSink`](super::PostgresSink)): at all times
/// `accepted = delivered + dropped + backlog`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct SinkHealth {
    /// Records handed to the sink.
    pub accepted: u64,
    /// Records stored (stored now, or found stored by an earlier attempt).
    pub delivered: u64,
    /// Of `delivered`, records that were already stored (a retried batch).
    pub duplicates: u64,
    /// Records dropped because the buffer was full, or because the server refused them.
    pub dropped: u64,
    /// Records waiting for the server.
    pub backlog: u64,
    /// The last error, if the last attempt failed.
    pub last_error: Option<String>,
}

/// Writes one batch of records to a server; returns how many were new (the rest were
/// stored by an earlier attempt).
pub(crate) trait Store {
    fn store(&self, batch: &[UsageRecord]) -> impl Future<Output = Result<u64, SinkError>> + Send;
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
    /// backoff on the next batch or at [`flush`](Self::flush).
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

    /// Writes buffered records in order until the buffer is empty or an attempt fails.
    async fn drain<S: Store>(&self, store: &S, force: bool) -> Result<(), SinkError> {
        let _writer = self.writing.lock().await;
        loop {
            let chunk: Vec<UsageRecord> = {
                let s = self.state();
                if !force
                    && s.next_attempt
                        .is_some_and(|t| tokio::time::Instant::now() < t)
                {
                    return Ok(()); // backing off: the records wait in the buffer
                }
                s.buffer
                    .iter()
                    .take(self.limits.max_batch.max(1))
                    .cloned()
                    .collect()
            };
            if chunk.is_empty() {
                return Ok(());
            }
            let result = store.store(&chunk).await;
            let mut s = self.state();
            match result {
                Ok(fresh) => {
                    s.buffer.drain(..chunk.len());
                    let n = chunk.len() as u64;
                    s.health.delivered += n;
                    s.health.duplicates += n.saturating_sub(fresh);
                    s.health.last_error = None;
                    s.next_attempt = None;
                    s.backoff = Duration::ZERO;
                }
                Err(e) => {
                    s.health.last_error = Some(e.to_string());
                    s.backoff = (s.backoff * 2)
                        .max(Duration::from_millis(100))
                        .min(self.limits.max_backoff);
                    s.next_attempt = Some(tokio::time::Instant::now() + s.backoff);
                    if !e.is_retryable() {
                        // the records can never be stored as they are: count them dropped
                        s.buffer.drain(..chunk.len());
                        s.health.dropped += chunk.len() as u64;
                    }
                    tracing::warn!(target: "palisade::cost", error = %e, backlog = s.buffer.len(),
                        "{}: write failed, records kept for a retry", self.name);
                    return Err(e);
                }
            }
        }
    }
}
