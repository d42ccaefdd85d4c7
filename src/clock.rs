//! Where the layers read time: tokio's clock, or a cached clock for hot paths.
//!
//! ```
//! use std::time::Duration;
//! use palisade::circuit_breaker::CircuitBreakerLayer;
//! use palisade::clock::ClockSource;
//!
//! assert_eq!(ClockSource::default(), ClockSource::Tokio);
//! assert_eq!("coarse".parse::<ClockSource>().unwrap(), ClockSource::Coarse);
//! assert!("wall".parse::<ClockSource>().is_err());
//!
//! // A breaker judging the last 30 s whose closed path reads the cached clock.
//! let layer = CircuitBreakerLayer::builder()
//!     .time_window(Duration::from_secs(30))
//!     .clock(ClockSource::Coarse)
//!     .build()
//!     .unwrap();
//! # drop(layer);
//! ```
//!
//! Every layer reads time through tokio's clock by default ([`ClockSource::Tokio`]), so a
//! test that pauses it (`#[tokio::test(start_paused = true)]`, `tokio::time::advance`)
//! drives every window, open duration and limit without real sleeps.
//!
//! A read of tokio's clock is a read of the system's monotonic clock: 20 to 40 ns on a
//! virtual machine, which is more than everything else a closed circuit breaker does per
//! call. Where that matters, a layer can take a faster source instead:
//!
//! | source | cost of a read | resolution | follows tokio's paused clock |
//! |---|---|---|---|
//! | [`ClockSource::Tokio`] (default) | a system clock read (20–40 ns on a VM) | ns | yes |
//! | [`ClockSource::Fast`] | the CPU's time-stamp counter through `quanta` (10–15 ns) | ns | no |
//! | [`ClockSource::Coarse`] | one atomic load (about 1 ns) | [`COARSE_RESOLUTION`] | no |
//!
//! Tests that pause time keep the default.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How often the coarse clock's thread refreshes it (its resolution).
pub const COARSE_RESOLUTION: Duration = Duration::from_millis(1);

/// Which clock a layer reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ClockSource {
    /// tokio's clock (`tokio::time::Instant`): exact, and follows a paused or advanced
    /// test clock. A read costs a system clock read (20 to 40 ns on a VM).
    #[default]
    Tokio,
    /// The CPU's time-stamp counter through `quanta` (the clock governor uses): exact, a
    /// few ns cheaper than a system clock read, blind to tokio's paused clock.
    Fast,
    /// A cached monotonic clock: one atomic load a read, refreshed every
    /// [`COARSE_RESOLUTION`] by one background thread (named `palisade-clock`) that runs
    /// only while some layer (or store) built with this source is alive: the first starts
    /// it, and dropping the last one stops it (the drop returns once the thread has
    /// ended). Times are late by at most about a millisecond; tokio's paused clock does
    /// not move it.
    Coarse,
}

impl ClockSource {
    /// The name used in configuration (`"tokio"`, `"fast"` or `"coarse"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tokio => "tokio",
            Self::Fast => "fast",
            Self::Coarse => "coarse",
        }
    }
}

impl fmt::Display for ClockSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`ClockSource`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown clock `{0}`: expected `tokio`, `fast` or `coarse`")]
pub struct ParseClockSourceError(String);

impl FromStr for ClockSource {
    type Err = ParseClockSourceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tokio" => Ok(Self::Tokio),
            "fast" => Ok(Self::Fast),
            "coarse" => Ok(Self::Coarse),
            other => Err(ParseClockSourceError(other.to_owned())),
        }
    }
}

/// A layer's clock: nanoseconds since it was made, from the chosen source.
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    Tokio(tokio::time::Instant),
    Fast(quanta::Clock, u64),
    Coarse {
        epoch: u64,
        /// Keeps the clock thread running while this clock (or a clone) lives.
        _user: std::sync::Arc<coarse::User>,
    },
}

impl Clock {
    /// A clock reading from `source`, starting at zero now.
    pub(crate) fn new(source: ClockSource) -> Self {
        match source {
            ClockSource::Tokio => Self::Tokio(tokio::time::Instant::now()),
            ClockSource::Fast => {
                let clock = quanta::Clock::new();
                let start = clock.raw();
                Self::Fast(clock, start)
            }
            ClockSource::Coarse => {
                let _user = coarse::User::new();
                Self::Coarse {
                    epoch: coarse::now(),
                    _user,
                }
            }
        }
    }

    /// Nanoseconds since the clock was made.
    #[inline]
    pub(crate) fn nanos(&self) -> u64 {
        match self {
            Self::Tokio(epoch) => {
                let elapsed = tokio::time::Instant::now().saturating_duration_since(*epoch);
                u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
            }
            Self::Fast(clock, start) => clock.delta_as_nanos(*start, clock.raw()),
            Self::Coarse { epoch, .. } => coarse::now().saturating_sub(*epoch),
        }
    }
}

/// The process-wide cached clock, and the thread that keeps it while it has users.
mod coarse {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex, PoisonError};
    use std::thread::JoinHandle;

    use super::*;

    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    /// The ticker every coarse [`Clock`](super::Clock) reads.
    static GLOBAL: Ticker = Ticker::new();

    fn epoch() -> std::time::Instant {
        *EPOCH.get_or_init(std::time::Instant::now)
    }

    fn elapsed() -> u64 {
        u64::try_from(epoch().elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// A cached time and the thread that refreshes it while the ticker has users.
    #[derive(Debug)]
    pub(super) struct Ticker {
        /// Nanoseconds since [`EPOCH`], as last written by the thread; 0 until a thread
        /// has run (readers then read the system clock).
        now: AtomicU64,
        running: Mutex<Running>,
    }

    #[derive(Debug)]
    struct Running {
        users: usize,
        /// The thread and its stop flag, while there are users.
        thread: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    }

    impl Ticker {
        pub(super) const fn new() -> Self {
            Self {
                now: AtomicU64::new(0),
                running: Mutex::new(Running {
                    users: 0,
                    thread: None,
                }),
            }
        }

        /// Registers a user, starting the thread if it is the first.
        pub(super) fn user(&'static self) -> Arc<User> {
            let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.users += 1;
            if running.users == 1 {
                running.thread = self.start();
            }
            Arc::new(User(self))
        }

        fn start(&'static self) -> Option<(Arc<AtomicBool>, JoinHandle<()>)> {
            // Readers may go on before the thread's first write: give them a time now.
            self.now.fetch_max(elapsed(), Ordering::Release);
            let stop = Arc::new(AtomicBool::new(false));
            let stopped = stop.clone();
            let spawned = std::thread::Builder::new()
                .name("palisade-clock".to_owned())
                .spawn(move || {
                    while !stopped.load(Ordering::Acquire) {
                        self.now.fetch_max(elapsed(), Ordering::Release);
                        std::thread::park_timeout(COARSE_RESOLUTION);
                    }
                });
            match spawned {
                Ok(handle) => Some((stop, handle)),
                Err(err) => {
                    // Without its thread the cached time would stand still: readers read
                    // the system clock instead (correct, only slower), and the logs say why.
                    self.now.store(0, Ordering::Release);
                    tracing::error!(%err, "palisade: could not start the coarse clock thread");
                    None
                }
            }
        }

        /// The cached time.
        #[inline]
        pub(super) fn now(&self) -> u64 {
            match self.now.load(Ordering::Acquire) {
                0 => slow_now(),
                now => now,
            }
        }

        /// Whether the thread runs.
        #[cfg(test)]
        pub(super) fn is_running(&self) -> bool {
            let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
            running.thread.is_some()
        }
    }

    /// A user of a ticker; the last one dropped stops its thread, and has joined it when
    /// the drop returns.
    #[derive(Debug)]
    pub(crate) struct User(&'static Ticker);

    impl User {
        /// A user of the process-wide ticker.
        pub(crate) fn new() -> Arc<Self> {
            GLOBAL.user()
        }
    }

    impl Drop for User {
        fn drop(&mut self) {
            let mut running = self
                .0
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            running.users -= 1;
            if running.users == 0 {
                if let Some((stop, handle)) = running.thread.take() {
                    stop.store(true, Ordering::Release);
                    handle.thread().unpark();
                    // The thread takes no lock: it ends within its current tick.
                    let _ = handle.join();
                }
            }
        }
    }

    /// The cached time, in nanoseconds since the process first asked for it.
    #[inline]
    pub(super) fn now() -> u64 {
        GLOBAL.now()
    }

    #[cold]
    fn slow_now() -> u64 {
        elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for source in [ClockSource::Tokio, ClockSource::Fast, ClockSource::Coarse] {
            assert_eq!(source.to_string().parse::<ClockSource>().unwrap(), source);
        }
        assert_eq!(
            " Coarse ".parse::<ClockSource>().unwrap(),
            ClockSource::Coarse
        );
        let err = "wall".parse::<ClockSource>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown clock `wall`: expected `tokio`, `fast` or `coarse`"
        );
        let json = serde_json::to_string(&ClockSource::Coarse).unwrap();
        assert_eq!(json, r#""coarse""#);
        assert_eq!(
            serde_json::from_str::<ClockSource>(r#""tokio""#).unwrap(),
            ClockSource::Tokio
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_source_follows_the_paused_clock() {
        let clock = Clock::new(ClockSource::Tokio);
        assert_eq!(clock.nanos(), 0);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.nanos(), 1_500_000_000);
    }

    #[test]
    fn fast_source_moves_forward() {
        let clock = Clock::new(ClockSource::Fast);
        let first = clock.nanos();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while clock.nanos() == first {
            assert!(
                std::time::Instant::now() < deadline,
                "the fast clock stood still"
            );
        }
    }

    #[test]
    fn coarse_source_moves_with_real_time_and_never_back() {
        let clock = Clock::new(ClockSource::Coarse);
        let first = clock.nanos();
        // Wait (by polling, no sleep) until the clock thread has refreshed the time.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut last = first;
        while last == first {
            assert!(
                std::time::Instant::now() < deadline,
                "the coarse clock did not move in 30 s"
            );
            std::thread::yield_now();
            let now = clock.nanos();
            assert!(now >= last, "the coarse clock went back: {now} < {last}");
            last = now;
        }
        // Another clock made now starts at zero and stays behind the first.
        let second = Clock::new(ClockSource::Coarse);
        assert!(second.nanos() <= clock.nanos());
    }

    /// A ticker's thread runs while the ticker has users and has ended (joined) when the
    /// last one is dropped; the next user starts it again. (A ticker of this test's own,
    /// so that clocks of other tests do not keep it running.)
    #[test]
    fn the_coarse_clock_thread_stops_when_no_clock_uses_it() {
        let ticker: &'static coarse::Ticker = Box::leak(Box::new(coarse::Ticker::new()));
        assert!(!ticker.is_running());
        let user = ticker.user();
        let copy = user.clone();
        let other = ticker.user();
        assert!(ticker.is_running());
        drop(user);
        drop(other);
        assert!(ticker.is_running(), "a clone keeps the thread");
        drop(copy);
        assert!(!ticker.is_running(), "the thread still runs without users");
        let again = ticker.user();
        assert!(ticker.is_running());
        let first = ticker.now();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while ticker.now() == first {
            assert!(
                std::time::Instant::now() < deadline,
                "the restarted clock stood still"
            );
            std::thread::yield_now();
        }
        drop(again);
        assert!(!ticker.is_running());
    }
}
