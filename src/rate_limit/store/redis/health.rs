//! Failure episodes: logged once, counted, and visible in a snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::RedisFailMode;

/// What the store has seen of Redis, for a health endpoint or metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisHealth {
    /// Whether the last round trip succeeded (true before the first).
    pub healthy: bool,
    /// How long the current failure episode has lasted (`None` while healthy).
    pub unhealthy_for: Option<Duration>,
    /// Decisions, peeks and settlements that Redis answered, each call of a batch once (so
    /// under load more than the script calls Redis ran; resets are not counted).
    pub round_trips: u64,
    /// Decisions, peeks and settlements that failed or timed out, each call of a batch
    /// once.
    pub failures: u64,
    /// Failure episodes (a run of failures between two successes counts once).
    pub episodes: u64,
    /// Decisions answered by the failure mode (open, or the local fallback store) instead
    /// of Redis, and peeks and settlements the local fallback store answered because
    /// Redis did not.
    pub degraded_decisions: u64,
    /// Refusals answered by the local cache of blocked keys, without a round trip.
    pub blocked_cache_hits: u64,
    /// Entries in the local cache of blocked keys.
    pub blocked_keys: usize,
    /// Decisions answered from local leases, without a round trip (see
    /// [`Lease`](super::Lease); 0 while leases are off).
    pub lease_answers: u64,
    /// Rule and key pairs holding a lease, or a mark that leasing is off for them for
    /// now (some may have expired).
    pub leased_keys: usize,
    /// Decisions that ran in Redis after the timeout had already answered them (fail
    /// closed or local), whose debits were then given back in Redis.
    pub late_debits_returned: u64,
    /// Calls (decisions, peeks, settlements) that went to Redis in one script call with
    /// others, because they were made while the connection had two calls in flight.
    pub batched_calls: u64,
    /// The failure mode in force.
    pub fail_mode: RedisFailMode,
    /// The last error (no secrets: Redis errors carry no credentials).
    pub last_error: Option<String>,
}

#[derive(Default)]
pub(super) struct Health {
    unhealthy: AtomicBool,
    round_trips: AtomicU64,
    failures: AtomicU64,
    episodes: AtomicU64,
    degraded: AtomicU64,
    hits: AtomicU64,
    returned: AtomicU64,
    batched: AtomicU64,
    since: Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
}

impl Health {
    pub fn success(&self) {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        if self.unhealthy.load(Ordering::Relaxed) && self.unhealthy.swap(false, Ordering::AcqRel) {
            let since = self
                .since
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let down = since.map(|s| s.elapsed()).unwrap_or_default();
            tracing::info!(
                down_ms = down.as_millis() as u64,
                "rate-limit Redis store recovered; decisions are shared again"
            );
        }
    }

    pub fn failure(&self, error: &str, mode: RedisFailMode) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(error.to_owned());
        if !self.unhealthy.swap(true, Ordering::AcqRel) {
            self.episodes.fetch_add(1, Ordering::Relaxed);
            *self.since.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            tracing::warn!(
                error,
                fail_mode = mode.as_str(),
                "rate-limit Redis store unavailable; following the failure mode until it answers again"
            );
        }
    }

    /// Whether the last round trip failed.
    pub fn unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Relaxed)
    }

    pub fn degraded(&self) {
        self.degraded.fetch_add(1, Ordering::Relaxed);
    }

    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub fn late_debit_returned(&self) {
        self.returned.fetch_add(1, Ordering::Relaxed);
    }

    pub fn batched(&self, calls: usize) {
        self.batched
            .fetch_add(u64::try_from(calls).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn snapshot(
        &self,
        fail_mode: RedisFailMode,
        blocked_keys: usize,
        lease_answers: u64,
        leased_keys: usize,
    ) -> RedisHealth {
        let unhealthy = self.unhealthy.load(Ordering::Acquire);
        let since = *self.since.lock().unwrap_or_else(PoisonError::into_inner);
        RedisHealth {
            healthy: !unhealthy,
            unhealthy_for: if unhealthy {
                since.map(|s| s.elapsed())
            } else {
                None
            },
            round_trips: self.round_trips.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            episodes: self.episodes.load(Ordering::Relaxed),
            degraded_decisions: self.degraded.load(Ordering::Relaxed),
            blocked_cache_hits: self.hits.load(Ordering::Relaxed),
            blocked_keys,
            lease_answers,
            leased_keys,
            late_debits_returned: self.returned.load(Ordering::Relaxed),
            batched_calls: self.batched.load(Ordering::Relaxed),
            fail_mode,
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}
