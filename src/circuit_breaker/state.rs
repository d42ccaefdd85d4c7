//! The breaker itself: its state word, transitions, permits, control handle and snapshot.
//!
//! The state and a generation number share one `AtomicU64`. A call in the closed state
//! reads it once; its outcome is recorded in the window only if the generation has not
//! moved on (so a call admitted before the circuit opened cannot pollute the next closed
//! period). Transitions take a small mutex, re-check the word, and bump the generation;
//! they are rare. Half-open probes are reserved with a compare-and-swap on a word holding
//! the generation, the probes admitted and the probes that succeeded, so exactly N are
//! admitted, and a probe dropped before it finished gives its slot back.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::clock::Clock;
use crate::jitter::{Jitter, JitterRng};
use serde::{Deserialize, Serialize};

use super::config::{CircuitBreakerConfig, WindowKind};
use super::window::{CALL, CountWindow, FAILED, SLOW, TimeWindow, Totals, Window};
use crate::classify::Outcome;

/// The state of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls pass and are counted.
    Closed,
    /// Calls are refused until the open duration has passed.
    Open,
    /// A few probe calls pass; the rest are refused until the probes decide.
    HalfOpen,
    /// Forced open by the control handle: every call is refused.
    ForcedOpen,
    /// Forced closed (the breaker is disabled): every call passes, nothing is counted.
    ForcedClosed,
    /// Every call passes and is counted, but the circuit never opens (for observing
    /// what a breaker would do before turning it on).
    MetricsOnly,
}

impl CircuitState {
    const fn to_u8(self) -> u8 {
        match self {
            CircuitState::Closed => CLOSED,
            CircuitState::Open => OPEN,
            CircuitState::HalfOpen => HALF_OPEN,
            CircuitState::ForcedOpen => FORCED_OPEN,
            CircuitState::ForcedClosed => FORCED_CLOSED,
            CircuitState::MetricsOnly => METRICS_ONLY,
        }
    }

    const fn from_u8(v: u8) -> Self {
        match v {
            CLOSED => CircuitState::Closed,
            OPEN => CircuitState::Open,
            HALF_OPEN => CircuitState::HalfOpen,
            FORCED_OPEN => CircuitState::ForcedOpen,
            FORCED_CLOSED => CircuitState::ForcedClosed,
            _ => CircuitState::MetricsOnly,
        }
    }

    /// A stable snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::ForcedClosed => "forced_closed",
            CircuitState::MetricsOnly => "metrics_only",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;
const FORCED_OPEN: u8 = 3;
const FORCED_CLOSED: u8 = 4;
const METRICS_ONLY: u8 = 5;

const fn word(generation: u64, state: u8) -> u64 {
    (generation << 8) | state as u64
}

const fn split(word: u64) -> (u64, u8) {
    (word >> 8, (word & 0xff) as u8)
}

/// Why a circuit changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum TransitionReason {
    /// The failure rate in the window reached the threshold.
    FailureRate,
    /// The slow-call rate in the window reached the threshold.
    SlowCallRate,
    /// Too many failures in a row.
    ConsecutiveFailures,
    /// The open duration passed; probing starts.
    OpenDurationElapsed,
    /// A half-open probe failed (or was slow).
    ProbeFailed,
    /// Every half-open probe succeeded.
    ProbesSucceeded,
    /// The probes did not decide within the maximum wait in half-open.
    HalfOpenTimedOut,
    /// The control handle changed the state.
    Manual,
}

/// One state change, as given to transition callbacks.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Transition {
    /// The breaker's name.
    pub name: Arc<str>,
    /// The state left.
    pub from: CircuitState,
    /// The state entered.
    pub to: CircuitState,
    /// Why.
    pub reason: TransitionReason,
    /// For a transition to [`CircuitState::Open`]: how long the circuit stays open.
    pub open_for: Option<Duration>,
}

/// A transition callback.
pub(crate) type Callback = Arc<dyn Fn(&Transition) + Send + Sync>;

/// Validated numbers the hot path uses.
#[derive(Debug)]
struct Params {
    failure_bp: u64,
    slow_bp: u64,
    slow_nanos: Option<u64>,
    minimum_calls: u64,
    consecutive: Option<u32>,
    open_duration: Duration,
    max_open_duration: Duration,
    multiplier: f64,
    jitter: Jitter,
    probes: u32,
    max_wait: Option<Duration>,
    needs_clock: bool,
}

/// What transitions change under the breaker's lock.
#[derive(Debug)]
struct Transitions {
    /// Failed half-open attempts since the circuit last closed.
    reopens: u32,
    /// The jitter generator: seeded if the configuration has a seed.
    rng: JitterRng,
}

/// The shared state of one breaker.
///
/// Aligned to 128 bytes (two cache lines, the prefetch pair on x86) so that the `Arc`'s
/// reference count, which every call increments and decrements, sits on a line of its own:
/// with several cores calling one breaker, the count's line moves between them, and the
/// state word and window it would otherwise share a line with would move too.
#[repr(align(128))]
pub(crate) struct Shared {
    name: Arc<str>,
    word: AtomicU64,
    window: Window,
    consecutive: AtomicU32,
    /// generation (low 32 bits) | probes admitted (16 bits) | probes succeeded (16 bits)
    half_open: AtomicU64,
    open_until: AtomicU64,
    half_open_deadline: AtomicU64,
    since: AtomicU64,
    clock: Clock,
    epoch_wall: SystemTime,
    params: Params,
    /// Taken by transitions (which are rare): the reopen count and the jitter generator.
    transitions: Mutex<Transitions>,
    callbacks: Vec<Callback>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

/// A fraction in basis points (1 = 10,000).
fn bp(fraction: f64) -> u64 {
    (fraction * 10_000.0).round() as u64
}

/// What a permit was admitted as (generations are truncated to [`GEN_BITS`] bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitKind {
    Closed(u64),
    Metrics(u64),
    Probe(u64),
    Untracked,
}

/// Bits of a generation a permit keeps: a call would have to outlive 2^26 transitions to
/// be mistaken for one of the current period.
const GEN_BITS: u32 = 26;
const GEN_MASK: u64 = (1 << GEN_BITS) - 1;
/// Bits of a permit's start time (microseconds since the breaker's epoch, wrapping): the
/// duration of a call shorter than 2^35 µs (9.5 hours) is exact to the microsecond.
const START_BITS: u32 = 36;
const START_MASK: u64 = (1 << START_BITS) - 1;
const START_SHIFT: u32 = 2 + GEN_BITS;

const TAG_UNTRACKED: u64 = 0;
const TAG_CLOSED: u64 = 1;
const TAG_METRICS: u64 = 2;
const TAG_PROBE: u64 = 3;

impl PermitKind {
    /// Packs the kind and the start time (in nanoseconds) in one word, so a permit is two
    /// words and the closed-path future stays small enough to be moved without `memcpy`.
    #[inline]
    const fn pack(self, start: u64) -> u64 {
        let (tag, generation) = match self {
            PermitKind::Untracked => (TAG_UNTRACKED, 0),
            PermitKind::Closed(g) => (TAG_CLOSED, g),
            PermitKind::Metrics(g) => (TAG_METRICS, g),
            PermitKind::Probe(g) => (TAG_PROBE, g),
        };
        tag | ((generation & GEN_MASK) << 2) | (((start / 1000) & START_MASK) << START_SHIFT)
    }

    #[inline]
    const fn unpack(bits: u64) -> Self {
        let generation = (bits >> 2) & GEN_MASK;
        match bits & 3 {
            TAG_CLOSED => PermitKind::Closed(generation),
            TAG_METRICS => PermitKind::Metrics(generation),
            TAG_PROBE => PermitKind::Probe(generation),
            _ => PermitKind::Untracked,
        }
    }
}

/// How long a call took, in nanoseconds, from its start (whole microseconds, wrapping at
/// [`START_BITS`]) and the time now. A clock read on another core may be a little behind
/// the one that stamped the start (time-stamp counters differ between cores): such a
/// negative duration is 0, never a wrapped one of hours that would count as slow.
#[inline]
const fn call_nanos(start: u64, now: u64) -> u64 {
    let micros = (now / 1000).wrapping_sub(start) & START_MASK;
    if micros > START_MASK / 2 {
        return 0;
    }
    micros * 1000 + now % 1000
}

/// The right to make one call. Dropped without [`Permit::complete`], a half-open probe
/// gives its slot back.
#[derive(Debug)]
pub(crate) struct Permit {
    shared: Arc<Shared>,
    /// tag (2 bits) | generation (26 bits) | start in µs (36 bits)
    bits: u64,
}

impl Permit {
    /// Records the call's outcome.
    #[inline]
    pub(crate) fn complete(mut self, outcome: Outcome) {
        let bits = std::mem::replace(&mut self.bits, TAG_UNTRACKED);
        self.shared.complete(
            PermitKind::unpack(bits),
            (bits >> START_SHIFT) & START_MASK,
            outcome,
        );
    }
}

impl Drop for Permit {
    #[inline]
    fn drop(&mut self) {
        if let PermitKind::Probe(generation) = PermitKind::unpack(self.bits) {
            self.shared.release_probe(generation);
        }
    }
}

impl Shared {
    /// A breaker from a validated configuration.
    pub(crate) fn new(cfg: &CircuitBreakerConfig, callbacks: Vec<Callback>) -> Self {
        let window = match cfg.window_kind {
            WindowKind::Count => Window::Count(CountWindow::new(cfg.window_size as usize)),
            WindowKind::Time => Window::Time(TimeWindow::new(cfg.window_size)),
        };
        let slow_nanos = cfg
            .slow_call_duration
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            name: Arc::from(cfg.name.as_str()),
            word: AtomicU64::new(word(0, CLOSED)),
            window,
            consecutive: AtomicU32::new(0),
            half_open: AtomicU64::new(0),
            open_until: AtomicU64::new(0),
            half_open_deadline: AtomicU64::new(u64::MAX),
            since: AtomicU64::new(0),
            clock: Clock::new(cfg.clock),
            epoch_wall: SystemTime::now(),
            params: Params {
                failure_bp: bp(cfg.failure_rate_threshold),
                slow_bp: bp(cfg.slow_call_rate_threshold),
                slow_nanos,
                minimum_calls: u64::from(cfg.minimum_calls),
                consecutive: cfg.consecutive_failures,
                open_duration: cfg.open_duration,
                max_open_duration: cfg.max_open_duration,
                multiplier: cfg.backoff_multiplier,
                jitter: cfg.jitter,
                probes: cfg.half_open_probes,
                max_wait: cfg.max_wait_in_half_open,
                needs_clock: slow_nanos.is_some() || cfg.window_kind == WindowKind::Time,
            },
            transitions: Mutex::new(Transitions {
                reopens: 0,
                rng: JitterRng::from_seed(cfg.seed),
            }),
            callbacks,
        }
    }

    #[inline]
    fn now(&self) -> u64 {
        self.clock.nanos()
    }

    /// The breaker's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The current state.
    pub(crate) fn state(&self) -> CircuitState {
        CircuitState::from_u8(split(self.word.load(Ordering::Acquire)).1)
    }

    /// Admits a call, or says how long to wait.
    #[inline]
    pub(crate) fn acquire(self: &Arc<Self>) -> Result<Permit, Duration> {
        loop {
            let (generation, state) = split(self.word.load(Ordering::Acquire));
            let kind = match state {
                CLOSED => PermitKind::Closed(generation),
                FORCED_CLOSED => PermitKind::Untracked,
                METRICS_ONLY => PermitKind::Metrics(generation),
                FORCED_OPEN => return Err(self.params.open_duration),
                OPEN => {
                    let now = self.now();
                    let until = self.open_until.load(Ordering::Acquire);
                    if now < until {
                        return Err(Duration::from_nanos(until - now));
                    }
                    self.transition(
                        generation,
                        OPEN,
                        HALF_OPEN,
                        TransitionReason::OpenDurationElapsed,
                    );
                    continue;
                }
                _ => {
                    if self.half_open_timed_out(generation) {
                        self.transition(
                            generation,
                            HALF_OPEN,
                            OPEN,
                            TransitionReason::HalfOpenTimedOut,
                        );
                        continue;
                    }
                    match self.reserve_probe(generation) {
                        Some(true) => PermitKind::Probe(generation),
                        // Every slot holds a probe in flight: they are waited for, however
                        // long they take (an LLM call can take minutes).
                        Some(false) => return Err(self.params.open_duration),
                        None => continue,
                    }
                }
            };
            let start = if self.params.slow_nanos.is_some() {
                self.now()
            } else {
                0
            };
            return Ok(Permit {
                shared: Arc::clone(self),
                bits: kind.pack(start),
            });
        }
    }

    /// Whether half-open has waited longer than its maximum with nothing to show: no probe
    /// in flight and none succeeded (every one admitted was ignored or cancelled). A probe
    /// still in flight is always waited for, so a slow upstream can close the breaker
    /// again; and a success is kept, however long the next call takes to come, so an
    /// upstream called once every few minutes closes the breaker after `half_open_probes`
    /// successes instead of being reopened, with no failure seen, between them.
    fn half_open_timed_out(&self, generation: u64) -> bool {
        if self.params.max_wait.is_none()
            || self.now() < self.half_open_deadline.load(Ordering::Acquire)
        {
            return false;
        }
        let h = self.half_open.load(Ordering::Acquire);
        let admitted = (h >> 32) & 0xffff;
        h & 0xffff_ffff == generation & GEN_MASK && admitted == 0
    }

    /// `Some(true)` when a probe slot was reserved, `Some(false)` when all are taken,
    /// `None` when half-open has moved on.
    fn reserve_probe(&self, generation: u64) -> Option<bool> {
        let tag = generation & GEN_MASK;
        let mut cur = self.half_open.load(Ordering::Acquire);
        loop {
            if cur & 0xffff_ffff != tag {
                return None;
            }
            let admitted = (cur >> 32) & 0xffff;
            if admitted >= u64::from(self.params.probes) {
                return Some(false);
            }
            match self.half_open.compare_exchange_weak(
                cur,
                cur + (1 << 32),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(true),
                Err(actual) => cur = actual,
            }
        }
    }

    fn release_probe(&self, generation: u64) {
        let tag = generation & GEN_MASK;
        let _ = self
            .half_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur & 0xffff_ffff == tag && (cur >> 32) & 0xffff > 0).then(|| cur - (1 << 32))
            });
    }

    #[inline]
    fn complete(&self, kind: PermitKind, start: u64, outcome: Outcome) {
        let failed = match outcome {
            Outcome::Success => false,
            Outcome::Failure => true,
            Outcome::Ignored | Outcome::Rejected => {
                if let PermitKind::Probe(generation) = kind {
                    self.release_probe(generation);
                }
                return;
            }
        };
        let (generation, counted) = match kind {
            PermitKind::Untracked => return,
            PermitKind::Probe(generation) => (generation, false),
            PermitKind::Closed(generation) | PermitKind::Metrics(generation) => (generation, true),
        };
        let now = if self.params.needs_clock {
            self.now()
        } else {
            0
        };
        let slow = self
            .params
            .slow_nanos
            .is_some_and(|limit| call_nanos(start, now) > limit);
        if !counted {
            return self.complete_probe(generation, failed, slow);
        }
        if split(self.word.load(Ordering::Acquire)).0 & GEN_MASK != generation {
            return; // admitted in an earlier period
        }
        let mut outcome = CALL;
        if failed {
            outcome |= FAILED;
        }
        if slow {
            outcome |= SLOW;
        }
        let totals = match &self.window {
            Window::Count(w) => w.record(outcome),
            Window::Time(w) => w.record(now / 1_000_000_000, outcome),
        };
        let in_a_row = match self.params.consecutive {
            Some(limit) if failed => self.consecutive.fetch_add(1, Ordering::AcqRel) + 1 >= limit,
            Some(_) => {
                if self.consecutive.load(Ordering::Relaxed) != 0 {
                    self.consecutive.store(0, Ordering::Relaxed);
                }
                false
            }
            None => false,
        };
        if !matches!(kind, PermitKind::Closed(_)) {
            return;
        }
        let reason = if in_a_row {
            Some(TransitionReason::ConsecutiveFailures)
        } else {
            totals.and_then(|t| self.trips(t))
        };
        if let Some(reason) = reason {
            self.transition(generation, CLOSED, OPEN, reason);
        }
    }

    fn trips(&self, t: Totals) -> Option<TransitionReason> {
        if t.calls < self.params.minimum_calls || t.calls == 0 {
            return None;
        }
        if t.failures * 10_000 >= self.params.failure_bp * t.calls {
            return Some(TransitionReason::FailureRate);
        }
        if self.params.slow_nanos.is_some() && t.slow * 10_000 >= self.params.slow_bp * t.calls {
            return Some(TransitionReason::SlowCallRate);
        }
        None
    }

    fn complete_probe(&self, generation: u64, failed: bool, slow: bool) {
        if failed || slow {
            self.transition(generation, HALF_OPEN, OPEN, TransitionReason::ProbeFailed);
            return;
        }
        let tag = generation & GEN_MASK;
        let probes = u64::from(self.params.probes);
        let updated = self
            .half_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur & 0xffff_ffff == tag).then(|| cur + (1 << 48))
            });
        if let Ok(prev) = updated {
            if (prev >> 48) + 1 >= probes {
                self.transition(
                    generation,
                    HALF_OPEN,
                    CLOSED,
                    TransitionReason::ProbesSucceeded,
                );
            }
        }
    }

    fn open_duration(&self, reopens: u32, rng: &mut JitterRng) -> Duration {
        let p = &self.params;
        let max = p.max_open_duration.as_secs_f64();
        let secs = p.open_duration.as_secs_f64()
            * p.multiplier
                .powi(i32::try_from(reopens.min(1024)).unwrap_or(1024));
        let nominal = if secs.is_finite() && secs < max {
            Duration::from_secs_f64(secs.max(0.0))
        } else {
            p.max_open_duration
        };
        // `previous` (read by `Jitter::Decorrelated` only) is the nominal duration itself.
        p.jitter
            .apply(nominal, p.open_duration, nominal, rng)
            .min(p.max_open_duration)
    }

    /// Moves from `(generation, from)` to `to`, if the breaker is still there.
    fn transition(&self, generation: u64, from: u8, to: u8, reason: TransitionReason) -> bool {
        let mut guard = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // `generation` may be a permit's truncated one.
        let (current, state) = split(self.word.load(Ordering::Acquire));
        if state != from || current & GEN_MASK != generation & GEN_MASK {
            return false;
        }
        let open_for = self.enter(&mut guard, current + 1, from, to);
        drop(guard);
        self.emit(from, to, reason, open_for);
        true
    }

    /// Sets the state from the control handle, whatever it was.
    pub(crate) fn force(&self, to: CircuitState) {
        let to = to.to_u8();
        let mut guard = self
            .transitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (generation, from) = split(self.word.load(Ordering::Acquire));
        if from == to && to != CLOSED {
            return;
        }
        guard.reopens = 0;
        let open_for = self.enter(&mut guard, generation + 1, from, to);
        drop(guard);
        self.emit(from, to, TransitionReason::Manual, open_for);
    }

    /// Sets up state `to` and publishes it. Called with the lock held.
    fn enter(&self, t: &mut Transitions, generation: u64, from: u8, to: u8) -> Option<Duration> {
        let now = self.now();
        let mut open_for = None;
        match to {
            OPEN => {
                if from == HALF_OPEN {
                    t.reopens = t.reopens.saturating_add(1);
                }
                let d = self.open_duration(t.reopens, &mut t.rng);
                let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                self.open_until
                    .store(now.saturating_add(nanos), Ordering::Release);
                open_for = Some(d);
            }
            HALF_OPEN => {
                self.half_open
                    .store(generation & GEN_MASK, Ordering::Release);
                let deadline = self.params.max_wait.map_or(u64::MAX, |d| {
                    now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                });
                self.half_open_deadline.store(deadline, Ordering::Release);
            }
            CLOSED => {
                t.reopens = 0;
                self.reset_window();
            }
            METRICS_ONLY if from != CLOSED => self.reset_window(),
            _ => {}
        }
        self.since.store(now, Ordering::Release);
        self.word.store(word(generation, to), Ordering::Release);
        open_for
    }

    fn reset_window(&self) {
        match &self.window {
            Window::Count(w) => w.reset(),
            Window::Time(w) => w.reset(),
        }
        self.consecutive.store(0, Ordering::Release);
    }

    fn emit(&self, from: u8, to: u8, reason: TransitionReason, open_for: Option<Duration>) {
        let from = CircuitState::from_u8(from);
        let to = CircuitState::from_u8(to);
        if matches!(to, CircuitState::Open | CircuitState::ForcedOpen) {
            tracing::warn!(breaker = %self.name, %from, %to, ?reason, ?open_for, "circuit opened");
        } else {
            tracing::info!(breaker = %self.name, %from, %to, ?reason, "circuit state changed");
        }
        if self.callbacks.is_empty() {
            return;
        }
        let t = Transition {
            name: Arc::clone(&self.name),
            from,
            to,
            reason,
            open_for,
        };
        for cb in &self.callbacks {
            cb(&t);
        }
    }

    fn totals(&self, now: u64) -> Totals {
        match &self.window {
            Window::Count(w) => w.totals(),
            Window::Time(w) => w.totals(now / 1_000_000_000),
        }
    }

    /// A point-in-time view for health reports.
    pub(crate) fn snapshot(&self) -> CircuitSnapshot {
        let now = self.now();
        let (_, state) = split(self.word.load(Ordering::Acquire));
        let t = self.totals(now);
        let rate = |n: u64| (t.calls > 0).then(|| n as f64 / t.calls as f64);
        let since = self.since.load(Ordering::Acquire);
        let next_probe_in_ms = match state {
            OPEN => Some(
                self.open_until
                    .load(Ordering::Acquire)
                    .saturating_sub(now)
                    .div_ceil(1_000_000),
            ),
            HALF_OPEN => Some(0),
            _ => None,
        };
        let probes_in_flight = (state == HALF_OPEN).then(|| {
            let h = self.half_open.load(Ordering::Acquire);
            let admitted = (h >> 32) & 0xffff;
            let succeeded = h >> 48;
            u32::try_from(admitted.saturating_sub(succeeded)).unwrap_or(u32::MAX)
        });
        let since_wall = self.epoch_wall + Duration::from_nanos(since);
        CircuitSnapshot {
            name: self.name.to_string(),
            state: CircuitState::from_u8(state),
            failure_rate: rate(t.failures),
            slow_call_rate: rate(t.slow),
            calls_in_window: t.calls,
            failures_in_window: t.failures,
            slow_calls_in_window: t.slow,
            consecutive_failures: self.consecutive.load(Ordering::Acquire),
            in_state_for_ms: now.saturating_sub(since) / 1_000_000,
            since_unix_ms: since_wall
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            next_probe_in_ms,
            half_open_probes_in_flight: probes_in_flight,
        }
    }
}

/// A serializable view of one breaker, for a `/health` endpoint.
///
/// Rates are fractions (0 to 1) of the calls in the window (`null` while the window is
/// empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CircuitSnapshot {
    /// The breaker's name.
    pub name: String,
    /// Its state.
    pub state: CircuitState,
    /// Failed calls in the window, as a fraction of the calls (0 to 1).
    pub failure_rate: Option<f64>,
    /// Slow calls in the window, as a fraction of the calls (0 to 1).
    pub slow_call_rate: Option<f64>,
    /// Calls in the window (successes and failures; ignored outcomes are not counted).
    pub calls_in_window: u64,
    /// Failed calls in the window.
    pub failures_in_window: u64,
    /// Slow calls in the window.
    pub slow_calls_in_window: u64,
    /// Failures in a row (counted only when the consecutive-failures rule is on).
    pub consecutive_failures: u32,
    /// How long the breaker has been in this state, in milliseconds.
    pub in_state_for_ms: u64,
    /// When it entered this state, in milliseconds since the Unix epoch (wall clock).
    pub since_unix_ms: u64,
    /// Open: milliseconds until probing starts; half-open: 0; otherwise `null`.
    pub next_probe_in_ms: Option<u64>,
    /// Half-open: probes admitted and not yet finished.
    pub half_open_probes_in_flight: Option<u32>,
}

/// Controls a breaker from anywhere: force it open or closed, switch it to metrics only,
/// reset it, read its state. Cheap to clone; every clone (and every layer and service built
/// from the same breaker) sees and changes the same state.
///
/// ```
/// use palisade::circuit_breaker::{CircuitBreakerLayer, CircuitState};
///
/// let layer = CircuitBreakerLayer::builder().build().unwrap();
/// let handle = layer.handle();
/// handle.force_open();
/// assert_eq!(handle.state(), CircuitState::ForcedOpen);
/// handle.reset();
/// assert_eq!(layer.handle().state(), CircuitState::Closed);
/// ```
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl CircuitBreakerHandle {
    /// The breaker's name.
    pub fn name(&self) -> &str {
        self.shared.name()
    }

    /// The current state. An open circuit whose open duration has passed reads `Open`
    /// until the next call moves it to half-open.
    pub fn state(&self) -> CircuitState {
        self.shared.state()
    }

    /// Refuse every call until [`reset`](Self::reset) or another forced state.
    pub fn force_open(&self) {
        self.shared.force(CircuitState::ForcedOpen);
    }

    /// Let every call through without counting (the breaker is disabled).
    pub fn force_closed(&self) {
        self.shared.force(CircuitState::ForcedClosed);
    }

    /// Let every call through and count it, but never open.
    pub fn metrics_only(&self) {
        self.shared.force(CircuitState::MetricsOnly);
    }

    /// Back to closed with an empty window and the open duration back at its base.
    pub fn reset(&self) {
        self.shared.force(CircuitState::Closed);
    }

    /// A serializable view of the breaker.
    pub fn snapshot(&self) -> CircuitSnapshot {
        self.shared.snapshot()
    }

    /// A layer (with the default classifier) that uses this breaker.
    pub fn layer(&self) -> super::CircuitBreakerLayer {
        super::CircuitBreakerLayer::from_handle(self.clone())
    }

    /// Whether two handles control the same breaker.
    pub fn same_breaker(&self, other: &CircuitBreakerHandle) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_read_behind_the_start_is_not_a_slow_call() {
        let start = 5_000_000u64; // µs
        assert_eq!(call_nanos(start, 5_000_000_000 + 250), 250);
        assert_eq!(call_nanos(start, 6_000_000_000), 1_000_000_000);
        // read on a core whose counter is 3 µs behind the one that stamped the start
        assert_eq!(call_nanos(start, 4_999_997_000), 0);
        // the start wraps at 2^36 µs; a call across the wrap is still measured
        let start = START_MASK - 1;
        let now = (START_MASK + 1 + 9) * 1000;
        assert_eq!(call_nanos(start, now), 11_000);
    }
}
