//! A retry budget: retries may add at most a fixed share of the normal load.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How many slots the sliding window is cut into.
const SLOTS: usize = 10;
/// One token, in the budget's fixed-point unit.
const UNIT: i64 = 1000;
/// Deposits between two looks at the clock on the first-attempt path (at least).
const CLOCK_EVERY: i64 = 32;
/// The largest reserve, in thousandths of a retry.
const MAX_RESERVE: i64 = 1 << 60;
/// A slot holds its amount shifted left by this many bits, over the low bits of the
/// generation it belongs to (its tag): adding or taking whole shifted amounts never
/// changes the tag, and a withdrawal learns from the value it took from which generation's
/// slot its token went to.
const TAG_BITS: u32 = 8;
/// The tag bits of a slot.
const TAG_MASK: i64 = (1 << TAG_BITS) - 1;
/// Generations after which a slot's tag repeats: a slot is reused every `SLOTS`
/// generations, and the tag repeats every `2^TAG_BITS` (1280 = lcm(10, 256)).
const TAG_REPEAT: u64 = 1280;

/// A retry budget shared by every request of a layer (and of any layers it is cloned into).
///
/// Every first attempt deposits `ratio` of a token; every retry withdraws one token; on top
/// of that a reserve of `min_per_sec * window` tokens is always there, so a quiet service
/// can still retry a little. Deposits and withdrawals expire after `window`, which is cut
/// into slots that slide with tokio's clock. A failing upstream therefore sees at most
/// `(1 + ratio) * requests + min_per_sec * window` calls over a window, never a retry storm.
/// This is the scheme of Finagle, tower's `TpsBudget` and Envoy's retry budget (20% by
/// default).
///
/// The first-attempt path is one atomic add and, every 32 to 64 requests, one look at the
/// clock; retries look at the clock each time. So deposits are time-stamped at a
/// granularity of a few dozen requests (or of the last retry): a deposit carries the time
/// of the last look. At low request rates that can be long ago, and after a quiet spell
/// longer than the window the few deposits made since may expire at once. This only ever
/// makes the budget stricter; keep a floor (`min_per_sec`) so that a quiet service can
/// still retry.
///
/// ```
/// use std::time::Duration;
/// use palisade::retry::RetryBudget;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.5).unwrap();
/// for _ in 0..4 {
///     budget.deposit();
/// }
/// // four requests earn two retries
/// assert!(budget.withdraw());
/// assert!(budget.withdraw());
/// assert!(!budget.withdraw());
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RetryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    slot_nanos: u64,
    generation: AtomicU64,
    /// Each slot's amount (thousandths of a token) shifted left by `TAG_BITS`, over the tag
    /// of the generation it belongs to.
    slots: [AtomicI64; SLOTS],
    /// A deposit, shifted left by `TAG_BITS`.
    deposit: i64,
    /// High bits whose change, when a deposit is added, means "look at the clock": a
    /// power of two near `deposit * CLOCK_EVERY`, so the check needs no division.
    clock_mask: i64,
    reserve: i64,
    window: Duration,
    min_per_sec: u32,
    ratio: f64,
    /// Taken to move the window on (once per slot of time, never on the steady path).
    advancing: Mutex<()>,
    /// Runs once the window has moved on and the move is visible to other callers: tests
    /// put a racing caller there.
    #[cfg(test)]
    on_advance: Hook,
    /// Runs when a withdrawal found the budget spent, before its token is given back:
    /// tests pause the caller there.
    #[cfg(test)]
    on_refuse: Hook,
    /// Runs when a withdrawal has looked at the clock, before it takes its token: tests
    /// pause the caller there.
    #[cfg(test)]
    on_take: Hook,
}

/// A callback for tests (see `Inner::on_advance`).
#[cfg(test)]
#[derive(Default)]
struct Hook(std::sync::Mutex<Option<Box<dyn FnMut() + Send>>>);

#[cfg(test)]
impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Why a budget could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// The window must be at least 10 ms (one millisecond per slot).
    #[error("the retry budget window must be at least 10ms, got {0:?}")]
    WindowTooShort(Duration),
    /// The ratio must be a finite number between 0 and 1000.
    #[error("the retry budget ratio must be between 0 and 1000, got {0}")]
    Ratio(f64),
}

impl RetryBudget {
    /// A budget over a sliding `window`, with a floor of `min_per_sec` retries per second
    /// and `ratio` retries earned per request (0.2 = 20%).
    pub fn new(window: Duration, min_per_sec: u32, ratio: f64) -> Result<Self, BudgetError> {
        if let Some(err) = Self::errors(window, ratio).next() {
            return Err(err);
        }
        let slot_nanos = u64::try_from(window.as_nanos() / SLOTS as u128).unwrap_or(u64::MAX);
        // Capped far below i64::MAX so that the balance (reserve plus slots) cannot overflow
        // whatever the window: a reserve of 2^60 thousandths is retries without limit.
        let reserve =
            ((f64::from(min_per_sec) * window.as_secs_f64() * UNIT as f64) as i64).min(MAX_RESERVE);
        // Rounded down, so the effective ratio never exceeds the one asked for.
        let deposit = ((ratio * UNIT as f64).floor() as i64) << TAG_BITS;
        let period = u64::try_from(deposit.max(1 << TAG_BITS) * CLOCK_EVERY)
            .unwrap_or(1)
            .next_power_of_two();
        let clock_mask = !(i64::try_from(period).unwrap_or(i64::MAX) - 1);
        Ok(Self {
            inner: Arc::new(Inner {
                start: Instant::now(),
                slot_nanos,
                generation: AtomicU64::new(0),
                slots: Default::default(),
                deposit,
                clock_mask,
                reserve,
                window,
                min_per_sec,
                ratio,
                advancing: Mutex::new(()),
                #[cfg(test)]
                on_advance: Hook::default(),
                #[cfg(test)]
                on_refuse: Hook::default(),
                #[cfg(test)]
                on_take: Hook::default(),
            }),
        })
    }

    /// Every problem of these settings (`new` reports the first).
    pub(super) fn errors(window: Duration, ratio: f64) -> impl Iterator<Item = BudgetError> {
        let window_error =
            (window < Duration::from_millis(10)).then_some(BudgetError::WindowTooShort(window));
        let ratio_error = (!(ratio.is_finite() && (0.0..=1000.0).contains(&ratio)))
            .then_some(BudgetError::Ratio(ratio));
        window_error.into_iter().chain(ratio_error)
    }

    /// The window over which deposits and withdrawals count.
    pub fn window(&self) -> Duration {
        self.inner.window
    }

    /// The floor of retries per second.
    pub fn min_per_sec(&self) -> u32 {
        self.inner.min_per_sec
    }

    /// The retries earned per request.
    pub fn ratio(&self) -> f64 {
        self.inner.ratio
    }

    /// Records a first attempt.
    #[inline]
    pub fn deposit(&self) {
        let inner = &*self.inner;
        if inner.deposit == 0 {
            return;
        }
        let generation = inner.generation.load(Ordering::Relaxed);
        let slot = &inner.slots[(generation % SLOTS as u64) as usize];
        let before = slot.fetch_add(inner.deposit, Ordering::Relaxed);
        if (before ^ before.wrapping_add(inner.deposit)) & inner.clock_mask != 0 {
            inner.advance();
        }
    }

    /// Takes one retry from the budget: `true` if there was one to take.
    ///
    /// The token is taken first and the balance looked at after, giving it back if that
    /// went below zero: of callers racing for the last tokens, each sees the withdrawals
    /// ordered before its own, so together they never take more than there was (a loser
    /// of such a race may be refused while a winner gives its token back, which only ever
    /// makes the budget stricter).
    ///
    /// A token is taken in the slot of the time the caller looked at the clock, and the
    /// clock is looked at again after: if the window moved in between (a caller paused
    /// there), the token sits in a slot that leaves the window too soon, so it is given
    /// back and taken again in the current slot. A token is given back only while the slot
    /// it was taken from has not been cleared since, so a caller paused for a whole window
    /// cannot return a token the window has already let go; one paused for a whole window
    /// before taking took from a slot already reused, and gets that token back before it
    /// takes its one token in the current slot.
    pub fn withdraw(&self) -> bool {
        let inner = &*self.inner;
        #[cfg(test)]
        let mut hook = Some(&inner.on_take);
        loop {
            let generation = inner.advance();
            let slot = &inner.slots[(generation % SLOTS as u64) as usize];
            #[cfg(test)]
            if let Some(hook) = hook.take() {
                Inner::run(hook);
            }
            let taken = slot.fetch_sub(UNIT << TAG_BITS, Ordering::SeqCst);
            if inner.advance() != generation {
                inner.give_back(generation, taken);
                continue;
            }
            if inner.balance() >= 0 {
                return true;
            }
            #[cfg(test)]
            Inner::run(&inner.on_refuse);
            inner.give_back(generation, taken);
            return false;
        }
    }

    /// The number of whole retries available now.
    pub fn available(&self) -> u64 {
        self.inner.advance();
        u64::try_from(self.inner.balance() / UNIT).unwrap_or(0)
    }
}

/// The budget plugs into tower's own retry middleware (`tower::retry`) as well.
///
/// ```
/// use std::time::Duration;
/// use palisade::retry::RetryBudget;
/// use tower::retry::budget::Budget;
///
/// fn spend(budget: &impl Budget) -> bool {
///     budget.deposit();
///     budget.withdraw()
/// }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
/// assert!(spend(&budget));
/// # }
/// ```
impl tower::retry::budget::Budget for RetryBudget {
    fn deposit(&self) {
        RetryBudget::deposit(self);
    }

    fn withdraw(&self) -> bool {
        RetryBudget::withdraw(self)
    }
}

impl Default for RetryBudget {
    /// 10 s window, 10 retries per second, 20% of requests.
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 10, 0.2).expect("the default budget is valid")
    }
}

impl Inner {
    fn balance(&self) -> i64 {
        self.slots.iter().fold(self.reserve, |sum, s| {
            sum.saturating_add(s.load(Ordering::SeqCst) >> TAG_BITS)
        })
    }

    /// Gives back a token taken from the slot of `generation` (looked up at that
    /// generation; `taken` is the slot's value the taking replaced), unless the slot has
    /// been cleared for reuse since the taking (a caller paused for a window between
    /// taking and giving back): the token taken is gone with the slot, and giving one
    /// back would then add a token nobody deposited. The slot's tag tells: it is the one
    /// the token was taken under until the slot is cleared. A slot cleared before the
    /// taking (a caller paused for a window before it) kept the token, and gets it back.
    /// Under the lock that moves the window, so the slot cannot be cleared between the
    /// check and the add. After `TAG_REPEAT` generations the tag could repeat: the token
    /// then stays taken (stricter, never more lenient).
    fn give_back(&self, generation: u64, taken: i64) {
        let _guard = self
            .advancing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = &self.slots[(generation % SLOTS as u64) as usize];
        let moved = self
            .generation
            .load(Ordering::Acquire)
            .saturating_sub(generation);
        if moved < TAG_REPEAT && slot.load(Ordering::SeqCst) & TAG_MASK == taken & TAG_MASK {
            slot.fetch_add(UNIT << TAG_BITS, Ordering::SeqCst);
        }
    }

    /// Moves the window to the current time, clearing the slots that fell out of it, and
    /// returns the current generation.
    ///
    /// The slots are cleared before the new generation is published (under a lock, once
    /// per slot of time): a caller that sees the new generation writes into a slot that
    /// is already clear, so no deposit or withdrawal made in the new generation is wiped.
    fn advance(&self) -> u64 {
        let elapsed = Instant::now()
            .saturating_duration_since(self.start)
            .as_nanos();
        let now_gen = u64::try_from(elapsed / u128::from(self.slot_nanos)).unwrap_or(u64::MAX);
        let current = self.generation.load(Ordering::Acquire);
        if now_gen <= current {
            return current;
        }
        let guard = self
            .advancing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let current = self.generation.load(Ordering::Acquire);
        if now_gen <= current {
            return current;
        }
        // The slots of generations current+1..=now_gen are reused: clear them, tagged
        // with their new generation. (A slot of an expired generation that a slow caller
        // still writes into holds an expired deposit or withdrawal: clearing it then is
        // its expiry.)
        let stale = (now_gen - current).min(SLOTS as u64);
        for g in (now_gen + 1 - stale)..=now_gen {
            self.slots[(g % SLOTS as u64) as usize].store((g as i64) & TAG_MASK, Ordering::SeqCst);
        }
        self.generation.store(now_gen, Ordering::Release);
        drop(guard);
        #[cfg(test)]
        Inner::run(&self.on_advance);
        now_gen
    }
}

#[cfg(test)]
impl Inner {
    fn run(hook: &Hook) {
        let hook = hook
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(mut hook) = hook {
            hook();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A current-thread runtime on tokio's paused clock, for tests that step time from
    /// threads of their own.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    /// A withdrawal made just as another caller moves the window into a new slot must
    /// stay withdrawn. The window used to be moved first and its new slot cleared after,
    /// so a withdrawal landing in between was wiped out and the budget allowed one retry
    /// more than it held.
    #[test]
    fn a_withdrawal_racing_the_window_move_is_not_lost() {
        let runtime = paused_runtime();
        let handle = runtime.handle().clone();
        let _entered = runtime.enter();
        // One token (a floor of 1 retry per second over 1 s), nothing earned.
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0).unwrap();
        runtime.block_on(tokio::time::advance(Duration::from_millis(150)));
        let (racer, taken) = (budget.clone(), std::sync::Arc::new(AtomicU64::new(0)));
        let racer_taken = taken.clone();
        *budget.inner.on_advance.0.lock().unwrap() = Some(Box::new(move || {
            // Another caller, on another thread, withdraws while the window moves.
            let (racer, taken, handle) = (racer.clone(), racer_taken.clone(), handle.clone());
            std::thread::spawn(move || {
                let _entered = handle.enter();
                if racer.withdraw() {
                    taken.fetch_add(1, Ordering::SeqCst);
                }
            })
            .join()
            .unwrap();
        }));
        if budget.withdraw() {
            taken.fetch_add(1, Ordering::SeqCst);
        }
        assert_eq!(taken.load(Ordering::SeqCst), 1, "one token, one retry");
        assert!(!budget.withdraw(), "the budget is spent");
        assert_eq!(budget.available(), 0);
    }

    /// A refused withdrawal gives its token back; if its caller pauses there for a
    /// window, the window moves on meanwhile and clears the slot the token was taken
    /// from, and the token given back after that was never taken from anything: a retry
    /// out of nothing, for a whole window.
    #[test]
    fn a_refusal_paused_past_the_window_gives_back_nothing() {
        let runtime = paused_runtime();
        let handle = runtime.handle().clone();
        let _entered = runtime.enter();
        // No token at all: no floor, nothing earned.
        let budget = RetryBudget::new(Duration::from_secs(1), 0, 0.0).unwrap();
        let other = budget.clone();
        *budget.inner.on_refuse.0.lock().unwrap() = Some(Box::new(move || {
            // The refused caller is paused for a whole window, and another caller moves
            // the window on meanwhile.
            handle.block_on(tokio::time::advance(Duration::from_millis(1_050)));
            assert_eq!(other.available(), 0);
        }));
        assert!(!budget.withdraw());
        assert_eq!(budget.available(), 0, "a token appeared from nothing");
        assert!(
            !budget.withdraw(),
            "a retry from a budget that never held one"
        );
    }

    /// A withdrawal stamps its token with the slot of the time it looked at the clock.
    /// A caller paused between that look and the taking put the token in a slot about to
    /// leave the window, so it came back long before a window had passed: two retries
    /// within a tenth of a second from a budget of one a second.
    #[test]
    fn a_withdrawal_paused_before_taking_stays_taken_for_a_window() {
        let runtime = paused_runtime();
        let handle = runtime.handle().clone();
        let _entered = runtime.enter();
        // One token: a floor of 1 retry per second over 1 s, nothing earned.
        let budget = RetryBudget::new(Duration::from_secs(1), 1, 0.0).unwrap();
        *budget.inner.on_take.0.lock().unwrap() = Some(Box::new(move || {
            // The caller is paused for most of a window after looking at the clock.
            handle.block_on(tokio::time::advance(Duration::from_millis(950)));
        }));
        assert!(budget.withdraw(), "the one token");
        runtime.block_on(tokio::time::advance(Duration::from_millis(100)));
        assert_eq!(budget.available(), 0, "the token came back after 100 ms");
        assert!(!budget.withdraw(), "a second retry within the window");
    }

    /// A caller paused before taking its token while another caller moves the window a
    /// whole window on takes its token from a slot already reused by the current window:
    /// the token is taken. It was neither given back nor counted once: the withdrawal took
    /// a second token, so a budget of one refused its only retry and stayed spent.
    #[test]
    fn a_withdrawal_paused_a_window_before_taking_takes_one_token() {
        let runtime = paused_runtime();
        let handle = runtime.handle().clone();
        let _entered = runtime.enter();
        // Three tokens: a floor of 3 retries per second over 1 s, nothing earned.
        let budget = RetryBudget::new(Duration::from_secs(1), 3, 0.0).unwrap();
        let other = budget.clone();
        *budget.inner.on_take.0.lock().unwrap() = Some(Box::new(move || {
            // The caller is paused for more than a window after looking at the clock,
            // and another caller moves the window on meanwhile.
            handle.block_on(tokio::time::advance(Duration::from_millis(1_050)));
            assert_eq!(other.available(), 3);
        }));
        assert!(budget.withdraw(), "a retry from a budget of three");
        assert_eq!(budget.available(), 2, "one withdrawal, one token");
        assert!(budget.withdraw());
        assert!(budget.withdraw());
        assert!(!budget.withdraw(), "three tokens, three retries");
    }

    /// Callers on many threads withdraw while the window slides under them: no ten
    /// consecutive slots ever hold more successful withdrawals than the budget's tokens.
    /// (A success holds a token in a slot between the generation before and after its
    /// call, alive for a window.)
    #[test]
    fn withdrawals_racing_a_sliding_window_never_overspend() {
        const THREADS: usize = 4;
        const TOKENS: usize = 3;
        let runtime = paused_runtime();
        let _entered = runtime.enter();
        let budget = RetryBudget::new(Duration::from_secs(1), TOKENS as u32, 0.0).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let successes = std::sync::Mutex::new(Vec::new());
        let succeeded = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let handle = runtime.handle().clone();
                let (budget, done, successes, succeeded) = (&budget, &done, &successes, &succeeded);
                s.spawn(move || {
                    let _entered = handle.enter();
                    let mut mine = Vec::new();
                    while !done.load(Ordering::SeqCst) {
                        let before = budget.inner.generation.load(Ordering::SeqCst);
                        if budget.withdraw() {
                            mine.push((before, budget.inner.generation.load(Ordering::SeqCst)));
                            succeeded.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    successes.lock().unwrap().extend(mine);
                });
            }
            // at least 400 steps (40 windows), and on until the threads, which a busy
            // machine may start late, have withdrawn in several windows
            let mut steps = 0;
            while steps < 400 || (succeeded.load(Ordering::SeqCst) < 4 * TOKENS && steps < 400_000)
            {
                runtime.block_on(tokio::time::advance(Duration::from_millis(10)));
                std::thread::yield_now();
                steps += 1;
            }
            done.store(true, Ordering::SeqCst);
        });
        let successes = successes.into_inner().unwrap();
        assert!(successes.len() >= TOKENS, "{successes:?}");
        let last = successes.iter().map(|&(_, after)| after).max().unwrap();
        for first in 0..=last {
            let within = successes
                .iter()
                .filter(|&&(before, after)| first <= before && after < first + SLOTS as u64)
                .count();
            assert!(
                within <= TOKENS,
                "{within} retries in the window from {first}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_allows_floor_per_window() {
        let budget = RetryBudget::new(Duration::from_secs(1), 5, 0.0).unwrap();
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 5);
        // the reserve is a floor, not a balance: it is there again after the window slides
        tokio::time::advance(Duration::from_millis(1100)).await;
        let taken = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(taken, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_earn_ratio_and_expire() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 0.2).unwrap();
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 20);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(budget.available(), 20);
        tokio::time::advance(Duration::from_millis(5_100)).await;
        assert_eq!(budget.available(), 0);
        assert!(!budget.withdraw());
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides_slot_by_slot() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        for _ in 0..10 {
            budget.deposit();
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        // a retry (or every 32nd request) moves the window on
        assert_eq!(budget.available(), 10);
        for _ in 0..10 {
            budget.deposit();
        }
        assert_eq!(budget.available(), 20);
        tokio::time::advance(Duration::from_millis(5_500)).await;
        // the first ten fell out, the second ten remain
        assert_eq!(budget.available(), 10);
    }

    /// After a quiet spell longer than the window, the few deposits made since carry the
    /// time of the last look at the clock and expire when the next retry moves the window
    /// on: stricter, never more lenient; the floor still allows retries.
    #[tokio::test(start_paused = true)]
    async fn deposits_after_a_quiet_spell_expire_early_never_late() {
        let budget = RetryBudget::new(Duration::from_secs(10), 0, 1.0).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
        let floored = RetryBudget::new(Duration::from_secs(10), 1, 1.0).unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        for _ in 0..10 {
            floored.deposit();
        }
        assert!(floored.withdraw());
    }

    /// Racing callers must never take more retries than the budget holds. Checking the
    /// balance and then withdrawing, in two steps, let several callers see the last token
    /// and all take it.
    #[test]
    fn concurrent_withdrawals_never_overspend() {
        const THREADS: usize = 4;
        const TOKENS: usize = 2;
        let mut overspent = 0;
        for _ in 0..1_000 {
            // a floor of 2 retries per second over 1 s: two tokens, nothing earned
            let budget = RetryBudget::new(Duration::from_secs(1), TOKENS as u32, 0.0).unwrap();
            let barrier = std::sync::Barrier::new(THREADS);
            let taken = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        barrier.wait();
                        for _ in 0..TOKENS {
                            if budget.withdraw() {
                                taken.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let taken = taken.into_inner();
            overspent += taken.saturating_sub(TOKENS);
            assert_eq!(budget.available(), (TOKENS - taken.min(TOKENS)) as u64);
        }
        assert_eq!(overspent, 0, "retries taken beyond the budget");
    }

    /// A window of `Duration::MAX` with a floor of retries made a reserve of `i64::MAX`
    /// thousandths, and the first deposit overflowed the balance.
    #[tokio::test(start_paused = true)]
    async fn a_huge_window_does_not_overflow_the_balance() {
        let budget = RetryBudget::new(Duration::MAX, u32::MAX, 1000.0).unwrap();
        for _ in 0..100 {
            budget.deposit();
        }
        assert!(budget.withdraw());
        assert!(budget.available() > 1 << 40);
    }

    #[test]
    fn refuses_bad_settings() {
        assert_eq!(
            RetryBudget::new(Duration::from_millis(1), 1, 0.2).unwrap_err(),
            BudgetError::WindowTooShort(Duration::from_millis(1))
        );
        assert!(matches!(
            RetryBudget::new(Duration::from_secs(1), 1, -0.1),
            Err(BudgetError::Ratio(_))
        ));
        assert!(RetryBudget::new(Duration::from_secs(1), 1, f64::NAN).is_err());
    }
}
