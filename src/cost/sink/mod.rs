//! Where usage records go: a [`UsageSink`] behind a bounded, non-blocking queue.
//!
//! [`UsageRecorder::spawn`] starts a background task that takes records from a bounded
//! queue in batches and hands them to the sink. Recording never waits: when the queue is
//! full the record is dropped and counted ([`CostStats`]), so a slow sink never slows a
//! request. A failing sink is retried with backoff, then the batch is counted as failed.
//! [`RecorderShutdown::shutdown`] stops taking records, drains the queue into the sink and
//! flushes it.
//!
//! The trait is batch-shaped so that network sinks (Redis, PostgreSQL) write one round trip
//! per batch.
//!
//! ```
//! use std::sync::Arc;
//! use palisade::cost::{MemorySink, UsageRecorder, RecorderConfig, UsageRecord, Usage};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sink = Arc::new(MemorySink::new());
//! let (recorder, shutdown) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
//! recorder.record(UsageRecord::new(std::time::SystemTime::now(), None, Usage::default(), None));
//! let stats = shutdown.shutdown().await; // drains and flushes
//! assert_eq!(stats.written, 1);
//! assert_eq!(sink.len(), 1);
//! # }
//! ```

#[cfg(any(feature = "redis", feature = "postgres"))]
mod backlog;
mod memory;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "redis")]
mod redis;
mod tracing_sink;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;

#[cfg(any(feature = "redis", feature = "postgres"))]
pub use backlog::SinkHealth;
pub use memory::MemorySink;
#[cfg(feature = "postgres")]
pub use postgres::{
    AuditEvent, MIGRATIONS, PostgresConfig, PostgresHealth, PostgresSink, record_key,
};
#[cfg(feature = "redis")]
pub use redis::{RedisSink, RedisSinkConfig, RedisSinkHealth};
pub use tracing_sink::TracingSink;

use super::record::UsageRecord;

/// A sink failed to store a batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    /// The backend is unavailable (connection refused, timeout); worth retrying.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the batch; retrying will not help.
    #[error("sink rejected the batch: {0}")]
    Rejected(String),
}

impl SinkError {
    /// Whether retrying may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Stores usage records. Implementations receive batches from one background task, in
/// order.
pub trait UsageSink: Send + Sync + 'static {
    /// Stores `batch`. Called again with the same batch after a retryable error.
    fn record_batch(
        &self,
        batch: &[UsageRecord],
    ) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// Makes everything stored so far durable (called at shutdown). The default does
    /// nothing.
    fn flush(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        async { Ok(()) }
    }
}

impl<S: UsageSink> UsageSink for Arc<S> {
    fn record_batch(
        &self,
        batch: &[UsageRecord],
    ) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).record_batch(batch)
    }

    fn flush(&self) -> impl Future<Output = Result<(), SinkError>> + Send {
        (**self).flush()
    }
}

/// Counters shared by the recorder and the layer. Nothing is dropped without a count.
#[derive(Debug, Default)]
pub struct CostStats {
    queued: AtomicU64,
    written: AtomicU64,
    dropped_full: AtomicU64,
    dropped_closed: AtomicU64,
    failed: AtomicU64,
    sink_errors: AtomicU64,
    unknown_model: AtomicU64,
    oversize_body: AtomicU64,
    parse_failures: AtomicU64,
    overlong_lines: AtomicU64,
    encoded_body: AtomicU64,
    missing_usage: AtomicU64,
}

/// A point-in-time copy of [`CostStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CostStatsSnapshot {
    /// Records accepted into the queue.
    pub queued: u64,
    /// Records the sink stored.
    pub written: u64,
    /// Records dropped because the queue was full.
    pub dropped_full: u64,
    /// Records dropped because the recorder had shut down.
    pub dropped_closed: u64,
    /// Records lost because the sink kept failing.
    pub failed: u64,
    /// Sink calls that returned an error (retried or not).
    pub sink_errors: u64,
    /// Responses whose model had no price (recorded with `cost: None`).
    pub unknown_model: u64,
    /// JSON bodies too large to scan for usage.
    pub oversize_body: u64,
    /// Payloads that should have been JSON and were not.
    pub parse_failures: u64,
    /// SSE lines dropped for exceeding the line limit.
    pub overlong_lines: u64,
    /// JSON or SSE responses not metered because they were compressed
    /// (`content-encoding` other than `identity`).
    pub encoded_body: u64,
    /// Complete responses that named a model but reported no usage (an OpenAI stream
    /// without `stream_options.include_usage`): recorded with `cost: None`.
    pub missing_usage: u64,
}

impl CostStats {
    /// A copy of every counter. `written + failed` never exceeds `queued` in a snapshot:
    /// a record is counted queued before the writer can take it, and the outcomes are read
    /// before `queued`.
    pub fn snapshot(&self) -> CostStatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let written = self.written.load(Ordering::Acquire);
        let failed = self.failed.load(Ordering::Acquire);
        CostStatsSnapshot {
            queued: l(&self.queued),
            written,
            dropped_full: l(&self.dropped_full),
            dropped_closed: l(&self.dropped_closed),
            failed,
            sink_errors: l(&self.sink_errors),
            unknown_model: l(&self.unknown_model),
            oversize_body: l(&self.oversize_body),
            parse_failures: l(&self.parse_failures),
            overlong_lines: l(&self.overlong_lines),
            encoded_body: l(&self.encoded_body),
            missing_usage: l(&self.missing_usage),
        }
    }

    pub(crate) fn add_unknown_model(&self) {
        self.unknown_model.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_oversize_body(&self) {
        self.oversize_body.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_missing_usage(&self) {
        self.missing_usage.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_encoded_body(&self) {
        self.encoded_body.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_parse_failures(&self, n: u64) {
        if n > 0 {
            self.parse_failures.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn add_overlong_lines(&self, n: u64) {
        if n > 0 {
            self.overlong_lines.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// How the recorder queues and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecorderConfig {
    /// Records waiting in the queue; more are dropped and counted. (The writer holds the
    /// records it took last, at most as many again, while the sink stores them.)
    pub capacity: usize,
    /// Largest batch handed to the sink.
    pub max_batch: usize,
    /// Retries of a batch after a retryable sink error.
    pub retries: u32,
    /// Wait before the first retry (doubled each time).
    #[serde(with = "crate::config::duration")]
    pub retry_backoff: Duration,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_batch: 256,
            retries: 3,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// How long the writer, woken by a record, lets more gather before it takes them all
/// (unless a full batch is already waiting): under load the recorders wake it about once
/// per linger, not once per record. Shutdown and the last recorder's drop cut it short.
const LINGER: Duration = Duration::from_millis(1);

/// The queue between the recorders and the writer task: a short critical section per
/// record (a push under a lock the writer takes once per linger), and a wake-up only when
/// the writer is idle.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    capacity: usize,
    wake: Notify,
    /// Live [`UsageRecorder`]s: when none is left, the writer drains and ends.
    senders: AtomicUsize,
    /// Wake-ups sent by [`UsageRecorder::record`].
    #[cfg(test)]
    wakeups: AtomicU64,
}

#[derive(Debug, Default)]
struct QueueState {
    /// Taken whole by the writer (swapped with its empty buffer): O(1) under the lock.
    records: Vec<UsageRecord>,
    closed: bool,
    /// The writer found the queue empty and waits: the next record wakes it.
    idle: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side of the usage queue. Cheap to clone; recording never waits.
#[derive(Debug)]
pub struct UsageRecorder {
    queue: Arc<Queue>,
    stats: Arc<CostStats>,
}

impl Clone for UsageRecorder {
    fn clone(&self) -> Self {
        self.queue.senders.fetch_add(1, Ordering::Relaxed);
        Self {
            queue: Arc::clone(&self.queue),
            stats: Arc::clone(&self.stats),
        }
    }
}

impl Drop for UsageRecorder {
    fn drop(&mut self) {
        if self.queue.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            // the last one: let the writer drain and end
            self.queue.wake.notify_one();
        }
    }
}

/// Stops the recorder's background task after draining the queue and flushing the sink.
#[derive(Debug)]
#[must_use = "dropping the shutdown handle detaches the task; call `shutdown` to flush"]
pub struct RecorderShutdown {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    stats: Arc<CostStats>,
}

impl UsageRecorder {
    /// Starts the background task feeding `sink` (must run inside a tokio runtime).
    pub fn spawn<S: UsageSink>(sink: S, config: RecorderConfig) -> (Self, RecorderShutdown) {
        let stats = Arc::new(CostStats::default());
        let capacity = config.capacity.max(1);
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState {
                records: Vec::with_capacity(capacity.min(1024)),
                ..QueueState::default()
            }),
            capacity,
            wake: Notify::new(),
            senders: AtomicUsize::new(1),
            #[cfg(test)]
            wakeups: AtomicU64::new(0),
        });
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(
            sink,
            config,
            Arc::clone(&queue),
            stop_rx,
            Arc::clone(&stats),
        ));
        (
            Self {
                queue,
                stats: Arc::clone(&stats),
            },
            RecorderShutdown { stop, task, stats },
        )
    }

    /// Queues `record`; `false` (and a counted drop) when the queue is full or closed.
    /// Never waits; wakes the writer task only when it is idle (waiting for records).
    pub fn record(&self, record: UsageRecord) -> bool {
        let mut q = self.queue.lock();
        if q.closed {
            drop(q);
            self.stats.dropped_closed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "palisade::cost", "usage recorder shut down: record dropped");
            return false;
        }
        if q.records.len() >= self.queue.capacity {
            drop(q);
            self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "palisade::cost", "usage queue full: record dropped");
            return false;
        }
        q.records.push(record);
        // counted before the writer can take it, so `written` never passes `queued`
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let wake = std::mem::take(&mut q.idle);
        drop(q);
        if wake {
            #[cfg(test)]
            self.queue.wakeups.fetch_add(1, Ordering::Relaxed);
            self.queue.wake.notify_one();
        }
        true
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<CostStats> {
        &self.stats
    }
}

impl RecorderShutdown {
    /// Stops accepting records, writes everything queued, flushes the sink, and returns
    /// the final counters.
    pub async fn shutdown(self) -> CostStatsSnapshot {
        let _ = self.stop.send(());
        if let Err(e) = self.task.await {
            tracing::error!(target: "palisade::cost", error = %e, "usage recorder task failed");
        }
        self.stats.snapshot()
    }

    /// Like [`shutdown`](Self::shutdown), but gives up after `limit` (a sink that hangs
    /// must not hang the process): the task is aborted and `Err` carries the counters;
    /// records queued but neither written nor failed (`queued - written - failed`) were
    /// lost.
    pub async fn shutdown_within(
        self,
        limit: Duration,
    ) -> Result<CostStatsSnapshot, CostStatsSnapshot> {
        let _ = self.stop.send(());
        let mut task = self.task;
        match tokio::time::timeout(limit, &mut task).await {
            Ok(_) => Ok(self.stats.snapshot()),
            Err(_) => {
                task.abort();
                let s = self.stats.snapshot();
                tracing::error!(target: "palisade::cost",
                    lost = s.queued.saturating_sub(s.written + s.failed),
                    "usage sink did not finish in time: recorder aborted");
                Err(s)
            }
        }
    }

    /// The shared counters.
    pub fn stats(&self) -> &Arc<CostStats> {
        &self.stats
    }
}

async fn run<S: UsageSink>(
    sink: S,
    config: RecorderConfig,
    queue: Arc<Queue>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<CostStats>,
) {
    let max_batch = config.max_batch.max(1);
    let mut taken = Vec::with_capacity(queue.capacity.min(1024));
    // `listening`: the shutdown handle still exists. When it is dropped without a call to
    // `shutdown`, the task runs on until every recorder is gone.
    let mut listening = true;
    loop {
        // Checked before draining: once closed or without recorders, nothing more comes.
        let last = queue.lock().closed || queue.senders.load(Ordering::Acquire) == 0;
        loop {
            // A steady stream can keep the queue from ever being empty here: the shutdown
            // signal is looked at before each take, not only when idle.
            if listening {
                match stop.try_recv() {
                    Ok(()) => {
                        listening = false;
                        queue.lock().closed = true;
                    }
                    Err(oneshot::error::TryRecvError::Closed) => listening = false,
                    Err(oneshot::error::TryRecvError::Empty) => {}
                }
            }
            std::mem::swap(&mut queue.lock().records, &mut taken);
            if taken.is_empty() {
                break;
            }
            for batch in taken.chunks(max_batch) {
                write(&sink, &config, batch, &stats).await;
            }
            taken.clear();
        }
        // closed before the last (empty) take: nothing more comes
        if last || queue.lock().closed {
            break;
        }
        // Idle: the next record wakes us (the flag is set and read under the queue's
        // lock, and a wake-up sent before we wait is kept by `Notify`): nothing is left
        // behind. While we write, records gather without waking anyone.
        {
            let mut q = queue.lock();
            if !q.records.is_empty() {
                continue;
            }
            q.idle = true;
        }
        if listening {
            tokio::select! {
                biased;
                () = queue.wake.notified() => {}
                signal = &mut stop => {
                    listening = false;
                    let mut q = queue.lock();
                    q.idle = false;
                    if signal.is_ok() {
                        q.closed = true;
                    }
                    continue;
                }
            }
        } else {
            queue.wake.notified().await;
        }
        // Linger for more records, unless a full batch is waiting; a shutdown cuts the
        // linger short. Records that arrive meanwhile wake no one.
        {
            let mut q = queue.lock();
            q.idle = false;
            if q.records.len() >= max_batch || q.closed {
                continue;
            }
        }
        if listening {
            tokio::select! {
                biased;
                signal = &mut stop => {
                    listening = false;
                    if signal.is_ok() {
                        queue.lock().closed = true;
                    }
                }
                () = queue.wake.notified() => {}
                () = tokio::time::sleep(LINGER) => {}
            }
        } else {
            tokio::select! {
                () = queue.wake.notified() => {}
                () = tokio::time::sleep(LINGER) => {}
            }
        }
    }
    if let Err(e) = sink.flush().await {
        stats.sink_errors.fetch_add(1, Ordering::Relaxed);
        tracing::error!(target: "palisade::cost", error = %e, "usage sink flush failed");
    }
}

async fn write<S: UsageSink>(
    sink: &S,
    config: &RecorderConfig,
    batch: &[UsageRecord],
    stats: &CostStats,
) {
    let mut backoff = config.retry_backoff;
    let mut attempt = 0;
    loop {
        match sink.record_batch(batch).await {
            Ok(()) => {
                stats
                    .written
                    .fetch_add(batch.len() as u64, Ordering::Release);
                return;
            }
            Err(e) => {
                stats.sink_errors.fetch_add(1, Ordering::Relaxed);
                if !e.is_retryable() || attempt >= config.retries {
                    stats
                        .failed
                        .fetch_add(batch.len() as u64, Ordering::Release);
                    tracing::error!(target: "palisade::cost", error = %e, records = batch.len(),
                        "usage sink failed: batch lost");
                    return;
                }
                tracing::warn!(target: "palisade::cost", error = %e, attempt, "usage sink failed: retrying");
                attempt += 1;
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use super::*;
    use crate::cost::usage::Usage;

    /// Record `n`: model `m{n}`, `n` input tokens (the sinks' unit tests share it).
    pub(super) fn rec(n: u64) -> UsageRecord {
        UsageRecord::new(
            SystemTime::UNIX_EPOCH,
            Some(format!("m{n}")),
            Usage {
                input_tokens: n,
                ..Usage::default()
            },
            None,
        )
    }

    /// Records `each` records from each of `threads` threads at once (thread `t` records
    /// `t * 1_000_000 + i` in order) and waits for the threads.
    fn record_from_threads(r: &UsageRecorder, threads: u64, each: u64) {
        let threads: Vec<_> = (0..threads)
            .map(|t| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..each {
                        assert!(r.record(rec(t * 1_000_000 + i)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    /// A sink that fails a set number of times, and can be held shut to fill the queue.
    struct Flaky {
        failures: Mutex<u32>,
        retryable: bool,
        gate: tokio::sync::Semaphore,
        got: Mutex<Vec<u64>>,
        flushed: Mutex<bool>,
    }

    impl UsageSink for Flaky {
        async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
            let _permit = self.gate.acquire().await.unwrap();
            {
                let mut f = self.failures.lock().unwrap();
                if *f > 0 {
                    *f -= 1;
                    return Err(if self.retryable {
                        SinkError::Unavailable("down".into())
                    } else {
                        SinkError::Rejected("bad".into())
                    });
                }
            }
            self.got
                .lock()
                .unwrap()
                .extend(batch.iter().map(|r| r.usage.input_tokens));
            Ok(())
        }

        async fn flush(&self) -> Result<(), SinkError> {
            *self.flushed.lock().unwrap() = true;
            Ok(())
        }
    }

    fn flaky(failures: u32, retryable: bool, permits: usize) -> Arc<Flaky> {
        Arc::new(Flaky {
            failures: Mutex::new(failures),
            retryable,
            gate: tokio::sync::Semaphore::new(permits),
            got: Mutex::new(Vec::new()),
            flushed: Mutex::new(false),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn retries_then_writes_in_order_and_flushes() {
        let sink = flaky(2, true, 1000);
        let (rec_, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        for i in 0..5 {
            assert!(rec_.record(rec(i)));
        }
        let stats = shut.shutdown().await;
        assert_eq!(*sink.got.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(*sink.flushed.lock().unwrap());
        assert_eq!(stats.written, 5);
        assert_eq!(stats.sink_errors, 2);
        assert_eq!(stats.failed, 0);
        // after shutdown, records are refused and counted
        assert!(!rec_.record(rec(9)));
        assert_eq!(rec_.stats().snapshot().dropped_closed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_shutdown_handle_detaches() {
        let sink = flaky(0, true, 1000);
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        let task_stats = Arc::clone(shut.stats());
        drop(shut);
        assert!(r.record(rec(1)));
        assert!(r.record(rec(2)));
        drop(r);
        // the task drains and ends once every recorder is gone
        while task_stats.snapshot().written < 2 {
            tokio::task::yield_now().await;
        }
        assert_eq!(*sink.got.lock().unwrap(), vec![1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_within_gives_up_on_a_hung_sink() {
        let sink = flaky(0, true, 0); // never lets a batch through
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        r.record(rec(1));
        r.record(rec(2));
        let err = shut
            .shutdown_within(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.queued, 2);
        assert_eq!(err.written, 0);
        // a healthy sink finishes in time
        let sink = flaky(0, true, 100);
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        r.record(rec(1));
        let ok = shut.shutdown_within(Duration::from_secs(5)).await.unwrap();
        assert_eq!(ok.written, 1);
    }

    /// Records from several threads at once, while the writer drains: none lost, none
    /// twice, each thread's in its order (a wake-up missed between the writer's look and
    /// its wait would leave records behind until shutdown; the test waits for them first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_all_arrive_once_in_order_without_shutdown() {
        let sink = flaky(0, true, usize::MAX >> 4);
        let cfg = RecorderConfig {
            capacity: 100_000,
            max_batch: 64,
            ..RecorderConfig::default()
        };
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), cfg);
        record_from_threads(&r, 4, 5_000);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while r.stats().snapshot().written < 20_000 {
            assert!(std::time::Instant::now() < deadline, "records left behind");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stats = shut.shutdown().await;
        assert_eq!(
            (stats.queued, stats.written, stats.dropped_full),
            (20_000, 20_000, 0)
        );
        let got = sink.got.lock().unwrap().clone();
        for t in 0..4u64 {
            let mine: Vec<u64> = got.iter().copied().filter(|n| n / 1_000_000 == t).collect();
            assert_eq!(
                mine,
                (0..5_000).map(|i| t * 1_000_000 + i).collect::<Vec<_>>()
            );
        }
    }

    /// Wake-ups of the writer per record when `per_ms` records arrive each millisecond,
    /// the writer free to run between any two of them.
    async fn wakeups_per_record(per_ms: u64) -> f64 {
        let sink = Arc::new(MemorySink::new());
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        const N: u64 = 20_000;
        for i in 0..N {
            assert!(r.record(rec(i)));
            tokio::task::yield_now().await;
            if i % per_ms == per_ms - 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let wakeups = r.queue.wakeups.load(Ordering::Relaxed);
        let stats = shut.shutdown().await;
        assert_eq!(stats.written, N);
        assert_eq!(sink.len() as u64, N);
        wakeups as f64 / N as f64
    }

    /// Under a steady stream of records the writer is woken about once per linger (or
    /// per full batch), not once per record: each wake-up is a cross-thread futex wake and
    /// a task poll, costly on small machines.
    #[tokio::test(start_paused = true)]
    async fn a_steady_stream_wakes_the_writer_about_once_per_linger() {
        for (per_ms, most) in [(1, 1.0), (10, 0.11), (100, 0.011), (1000, 0.0015)] {
            let w = wakeups_per_record(per_ms).await;
            eprintln!("{per_ms} records per ms: {w:.4} wake-ups per record");
            assert!(
                w <= most,
                "{per_ms} records per ms: {w} wake-ups per record"
            );
        }
    }

    /// The writer lingers for more records after the first; a shutdown then waited out
    /// the linger. It stops it at once.
    #[tokio::test(start_paused = true)]
    async fn shutdown_does_not_wait_out_the_linger() {
        let sink = Arc::new(MemorySink::new());
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        r.record(rec(1));
        tokio::task::yield_now().await; // the writer wakes and lingers
        let start = tokio::time::Instant::now();
        let stats = shut.shutdown().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(stats.written, 1);
    }

    /// `queued` was counted after the queue's lock was released, so the writer could take
    /// and write a record first, and a reader saw `written > queued`. Two threads record
    /// while a third reads the counters.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_never_sees_more_written_than_queued() {
        let sink = flaky(0, true, usize::MAX >> 4);
        let cfg = RecorderConfig {
            capacity: 1_000_000,
            max_batch: 1,
            ..RecorderConfig::default()
        };
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), cfg);
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let stats = Arc::clone(r.stats());
            let done = Arc::clone(&done);
            std::thread::spawn(move || {
                let mut bad = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let s = stats.snapshot();
                    if s.written + s.failed > s.queued {
                        bad += 1;
                    }
                }
                bad
            })
        };
        record_from_threads(&r, 2, 100_000);
        let stats = shut.shutdown().await;
        done.store(true, Ordering::Relaxed);
        assert_eq!(reader.join().unwrap(), 0, "snapshots with written > queued");
        assert_eq!(stats.written, 200_000);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_rejection() {
        let sink = flaky(1, false, 1000);
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        r.record(rec(1));
        let stats = shut.shutdown().await;
        assert_eq!(stats.failed, 1);
        assert_eq!(stats.written, 0);
        assert!(sink.got.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_drops_and_counts_without_blocking() {
        let sink = flaky(0, true, 0); // the sink blocks until released
        let cfg = RecorderConfig {
            capacity: 4,
            max_batch: 2,
            ..RecorderConfig::default()
        };
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), cfg);
        r.record(rec(0));
        r.record(rec(1));
        tokio::task::yield_now().await; // the task takes a batch of 2 and waits on the sink
        let accepted = (2..20).filter(|i| r.record(rec(*i))).count();
        assert_eq!(accepted, 4);
        assert_eq!(r.stats().snapshot().dropped_full, 14);
        sink.gate.add_permits(100);
        let stats = shut.shutdown().await;
        assert_eq!(stats.written, 6);
        assert_eq!(*sink.got.lock().unwrap(), vec![0, 1, 2, 3, 4, 5]);
    }

    /// A sink that takes 1 ms per batch.
    struct Slow(Mutex<u64>);

    impl UsageSink for Slow {
        async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            *self.0.lock().unwrap() += batch.len() as u64;
            Ok(())
        }

        async fn flush(&self) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// Records keep arriving faster than the writer drains them (a slow sink, a steady
    /// stream): the writer, never finding the queue empty, never looked at the shutdown
    /// signal, so `shutdown` waited for the traffic to stop. It closes the queue at once
    /// and writes what was accepted.
    #[tokio::test(start_paused = true)]
    async fn shutdown_under_steady_traffic_closes_the_queue() {
        let sink = Arc::new(Slow(Mutex::new(0)));
        let (r, shut) = UsageRecorder::spawn(Arc::clone(&sink), RecorderConfig::default());
        let producer = {
            let r = r.clone();
            tokio::spawn(async move {
                let mut i = 0;
                loop {
                    r.record(rec(i));
                    i += 1;
                    tokio::time::sleep(Duration::from_micros(100)).await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let stats = tokio::time::timeout(Duration::from_secs(1), shut.shutdown())
            .await
            .expect("shutdown waited for the traffic to stop");
        producer.abort();
        assert!(stats.queued > 0);
        assert_eq!(stats.written, stats.queued, "{stats:?}");
        assert_eq!(*sink.0.lock().unwrap(), stats.written);
        assert!(!r.record(rec(0)), "the queue is closed");
    }
}
