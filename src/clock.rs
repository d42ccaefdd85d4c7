//! Where the layers read time: tokio's clock, or a cached clock for hot paths.
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
//!
//! ```
//! use palisade::clock::ClockSource;
//!
//! assert_eq!(ClockSource::default(), ClockSource::Tokio);
//! assert_eq!("coarse".parse::<ClockSource>().unwrap(), ClockSource::Coarse);
//! assert!("wall".parse::<ClockSource>().is_err());
//! ```

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
    /// it, and it stops within a tick of the last one being dropped. Times are late by at
    /// most about a millisecond; tokio's paused clock does not move it.
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
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    /// Nanoseconds since [`EPOCH`], as last written by the clock thread; 0 when no thread
    /// keeps it (readers then read the system clock).
    static NOW: AtomicU64 = AtomicU64::new(0);
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    /// Live [`User`]s: the thread runs while this is above 0.
    static USERS: Mutex<usize> = Mutex::new(0);
    /// Bumped to start and to stop a thread: a thread runs while it equals the value it
    /// started with.
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    /// Clock threads running now (a stopped one may finish its last tick).
    static THREADS: AtomicU64 = AtomicU64::new(0);

    fn epoch() -> std::time::Instant {
        *EPOCH.get_or_init(std::time::Instant::now)
    }

    fn elapsed(epoch: std::time::Instant) -> u64 {
        u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A user of the cached clock; the last one dropped stops the thread.
    #[derive(Debug)]
    pub(crate) struct User(());

    impl User {
        /// Registers a user, starting the thread if it is the first.
        pub(crate) fn new() -> Arc<Self> {
            let epoch = epoch();
            let mut users = USERS.lock().unwrap_or_else(PoisonError::into_inner);
            *users += 1;
            if *users == 1 {
                start(epoch);
            }
            Arc::new(User(()))
        }
    }

    impl Drop for User {
        fn drop(&mut self) {
            let mut users = USERS.lock().unwrap_or_else(PoisonError::into_inner);
            *users -= 1;
            if *users == 0 {
                // The thread sees the new generation at its next tick and ends.
                GENERATION.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Starts a clock thread (called with [`USERS`] locked, going from 0 to 1).
    fn start(epoch: std::time::Instant) {
        let generation = GENERATION.fetch_add(1, Ordering::AcqRel) + 1;
        // Readers may go on before the thread's first write: give them a time now.
        NOW.fetch_max(elapsed(epoch).max(1), Ordering::Release);
        THREADS.fetch_add(1, Ordering::AcqRel);
        let spawned = std::thread::Builder::new()
            .name("palisade-clock".to_owned())
            .spawn(move || {
                while GENERATION.load(Ordering::Acquire) == generation {
                    NOW.fetch_max(elapsed(epoch).max(1), Ordering::Release);
                    std::thread::sleep(COARSE_RESOLUTION);
                }
                THREADS.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(err) = spawned {
            THREADS.fetch_sub(1, Ordering::AcqRel);
            // Without its thread the cached time would stand still: readers read the system
            // clock instead (correct, only slower), and the logs say why.
            NOW.store(0, Ordering::Release);
            tracing::error!(%err, "palisade: could not start the coarse clock thread");
        }
    }

    /// The cached time, in nanoseconds since the process first asked for it.
    #[inline]
    pub(super) fn now() -> u64 {
        match NOW.load(Ordering::Acquire) {
            0 => slow_now(),
            now => now,
        }
    }

    #[cold]
    fn slow_now() -> u64 {
        elapsed(epoch()).max(1)
    }

    #[cfg(test)]
    pub(super) fn users() -> usize {
        *USERS.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(super) fn threads() -> u64 {
        THREADS.load(Ordering::Acquire)
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
        assert!(coarse::users() >= 1 && coarse::threads() >= 1);
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

    /// The clock thread stops once no clock uses it (other tests may hold coarse clocks for
    /// a moment, so this waits until none does), and starts again for the next user.
    #[test]
    fn the_coarse_clock_thread_stops_when_no_clock_uses_it() {
        let clock = Clock::new(ClockSource::Coarse);
        let copy = clock.clone();
        drop(clock);
        assert!(coarse::users() >= 1, "a clone keeps the thread");
        drop(copy);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while coarse::users() > 0 || coarse::threads() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the clock thread still runs without users"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let again = Clock::new(ClockSource::Coarse);
        assert!(coarse::threads() >= 1);
        let first = again.nanos();
        while again.nanos() == first {
            assert!(
                std::time::Instant::now() < deadline,
                "the restarted clock stood still"
            );
            std::thread::yield_now();
        }
    }
}
