//! Where budget accounts live: the [`BudgetStore`] trait and the in-memory store.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Budget;
use super::layer::Settlement;
use super::period::{Period, unix_millis};
use crate::cost::pricing::Money;

/// A boxed, sendable future, as the store returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One account a request is charged to: a budget and the subject it applies to (a user
/// id, a hashed API key, a bot, or `*` for a global budget).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// The budget.
    pub budget: Arc<Budget>,
    /// Whom the budget counts for.
    pub subject: Arc<str>,
}

/// Where a store keeps a granted reservation, handed back to it at settlement
/// ([`BudgetStore::settle_hold`]). Opaque to everyone but the store that made it: the
/// Redis store keeps the time its hold expires here; the memory store keeps nothing
/// ([`Hold::NONE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Hold(u64);

impl Hold {
    /// No mark: the store finds the reservation without one.
    pub const NONE: Hold = Hold(0);

    /// A mark of the store's own making.
    pub const fn new(mark: u64) -> Self {
        Self(mark)
    }

    /// The mark [`Hold::new`] was given (0 for [`Hold::NONE`]).
    pub const fn get(self) -> u64 {
        self.0
    }
}

/// The answer of [`BudgetStore::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reserve {
    /// Every account had room: the amount is now reserved on each, in this hold.
    Granted(Hold),
    /// This account (index into the charges) had no room: nothing was reserved.
    Refused {
        /// Index of the refusing charge.
        index: usize,
        /// Settled spend of the account in its current period.
        spent: Money,
        /// When enough of the budget frees up (the next period for calendar budgets),
        /// if known.
        retry_after: Option<Duration>,
    },
}

/// A threshold an account's settled spend crossed, raised once per period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// Index into the charges.
    pub index: usize,
    /// The threshold, in thousandths of the limit (`800` = 80 %).
    pub permille: u16,
    /// Settled spend of the account in its current period.
    pub spent: Money,
}

/// The store failed (for a network store: unreachable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("budget store unavailable: {0}")]
pub struct BudgetStoreError(pub String);

/// Keeps the spend of every budget account and decides reservations atomically.
///
/// `reserve` must check and reserve **every** charge together (all or none), so that
/// concurrent requests cannot pass a check together and overshoot. `settle` replaces a
/// reservation by the actual cost; it must not block (a network store sends it in the
/// background) and reports the thresholds crossed, if it knows them.
pub trait BudgetStore: Send + Sync + 'static {
    /// Reserves `amount` on every charge, or nothing.
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        amount: Money,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Reserve, BudgetStoreError>>;

    /// Releases `reserved` on every charge, adds `actual` to its settled spend, and
    /// reports the thresholds crossed. The future is polled once on the spot; one that is
    /// not ready then (a network store) finishes on a spawned task.
    fn settle(
        &self,
        charges: Arc<[Charge]>,
        reserved: Money,
        actual: Money,
        now: SystemTime,
    ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>>;

    /// [`settle`](Self::settle) for a reservation granted in `hold` (the one
    /// [`Reserve::Granted`] answered). By default the hold is ignored; a store that marks
    /// its reservations (and a store that wraps one) overrides this.
    fn settle_hold(
        &self,
        charges: Arc<[Charge]>,
        hold: Hold,
        reserved: Money,
        actual: Money,
        now: SystemTime,
    ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
        let _ = hold;
        self.settle(charges, reserved, actual, now)
    }

    /// [`settle_hold`](Self::settle_hold), then hands its answer to `report` (the layer's
    /// threshold alerts, or its log of a failure). By default the settlement is polled
    /// once on the spot and, when not ready then, finished on a spawned task. A store that
    /// already finishes its settlements on a task of its own overrides this to report from
    /// that task: one task a settlement instead of two.
    ///
    /// A store that wraps another need not forward this: the default still settles
    /// through the wrapper's [`settle_hold`](Self::settle_hold) and reports. Forwarding it
    /// keeps the wrapped store's own way (one task a settlement for
    /// [`RedisBudgetStore`](super::RedisBudgetStore)), but bypasses the wrapper's
    /// `settle_hold`:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::SystemTime;
    /// use palisade::cost::Money;
    /// use palisade::cost::budget::{
    ///     BoxFuture, BudgetStore, BudgetStoreError, Charge, Crossing, Hold, MemoryBudgetStore,
    ///     Reserve, Settlement,
    /// };
    ///
    /// /// Logs each reservation, then leaves everything to the store it wraps.
    /// struct Logged<S>(S);
    ///
    /// impl<S: BudgetStore> BudgetStore for Logged<S> {
    ///     fn reserve<'a>(
    ///         &'a self,
    ///         charges: &'a [Charge],
    ///         amount: Money,
    ///         now: SystemTime,
    ///     ) -> BoxFuture<'a, Result<Reserve, BudgetStoreError>> {
    ///         tracing::info!(%amount, "reserving");
    ///         self.0.reserve(charges, amount, now)
    ///     }
    ///
    ///     fn settle(
    ///         &self,
    ///         charges: Arc<[Charge]>,
    ///         reserved: Money,
    ///         actual: Money,
    ///         now: SystemTime,
    ///     ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
    ///         self.0.settle(charges, reserved, actual, now)
    ///     }
    ///
    ///     fn settle_hold(
    ///         &self,
    ///         charges: Arc<[Charge]>,
    ///         hold: Hold,
    ///         reserved: Money,
    ///         actual: Money,
    ///         now: SystemTime,
    ///     ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
    ///         self.0.settle_hold(charges, hold, reserved, actual, now)
    ///     }
    ///
    ///     fn settle_and_report(
    ///         &self,
    ///         charges: Arc<[Charge]>,
    ///         hold: Hold,
    ///         reserved: Money,
    ///         actual: Money,
    ///         now: SystemTime,
    ///         report: Settlement,
    ///     ) {
    ///         self.0.settle_and_report(charges, hold, reserved, actual, now, report)
    ///     }
    ///
    ///     fn spend(&self, charge: &Charge, now: SystemTime) -> Option<(Money, Money)> {
    ///         self.0.spend(charge, now)
    ///     }
    /// }
    ///
    /// let layer = palisade::cost::budget::BudgetLayer::builder()
    ///     .store(Logged(MemoryBudgetStore::new()))
    ///     .build()
    ///     .unwrap();
    /// # let _ = layer;
    /// ```
    fn settle_and_report(
        &self,
        charges: Arc<[Charge]>,
        hold: Hold,
        reserved: Money,
        actual: Money,
        now: SystemTime,
        report: Settlement,
    ) {
        let settling = self.settle_hold(charges, hold, reserved, actual, now);
        report.after(settling);
    }

    /// The settled spend and the reserved amount of one account now, if the store keeps
    /// it.
    fn spend(&self, charge: &Charge, now: SystemTime) -> Option<(Money, Money)>;
}

/// Rolling windows are counted in this many slots.
const SLOTS: u64 = 60;

#[derive(Debug, Default)]
struct Account {
    /// Calendar periods: the number of the current period.
    period: u64,
    /// Calendar periods: the settled spend of the current period.
    spent: u128,
    /// Rolling periods: settled spend per slot, oldest first.
    slots: VecDeque<(u64, u128)>,
    /// Reserved by requests in flight.
    reserved: u128,
    /// Thresholds raised this period (bit i = the budget's i-th threshold).
    fired: u32,
    /// The budget's period, known from the first use.
    kind: Option<Period>,
}

fn slot_millis(window: Duration) -> u64 {
    (u64::try_from(window.as_millis()).unwrap_or(u64::MAX) / SLOTS).max(1)
}

impl Account {
    /// Moves the account to the period `now` is in and returns its settled spend.
    fn roll(&mut self, period: Period, now: SystemTime) -> u128 {
        self.kind = Some(period);
        match period.calendar(now) {
            Some((id, _)) => {
                if id != self.period {
                    self.period = id;
                    self.spent = 0;
                    self.fired = 0;
                }
                self.spent
            }
            None => {
                let Period::Rolling(window) = period else {
                    return 0;
                };
                let slot_ms = slot_millis(window);
                let current = unix_millis(now) / slot_ms;
                while self
                    .slots
                    .front()
                    .is_some_and(|&(s, _)| s + SLOTS <= current)
                {
                    self.slots.pop_front();
                }
                self.slots.iter().map(|&(_, v)| v).sum()
            }
        }
    }

    fn add_spent(&mut self, period: Period, now: SystemTime, amount: u128) {
        match period {
            Period::Rolling(window) => {
                let slot = unix_millis(now) / slot_millis(window);
                match self.slots.back_mut() {
                    Some((s, v)) if *s == slot => *v = v.saturating_add(amount),
                    _ => self.slots.push_back((slot, amount)),
                }
            }
            _ => self.spent = self.spent.saturating_add(amount),
        }
    }

    /// When `need` more pico-dollars fit (spent + reserved + amount ≤ limit again).
    fn retry_after(&self, period: Period, now: SystemTime, need: u128) -> Option<Duration> {
        match period.calendar(now) {
            Some((_, next)) => Some(next.duration_since(now).unwrap_or_default()),
            None => {
                let Period::Rolling(window) = period else {
                    return None;
                };
                let slot_ms = slot_millis(window);
                let mut freed = 0u128;
                for &(slot, v) in &self.slots {
                    freed = freed.saturating_add(v);
                    if freed >= need {
                        let at = UNIX_EPOCH + Duration::from_millis((slot + SLOTS) * slot_ms);
                        return Some(at.duration_since(now).unwrap_or_default());
                    }
                }
                None // held by requests in flight: they settle soon
            }
        }
    }

    fn idle(&self, now: SystemTime) -> bool {
        let Some(period) = self.kind else {
            return self.reserved == 0;
        };
        if self.reserved > 0 {
            return false;
        }
        match period.calendar(now) {
            Some((id, _)) => id != self.period || self.spent == 0,
            None => {
                let Period::Rolling(window) = period else {
                    return self.slots.is_empty();
                };
                // slots are only dropped when the account is next used: one whose newest
                // slot has left the window spends nothing now
                let current = unix_millis(now) / slot_millis(window);
                self.slots.back().is_none_or(|&(s, _)| s + SLOTS <= current)
            }
        }
    }
}

/// `a × m` exactly, as (high, low) 64-bit halves beyond `u128`: thresholds compare
/// `spent × 1000` with `limit × permille`, which a saturating product gets wrong near
/// `u128::MAX`.
fn wide_mul(a: u128, m: u16) -> (u128, u128) {
    const LOW: u128 = (1 << 64) - 1;
    let m = u128::from(m);
    let low = (a & LOW) * m; // < 2^80
    let high = (a >> 64) * m + (low >> 64); // < 2^81
    (high, low & LOW)
}

type AccountKey = (Arc<str>, Arc<str>);

/// Budget accounts in this process's memory: one lock, so every reservation is atomic.
///
/// Accounts with nothing reserved and nothing spent in their current period are pruned
/// when the map grows past its bound (1 000 000 accounts by default); when most accounts
/// are live, the next pruning waits until the map has doubled, so a flood of distinct
/// subjects costs amortized O(1) per request, never a scan each.
pub struct MemoryBudgetStore {
    accounts: Mutex<Accounts>,
    max_accounts: usize,
}

struct Accounts {
    map: HashMap<AccountKey, Account>,
    /// The size at which the next pruning runs: the bound, or twice what the last
    /// pruning kept.
    prune_at: usize,
    /// Accounts looked at by pruning, all told.
    scanned: u64,
}

impl fmt::Debug for MemoryBudgetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudgetStore")
            .field("accounts", &self.len())
            .field("max_accounts", &self.max_accounts)
            .finish()
    }
}

impl Default for MemoryBudgetStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBudgetStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::with_max_accounts(1_000_000)
    }

    /// An empty store pruning idle accounts above `max` accounts.
    pub fn with_max_accounts(max: usize) -> Self {
        Self {
            accounts: Mutex::new(Accounts {
                map: HashMap::new(),
                prune_at: max.max(1),
                scanned: 0,
            }),
            max_accounts: max.max(1),
        }
    }

    /// The number of accounts held.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether no account is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accounts> {
        // A panic while holding the lock leaves consistent integers behind.
        self.accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn key(c: &Charge) -> AccountKey {
        (Arc::clone(&c.budget.name), Arc::clone(&c.subject))
    }

    fn reserve_now(&self, charges: &[Charge], amount: Money, now: SystemTime) -> Reserve {
        let mut accounts = self.lock();
        let accounts = &mut *accounts;
        if accounts.map.len() >= accounts.prune_at {
            accounts.scanned += accounts.map.len() as u64;
            accounts.map.retain(|_, acc| !acc.idle(now));
            accounts.prune_at = self.max_accounts.max(accounts.map.len().saturating_mul(2));
        }
        let map = &mut accounts.map;
        let want = amount.picos();
        for (index, c) in charges.iter().enumerate() {
            let acc = map.entry(Self::key(c)).or_default();
            let spent = acc.roll(c.budget.period, now);
            // a sum past what u128 holds is over any limit (a saturated one would fit)
            let total = spent
                .checked_add(acc.reserved)
                .and_then(|t| t.checked_add(want));
            let limit = c.budget.limit.picos();
            if total.is_none_or(|total| total > limit) {
                let need = total.map_or(u128::MAX, |total| total - limit);
                return Reserve::Refused {
                    index,
                    spent: Money::from_picos(spent),
                    retry_after: acc.retry_after(c.budget.period, now, need),
                };
            }
        }
        for c in charges {
            if let Some(acc) = map.get_mut(&Self::key(c)) {
                acc.reserved = acc.reserved.saturating_add(want);
            }
        }
        Reserve::Granted(Hold::NONE)
    }
}

impl BudgetStore for MemoryBudgetStore {
    fn reserve<'a>(
        &'a self,
        charges: &'a [Charge],
        amount: Money,
        now: SystemTime,
    ) -> BoxFuture<'a, Result<Reserve, BudgetStoreError>> {
        let answer = self.reserve_now(charges, amount, now);
        Box::pin(std::future::ready(Ok(answer)))
    }

    fn settle(
        &self,
        charges: Arc<[Charge]>,
        reserved: Money,
        actual: Money,
        now: SystemTime,
    ) -> BoxFuture<'static, Result<Vec<Crossing>, BudgetStoreError>> {
        let crossings = self.settle_now(&charges, reserved, actual, now);
        Box::pin(std::future::ready(Ok(crossings)))
    }

    fn spend(&self, charge: &Charge, now: SystemTime) -> Option<(Money, Money)> {
        let mut accounts = self.lock();
        let acc = accounts.map.get_mut(&Self::key(charge))?;
        let spent = acc.roll(charge.budget.period, now);
        Some((Money::from_picos(spent), Money::from_picos(acc.reserved)))
    }
}

impl MemoryBudgetStore {
    fn settle_now(
        &self,
        charges: &[Charge],
        reserved: Money,
        actual: Money,
        now: SystemTime,
    ) -> Vec<Crossing> {
        let mut crossings = Vec::new();
        let mut accounts = self.lock();
        for (index, c) in charges.iter().enumerate() {
            let acc = accounts.map.entry(Self::key(c)).or_default();
            acc.reserved = acc.reserved.saturating_sub(reserved.picos());
            acc.roll(c.budget.period, now);
            acc.add_spent(c.budget.period, now, actual.picos());
            let spent = acc.roll(c.budget.period, now);
            let limit = c.budget.limit.picos();
            for (bit, &permille) in c.budget.thresholds.iter().enumerate().take(32) {
                let mask = 1u32 << bit;
                let reached = wide_mul(spent, 1000) >= wide_mul(limit, permille);
                if reached && acc.fired & mask == 0 {
                    acc.fired |= mask;
                    crossings.push(Crossing {
                        index,
                        permille,
                        spent: Money::from_picos(spent),
                    });
                } else if !reached && matches!(c.budget.period, Period::Rolling(_)) {
                    acc.fired &= !mask; // a rolling window re-arms once spend falls back
                }
            }
        }
        crossings
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::budget::Scope;

    fn charge(period: Period, limit: u128) -> Vec<Charge> {
        vec![Charge {
            budget: Arc::new(
                Budget::new("b", Scope::User, period, Money::from_picos(limit))
                    .thresholds([0.5, 1.0]),
            ),
            subject: "ann".into(),
        }]
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn reservations_count_until_settled_and_refunds_free_room() {
        let s = MemoryBudgetStore::new();
        let c = charge(Period::Day, 100);
        let t = at(1_000);
        assert_eq!(
            s.reserve_now(&c, Money::from_picos(60), t),
            Reserve::Granted(Hold::NONE)
        );
        assert!(matches!(
            s.reserve_now(&c, Money::from_picos(60), t),
            Reserve::Refused { index: 0, .. }
        ));
        let crossed = s.settle_now(&c, Money::from_picos(60), Money::from_picos(10), t);
        assert!(crossed.is_empty());
        assert_eq!(
            s.reserve_now(&c, Money::from_picos(60), t),
            Reserve::Granted(Hold::NONE)
        );
        let crossed = s.settle_now(&c, Money::from_picos(60), Money::from_picos(50), t);
        assert_eq!(crossed.len(), 1);
        assert_eq!(crossed[0].permille, 500);
        assert_eq!(
            s.spend(&c[0], t),
            Some((Money::from_picos(60), Money::ZERO))
        );
    }

    /// `spent × 1000` saturated near `u128::MAX`: a spend one pico-dollar short of the
    /// largest limit read as 100 % of it.
    #[test]
    fn thresholds_near_the_largest_amount_are_exact() {
        let s = MemoryBudgetStore::new();
        let c = charge(Period::Day, u128::MAX);
        let t = at(1_000);
        let crossed = s.settle_now(&c, Money::ZERO, Money::from_picos(u128::MAX - 1), t);
        assert_eq!(
            crossed.iter().map(|c| c.permille).collect::<Vec<_>>(),
            [500]
        );
        // a reservation past what Money holds is refused, not saturated into the limit
        assert!(matches!(
            s.reserve_now(&c, Money::from_picos(2), t),
            Reserve::Refused { .. }
        ));
        let crossed = s.settle_now(&c, Money::ZERO, Money::from_picos(1), t);
        assert_eq!(
            crossed.iter().map(|c| c.permille).collect::<Vec<_>>(),
            [1000]
        );
    }

    #[test]
    fn a_refusal_says_when_the_day_resets() {
        let s = MemoryBudgetStore::new();
        let c = charge(Period::Day, 100);
        let t = at(86_400_000 - 30_000); // 30 s before midnight
        s.reserve_now(&c, Money::from_picos(100), t);
        s.settle_now(&c, Money::from_picos(100), Money::from_picos(100), t);
        let Reserve::Refused { retry_after, .. } = s.reserve_now(&c, Money::from_picos(1), t)
        else {
            panic!("expected a refusal")
        };
        assert_eq!(retry_after, Some(Duration::from_secs(30)));
        // the next day starts empty, and thresholds fire again
        let next = at(86_400_000);
        assert_eq!(
            s.reserve_now(&c, Money::from_picos(100), next),
            Reserve::Granted(Hold::NONE)
        );
        let crossed = s.settle_now(&c, Money::from_picos(100), Money::from_picos(100), next);
        assert_eq!(crossed.len(), 2);
    }

    #[test]
    fn a_rolling_window_frees_spend_as_it_ages() {
        let s = MemoryBudgetStore::new();
        let c = charge(Period::Rolling(Duration::from_secs(60)), 100);
        s.reserve_now(&c, Money::from_picos(70), at(0));
        s.settle_now(&c, Money::from_picos(70), Money::from_picos(70), at(0));
        s.reserve_now(&c, Money::from_picos(20), at(30_000));
        s.settle_now(&c, Money::from_picos(20), Money::from_picos(20), at(30_000));
        let Reserve::Refused { retry_after, .. } =
            s.reserve_now(&c, Money::from_picos(50), at(40_000))
        else {
            panic!("expected a refusal")
        };
        // the first 70 leave the window at 60 s
        assert_eq!(retry_after, Some(Duration::from_secs(20)));
        assert_eq!(
            s.reserve_now(&c, Money::from_picos(50), at(60_000)),
            Reserve::Granted(Hold::NONE)
        );
    }

    #[test]
    fn all_or_nothing_across_budgets() {
        let s = MemoryBudgetStore::new();
        let mut c = charge(Period::Day, 100);
        c.push(Charge {
            budget: Arc::new(Budget::new(
                "small",
                Scope::Bot,
                Period::Day,
                Money::from_picos(10),
            )),
            subject: "bot".into(),
        });
        assert!(matches!(
            s.reserve_now(&c, Money::from_picos(20), at(0)),
            Reserve::Refused { index: 1, .. }
        ));
        // nothing was reserved on the first account
        assert_eq!(s.spend(&c[0], at(0)), Some((Money::ZERO, Money::ZERO)));
    }

    #[test]
    fn idle_accounts_are_pruned_past_the_bound() {
        let s = MemoryBudgetStore::with_max_accounts(4);
        let budget = Arc::new(Budget::new(
            "b",
            Scope::User,
            Period::Day,
            Money::from_picos(100),
        ));
        for i in 0..10 {
            let c = [Charge {
                budget: Arc::clone(&budget),
                subject: format!("u{i}").into(),
            }];
            s.reserve_now(&c, Money::from_picos(1), at(0));
            s.settle_now(&c, Money::from_picos(1), Money::ZERO, at(0));
        }
        assert!(s.len() <= 5, "{}", s.len());
    }

    /// A rolling account keeps its slots until it is next used: one whose every slot has
    /// left the window spends nothing and must be pruned like an idle calendar account,
    /// or a flood of one-off subjects on a rolling budget grows the map without bound.
    /// An account still holding spend in its window stays (its limit still holds).
    #[test]
    fn rolling_accounts_whose_spend_has_aged_out_are_pruned() {
        let s = MemoryBudgetStore::with_max_accounts(8);
        let budget = Arc::new(Budget::new(
            "r",
            Scope::User,
            Period::Rolling(Duration::from_secs(60)),
            Money::from_picos(100),
        ));
        let c = |name: String| {
            [Charge {
                budget: Arc::clone(&budget),
                subject: name.into(),
            }]
        };
        let spend = |name: String, t: SystemTime, picos: u128| {
            let c = c(name);
            assert_eq!(
                s.reserve_now(&c, Money::from_picos(picos), t),
                Reserve::Granted(Hold::NONE)
            );
            s.settle_now(&c, Money::from_picos(picos), Money::from_picos(picos), t);
        };
        for i in 0..100 {
            spend(format!("old{i}"), at(0), 1);
        }
        spend("live".to_owned(), at(90_000), 100);
        for i in 0..100 {
            spend(format!("new{i}"), at(120_000), 1);
        }
        assert!(s.len() <= 128, "{} accounts kept", s.len());
        // the live account kept its spend: its budget is still used up
        assert!(matches!(
            s.reserve_now(&c("live".to_owned()), Money::from_picos(1), at(125_000)),
            Reserve::Refused { .. }
        ));
    }

    /// Past the bound, every reservation scanned the whole map, even when no account was
    /// idle: O(n) per request under a flood of distinct subjects. Pruning now waits until
    /// the map has doubled.
    #[test]
    fn a_flood_of_live_accounts_is_pruned_in_amortized_constant_time() {
        let s = MemoryBudgetStore::with_max_accounts(8);
        let budget = Arc::new(Budget::new(
            "b",
            Scope::User,
            Period::Day,
            Money::from_picos(100),
        ));
        let n = 2_000u64;
        for i in 0..n {
            let c = [Charge {
                budget: Arc::clone(&budget),
                subject: format!("u{i}").into(),
            }];
            // reserved and never settled: nothing is idle, nothing can go
            assert_eq!(
                s.reserve_now(&c, Money::from_picos(1), at(0)),
                Reserve::Granted(Hold::NONE)
            );
        }
        assert_eq!(s.len() as u64, n);
        let scanned = s.lock().scanned;
        assert!(
            scanned < 4 * n,
            "{scanned} accounts scanned for {n} reservations"
        );
        // idle accounts still go once the map passes the bound
        let c = |i: u64| {
            [Charge {
                budget: Arc::clone(&budget),
                subject: format!("u{i}").into(),
            }]
        };
        for i in 0..n {
            s.settle_now(&c(i), Money::from_picos(1), Money::ZERO, at(0));
        }
        for i in n..2 * n + 8 {
            s.reserve_now(&c(i), Money::from_picos(1), at(0));
            s.settle_now(&c(i), Money::from_picos(1), Money::ZERO, at(0));
        }
        assert!(s.len() < 2 * n as usize, "{}", s.len());
    }
}
