//! The sliding windows a breaker judges the upstream by, lock-free.
//!
//! - [`CountWindow`]: a ring of the last N outcomes (one byte each) and one packed
//!   `AtomicU64` of totals (calls, failures, slow calls; 21 bits each). A call claims the
//!   next slot with one compare-and-swap on the head, swaps its outcome into the slot, and
//!   adds to the totals the difference from the outcome it actually replaced (a writer
//!   lapped by another between claiming and writing accounts for what it found, so the
//!   totals always equal the sum over the slots once writers finish). Each field carries a
//!   bias of 2^19, so a count that is briefly below zero while writers race never borrows
//!   from its neighbour. A success into a full window of successes changes nothing and
//!   costs one atomic load (the healthy steady state). The window always slides: after
//!   10,000 successes, 50 failures in a window of 100 are 50 %.
//! - [`TimeWindow`]: a ring of per-second buckets, each one `AtomicU64` holding the
//!   second it belongs to (30 bits) and its calls and failures (17 bits each); a second
//!   ring holds slow calls. Recording is one compare-and-swap on the current bucket, which
//!   also resets a stale bucket, so the cost does not grow with the call rate. Totals are
//!   summed over the buckets (a few dozen loads) only when a failure or slow call is
//!   recorded, or a snapshot is taken.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

/// The outcome bits of one recorded call.
pub(crate) const CALL: u8 = 1;
/// The call failed.
pub(crate) const FAILED: u8 = 2;
/// The call was slow.
pub(crate) const SLOW: u8 = 4;

/// What a window holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Totals {
    pub(crate) calls: u64,
    pub(crate) failures: u64,
    pub(crate) slow: u64,
}

const BITS: u32 = 21;
const MASK: u64 = (1 << BITS) - 1;

const fn pack(outcome: u8) -> u64 {
    let mut v = 0;
    if outcome & CALL != 0 {
        v |= 1;
    }
    if outcome & FAILED != 0 {
        v |= 1 << BITS;
    }
    if outcome & SLOW != 0 {
        v |= 1 << (2 * BITS);
    }
    v
}

/// The bias of each packed field: half of the headroom above the largest window
/// ([`MAX_COUNT_WINDOW`](super::config::MAX_COUNT_WINDOW) is 2^20 - 1), so a field moved
/// briefly out of `[0, size]` by racing writers neither borrows from nor carries into its
/// neighbour.
const FIELD_BIAS: u64 = 1 << (BITS - 2);
/// The totals word of an empty window.
const EMPTY: u64 = FIELD_BIAS | (FIELD_BIAS << BITS) | (FIELD_BIAS << (2 * BITS));

const fn field(v: u64, shift: u32) -> u64 {
    ((v >> shift) & MASK).saturating_sub(FIELD_BIAS)
}

const fn unpack(v: u64) -> Totals {
    Totals {
        calls: field(v, 0),
        failures: field(v, BITS),
        slow: field(v, 2 * BITS),
    }
}

/// The last N calls.
#[derive(Debug)]
pub(crate) struct CountWindow {
    slots: Box<[AtomicU8]>,
    head: AtomicUsize,
    totals: AtomicU64,
    /// `totals` of a full window of plain successes.
    full_of_successes: u64,
}

impl CountWindow {
    /// A window of `size` calls (at most 2^20 - 1).
    pub(crate) fn new(size: usize) -> Self {
        debug_assert!(size > 0 && (size as u64) < 2 * FIELD_BIAS);
        Self {
            slots: (0..size).map(|_| AtomicU8::new(0)).collect(),
            head: AtomicUsize::new(0),
            totals: AtomicU64::new(EMPTY),
            full_of_successes: EMPTY + size as u64,
        }
    }

    /// Records one outcome; returns the totals after it when `outcome` is a failure or a
    /// slow call (the only outcomes that can trip the breaker).
    #[inline]
    pub(crate) fn record(&self, outcome: u8) -> Option<Totals> {
        let len = self.slots.len();
        if outcome == CALL && self.totals.load(Ordering::Relaxed) == self.full_of_successes {
            // A full window of plain successes: one more changes nothing (it would replace
            // a success), and since every slot holds the same outcome, which one the head
            // points at does not matter either. The healthy steady state costs one load.
            return None;
        }
        let mut i = self.head.load(Ordering::Relaxed);
        loop {
            let next = if i + 1 == len { 0 } else { i + 1 };
            match self
                .head
                .compare_exchange_weak(i, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => i = now,
            }
        }
        // Another writer may lap this one and write the same slot before it does, so the
        // change to the totals is measured against the outcome the swap actually replaced.
        // (Writing nothing when the slot already holds `outcome` changes neither the slot
        // nor the totals, so the cheap load first keeps them in step too.)
        let mut old = self.slots[i].load(Ordering::Relaxed);
        if old != outcome {
            old = self.slots[i].swap(outcome, Ordering::AcqRel);
        }
        if old != outcome {
            let delta = pack(outcome).wrapping_sub(pack(old));
            let after = self
                .totals
                .fetch_add(delta, Ordering::AcqRel)
                .wrapping_add(delta);
            if outcome & (FAILED | SLOW) != 0 {
                return Some(unpack(after));
            }
        } else if outcome & (FAILED | SLOW) != 0 {
            return Some(self.totals());
        }
        None
    }

    /// The current totals.
    pub(crate) fn totals(&self) -> Totals {
        unpack(self.totals.load(Ordering::Acquire))
    }

    /// Forgets every outcome. Each slot is emptied with a swap and its outcome taken off
    /// the totals, so a writer racing the reset still leaves totals and slots in step.
    pub(crate) fn reset(&self) {
        for slot in self.slots.iter() {
            let old = slot.swap(0, Ordering::AcqRel);
            if old != 0 {
                self.totals.fetch_sub(pack(old), Ordering::AcqRel);
            }
        }
        self.head.store(0, Ordering::Relaxed);
    }

    /// The totals recounted from the slots (for tests).
    #[cfg(test)]
    fn slot_totals(&self) -> Totals {
        let sum = self.slots.iter().fold(EMPTY, |acc, slot| {
            acc.wrapping_add(pack(slot.load(Ordering::Acquire)))
        });
        unpack(sum)
    }
}

/// A bucket's time stamp: the second, in 30 bits, so a bucket left alone is only read as
/// current again after 2^30 s (34 years), never within a process's life.
const STAMP_BITS: u32 = 30;
const STAMP_MASK: u64 = (1 << STAMP_BITS) - 1;
/// A bucket's calls and failures, 17 bits each (131,071 calls in one second, past which
/// the bucket halves both and keeps the rate).
const COUNT_BITS: u32 = 17;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const COUNT_SHIFT: u32 = STAMP_BITS;
const SECOND_SHIFT: u32 = STAMP_BITS + COUNT_BITS;

/// The calls of the last N seconds, one bucket per second.
#[derive(Debug)]
pub(crate) struct TimeWindow {
    /// stamp (30 bits) | calls (17 bits) | failures (17 bits)
    buckets: Box<[AtomicU64]>,
    /// stamp (30 bits) | slow calls (17 bits)
    slow: Box<[AtomicU64]>,
    secs: u64,
    mask: usize,
}

impl TimeWindow {
    /// A window of `secs` seconds (at most 3600).
    pub(crate) fn new(secs: u32) -> Self {
        let n = (secs as usize).next_power_of_two();
        Self {
            buckets: (0..n).map(|_| AtomicU64::new(STAMP_MASK)).collect(),
            slow: (0..n).map(|_| AtomicU64::new(STAMP_MASK)).collect(),
            secs: u64::from(secs),
            mask: n - 1,
        }
    }

    /// Records one outcome in the bucket of second `now_sec`; returns the totals after it
    /// when `outcome` is a failure or a slow call.
    #[inline]
    pub(crate) fn record(&self, now_sec: u64, outcome: u8) -> Option<Totals> {
        let stamp = now_sec & STAMP_MASK;
        let idx = (now_sec as usize) & self.mask;
        let bucket = &self.buckets[idx];
        let failed = u64::from(outcome & FAILED != 0);
        let mut cur = bucket.load(Ordering::Relaxed);
        let mut halved;
        loop {
            let (mut calls, mut failures) = if cur & STAMP_MASK == stamp {
                (
                    (cur >> COUNT_SHIFT) & COUNT_MASK,
                    (cur >> SECOND_SHIFT) & COUNT_MASK,
                )
            } else {
                (0, 0)
            };
            halved = calls == COUNT_MASK;
            if halved {
                // Saturated (131,071 calls in one second): halve, keeping the rate.
                calls /= 2;
                failures /= 2;
            }
            calls += 1;
            failures += failed;
            let new = stamp | (calls << COUNT_SHIFT) | (failures << SECOND_SHIFT);
            match bucket.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        if halved {
            // The slow calls of this second are halved with its calls, so that their
            // share (the slow call rate) stays what it was.
            let bucket = &self.slow[idx];
            let mut cur = bucket.load(Ordering::Relaxed);
            while cur & STAMP_MASK == stamp {
                let slow = (cur >> COUNT_SHIFT) & COUNT_MASK;
                let new = stamp | ((slow / 2) << COUNT_SHIFT);
                match bucket.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                }
            }
        }
        if outcome & SLOW != 0 {
            let bucket = &self.slow[idx];
            let mut cur = bucket.load(Ordering::Relaxed);
            loop {
                let slow = if cur & STAMP_MASK == stamp {
                    ((cur >> COUNT_SHIFT) & COUNT_MASK).min(COUNT_MASK - 1)
                } else {
                    0
                };
                let new = stamp | ((slow + 1) << COUNT_SHIFT);
                match bucket.compare_exchange_weak(cur, new, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(actual) => cur = actual,
                }
            }
        }
        (outcome & (FAILED | SLOW) != 0).then(|| self.totals(now_sec))
    }

    /// The totals of the seconds `(now_sec - secs, now_sec]`.
    pub(crate) fn totals(&self, now_sec: u64) -> Totals {
        let mut t = Totals::default();
        let live = |word: u64| {
            let age = now_sec.wrapping_sub(word & STAMP_MASK) & STAMP_MASK;
            age < self.secs
        };
        for (bucket, slow) in self.buckets.iter().zip(self.slow.iter()) {
            let word = bucket.load(Ordering::Acquire);
            if live(word) {
                t.calls += (word >> COUNT_SHIFT) & COUNT_MASK;
                t.failures += (word >> SECOND_SHIFT) & COUNT_MASK;
            }
            let word = slow.load(Ordering::Acquire);
            if live(word) {
                t.slow += (word >> COUNT_SHIFT) & COUNT_MASK;
            }
        }
        t.slow = t.slow.min(t.calls);
        t
    }

    /// Forgets every outcome.
    pub(crate) fn reset(&self) {
        for b in self.buckets.iter().chain(self.slow.iter()) {
            // Keep the stamp, zero the counts.
            let word = b.load(Ordering::Relaxed);
            b.store(word & STAMP_MASK, Ordering::Release);
        }
    }
}

/// Either window.
#[derive(Debug)]
pub(crate) enum Window {
    Count(CountWindow),
    Time(TimeWindow),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_window_slides_after_a_long_run_of_successes() {
        let w = CountWindow::new(100);
        for _ in 0..10_000 {
            assert_eq!(w.record(CALL), None);
        }
        assert_eq!(
            w.totals(),
            Totals {
                calls: 100,
                failures: 0,
                slow: 0
            }
        );
        let mut last = Totals::default();
        for i in 1..=50 {
            last = w.record(CALL | FAILED).unwrap();
            assert_eq!(last.failures, i);
        }
        assert_eq!(last.calls, 100);
        assert_eq!(last.failures, 50);
        // 100 more failures: the window is all failures, never more than its size
        for _ in 0..100 {
            last = w.record(CALL | FAILED).unwrap();
        }
        assert_eq!(last.failures, 100);
        // slow successes replace failures
        for _ in 0..30 {
            w.record(CALL | SLOW);
        }
        assert_eq!(
            w.totals(),
            Totals {
                calls: 100,
                failures: 70,
                slow: 30
            }
        );
        w.reset();
        assert_eq!(w.totals(), Totals::default());
        assert_eq!(
            w.record(CALL | FAILED),
            Some(Totals {
                calls: 1,
                failures: 1,
                slow: 0
            })
        );
    }

    /// The all-success fast path leaves the head where it is; a failure recorded after it
    /// must still leave the window after exactly `size` more calls.
    #[test]
    fn a_failure_after_a_full_window_of_successes_slides_out_after_size_calls() {
        for size in [1usize, 2, 7, 100] {
            let w = CountWindow::new(size);
            for _ in 0..(3 * size + 1) {
                assert_eq!(w.record(CALL), None);
            }
            assert_eq!(w.totals().calls, size as u64);
            assert_eq!(w.record(CALL | FAILED).unwrap().failures, 1);
            for i in 1..size {
                w.record(CALL);
                assert_eq!(w.totals().failures, 1, "size {size}: {i} calls after it");
            }
            w.record(CALL);
            assert_eq!(w.totals().failures, 0, "size {size}: slid out");
            assert_eq!(w.totals().calls, size as u64);
        }
    }

    /// Several threads record into one window at once; afterwards the totals must equal
    /// what the slots hold. Before each writer accounted for the outcome it actually
    /// replaced, a writer lapped between claiming a slot and writing it added its change on
    /// top of the other's, leaving phantom failures that never aged out (and, in a window
    /// of one, a packed count that wrapped).
    #[test]
    fn count_window_totals_match_the_slots_after_concurrent_writers() {
        const THREADS: usize = 4;
        const RECORDS: usize = 100_000;
        for size in [1usize, 2, 3, 16, 100] {
            let w = CountWindow::new(size);
            std::thread::scope(|s| {
                for t in 0..THREADS {
                    let w = &w;
                    s.spawn(move || {
                        for i in 0..RECORDS {
                            let outcome = match (i * 7 + t * 3) % 6 {
                                0 => CALL | FAILED,
                                1 => CALL | SLOW,
                                2 => CALL | FAILED | SLOW,
                                _ => CALL,
                            };
                            w.record(outcome);
                        }
                    });
                }
            });
            let totals = w.totals();
            assert_eq!(totals, w.slot_totals(), "size {size}");
            assert_eq!(totals.calls, size as u64, "size {size}");
            assert!(totals.failures <= totals.calls, "size {size}: {totals:?}");
            assert!(totals.slow <= totals.calls, "size {size}: {totals:?}");
            w.reset();
            assert_eq!(w.totals(), Totals::default());
            assert_eq!(w.slot_totals(), Totals::default());
        }
    }

    /// A reset that races writers leaves the totals equal to the slots.
    #[test]
    fn count_window_reset_racing_writers_keeps_totals_in_step() {
        let w = CountWindow::new(8);
        std::thread::scope(|s| {
            for t in 0..3 {
                let w = &w;
                s.spawn(move || {
                    for i in 0..50_000 {
                        w.record(if (i + t) % 3 == 0 {
                            CALL | FAILED
                        } else {
                            CALL
                        });
                    }
                });
            }
            let w = &w;
            s.spawn(move || {
                for _ in 0..2_000 {
                    w.reset();
                }
            });
        });
        assert_eq!(w.totals(), w.slot_totals());
    }

    #[test]
    fn time_window_expires_old_seconds() {
        let w = TimeWindow::new(10);
        for _ in 0..1000 {
            w.record(5, CALL);
        }
        let t = w.record(5, CALL | FAILED).unwrap();
        assert_eq!((t.calls, t.failures), (1001, 1));
        let t = w.record(14, CALL | FAILED | SLOW).unwrap();
        assert_eq!((t.calls, t.failures, t.slow), (1002, 2, 1));
        // second 5 has left the window at 15
        let t = w.record(15, CALL | FAILED).unwrap();
        assert_eq!((t.calls, t.failures, t.slow), (2, 2, 1));
        // a bucket reused after a lap starts from zero (16 buckets for 10 s: 5 + 16 = 21)
        let t = w.record(21, CALL | FAILED).unwrap();
        assert_eq!((t.calls, t.failures), (3, 3));
        // far later, everything has expired
        assert_eq!(w.totals(100), Totals::default());
        w.reset();
        assert_eq!(w.totals(21), Totals::default());
    }

    /// A bucket left alone for 2^22 seconds (about 48.5 days) must not be read as current:
    /// with a 22-bit time stamp its stamp came round to the current second's again, and
    /// the calls and failures of seven weeks ago counted as this second's.
    #[test]
    fn time_window_forgets_a_bucket_left_idle_for_48_days() {
        let w = TimeWindow::new(10);
        for _ in 0..50 {
            w.record(5, CALL | FAILED);
        }
        let later = 5 + (1 << 22);
        let t = w.record(later, CALL).unwrap_or_else(|| w.totals(later));
        assert_eq!((t.calls, t.failures), (1, 0), "{t:?}");
        let t = w.record(later, CALL | FAILED).unwrap();
        assert_eq!((t.calls, t.failures), (2, 1), "{t:?}");
        // and neither a bucket of another second, read by the totals only
        w.record(7, CALL | FAILED);
        assert_eq!(w.totals(7 + (1 << 22)).failures, 1);
    }

    /// Past 131,071 calls in one second a bucket halves its calls and failures; its slow
    /// calls must be halved with them, or the slow call rate grows past the true one and
    /// the breaker opens on a healthy upstream.
    #[test]
    fn time_window_keeps_the_slow_call_rate_when_a_bucket_halves() {
        let w = TimeWindow::new(1);
        let n = COUNT_MASK * 3 / 2;
        for i in 0..n {
            // two calls in five are slow: 40 %
            w.record(0, if i % 5 < 2 { CALL | SLOW } else { CALL });
        }
        let t = w.totals(0);
        let rate = t.slow as f64 / t.calls as f64;
        assert!((rate - 0.4).abs() < 0.01, "slow call rate {rate}: {t:?}");
    }

    #[test]
    fn time_window_saturates_by_halving() {
        let w = TimeWindow::new(1);
        for i in 0..(COUNT_MASK + 10) {
            w.record(0, if i % 4 == 0 { CALL | FAILED } else { CALL });
        }
        let t = w.totals(0);
        assert!(t.calls > COUNT_MASK / 2 && t.calls <= COUNT_MASK, "{t:?}");
        let rate = t.failures as f64 / t.calls as f64;
        assert!((rate - 0.25).abs() < 0.01, "{rate}");
    }
}
