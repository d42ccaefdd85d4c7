//! Local leases: units of a fixed- or sliding-window rule's quota taken from Redis with a
//! decision, that answer later decisions of the same rule and key without a round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use smallvec::SmallVec;
use tokio::time::Instant;

use super::RedisConfigError;
use crate::rate_limit::Algorithm;
use crate::rate_limit::algorithm::{Params, Verdict};
use crate::rate_limit::key::RateKey;
use crate::rate_limit::store::{CheckItem, Decision, RuleDecision};

/// The default share of a rule's capacity one lease may hold: 1 %.
pub const DEFAULT_LEASE_SHARE: f64 = 0.01;
/// The default longest life of a lease.
pub const DEFAULT_LEASE_MAX_AGE: Duration = Duration::from_secs(1);
/// The default number of rule and key pairs that hold a lease at once.
pub const DEFAULT_LEASE_ENTRIES: usize = 10_000;

/// Local leases for a [`RedisStore`](super::RedisStore): with each decision that finds no
/// usable lease, the store also takes a few extra units of the rule's quota from Redis (in
/// the same script call, debited there like any other units), and then decides the
/// following requests for that rule and key here, without a round trip, until those units
/// are spent, the window they were counted in ends, or the lease is
/// [older than its maximum age](Lease::max_age).
///
/// ```
/// use std::time::Duration;
/// use palisade::rate_limit::Lease;
///
/// // at most 100 units a lease, and at most 1 % of a rule's capacity (the default share)
/// let lease = Lease::units(100).max_age(Duration::from_millis(500));
/// assert_eq!(lease.size(1_000_000), 100);
/// assert_eq!(lease.size(5_000), 50);
/// // a rule whose share is below 2 units is never leased: it stays exact
/// assert_eq!(lease.size(150), 0);
/// ```
///
/// **Fixed and sliding windows only.** Leases apply to fixed-window and sliding-window
/// rules. GCRA (token bucket) rules are never leased: Redis decides them on every request,
/// exactly, with or without leases.
///
/// **Never more than the limit.** Every unit a lease answers with was debited in Redis
/// before, and counts there until its window ends, whichever instance settles what: a
/// lease ends with the Redis window it was taken in (measured from when its call was sent,
/// so clocks that run apart between hosts never stretch it), or at its maximum age if that
/// comes first.
///
/// **Inexact only towards refusing.** Units one instance leased and has not used are
/// unavailable to the others until the lease's window ends: with `n` instances, up to
/// `n × size` units of a window can go unused while requests are refused elsewhere (a
/// request larger than what its lease holds tops it up to its size, never beyond). The
/// [size](Lease::size) is at most the configured share of the rule's limit and at most the
/// configured units; a rule whose share is below 2 units is never leased, so small per-user
/// limits stay exact.
/// When the quota is almost used up, a request whose top-up Redis refuses is asked again
/// alone (a second round trip), and that key is not leased again until its window ends
/// (or the maximum age passes), so each request there costs one round trip again.
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct Lease {
    units: u64,
    share: f64,
    max_age: Duration,
    entries: usize,
}

impl Lease {
    /// Leases of at most `max_units` units (at least 2: no lease is below 2 units), and at
    /// most the [share](Lease::share) of a rule's capacity.
    pub const fn units(max_units: u64) -> Self {
        Self {
            units: max_units,
            share: DEFAULT_LEASE_SHARE,
            max_age: DEFAULT_LEASE_MAX_AGE,
            entries: DEFAULT_LEASE_ENTRIES,
        }
    }

    /// The largest fraction (above 0, at most 1) of a rule's capacity one lease holds
    /// (default 0.01).
    pub const fn share(mut self, fraction: f64) -> Self {
        self.share = fraction;
        self
    }

    /// The longest a lease answers after its call was sent (default 1 s): how stale a
    /// decision made from a lease may be.
    pub const fn max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// How many rule and key pairs hold a lease at once (default 10,000): a full table
    /// drops its expired entries, else leases nothing for a new key.
    pub const fn entries(mut self, entries: usize) -> Self {
        self.entries = entries;
        self
    }

    /// The units a lease of a rule with this capacity holds: the share of it, rounded
    /// down, at most the configured units; 0 (never leased) when that is below 2.
    pub fn size(&self, capacity: u64) -> u64 {
        // Capacities stay below 2^52 (the Redis store refuses larger ones): exact as a
        // double. A product one rounding away from a whole number counts as it.
        let exact = capacity as f64 * self.share;
        let near = exact.round();
        let share = if (exact - near).abs() <= 1e-9 * near.max(1.0) {
            near
        } else {
            exact.floor()
        };
        // The float is non-negative and finite (checked when built): the cast saturates.
        let size = (share as u64).min(self.units);
        if size < 2 { 0 } else { size }
    }

    /// How long (µs) what `rule`'s decision said at `at` (the script's time) holds: until
    /// the end of the window it was counted in, and at most the maximum age.
    fn life(&self, params: &Params, rule: &RuleDecision, at: u64) -> u64 {
        let max_age = u64::try_from(self.max_age.as_micros()).unwrap_or(u64::MAX);
        rule.window_start
            .saturating_add(params.window)
            .saturating_sub(at)
            .min(max_age)
    }

    pub(super) fn validate(&self) -> Result<(), RedisConfigError> {
        let invalid = |reason: &str| {
            Err(RedisConfigError::InvalidLease {
                reason: reason.to_owned(),
            })
        };
        if self.units < 2 {
            return invalid(
                "its units must be at least 2: a lease below 2 units is never taken (leave leases off for exact decisions)",
            );
        }
        if !(self.share.is_finite() && self.share > 0.0 && self.share <= 1.0) {
            return invalid("its share must be a fraction above 0 and at most 1 (0.01 = 1 %)");
        }
        if self.max_age < Duration::from_millis(1) {
            return invalid("its max age must be at least 1ms");
        }
        if self.entries == 0 {
            return invalid("its entries must be at least 1");
        }
        Ok(())
    }
}

/// When a decision is made: now on the local clock, or at an explicit time (µs, the
/// script's clock, for [`RedisStore::check_at`](super::RedisStore::check_at)).
#[derive(Clone, Copy)]
pub(super) enum When {
    Local(Instant),
    At(u64),
}

/// A span of time measured in both clocks: from when a call was sent (local) and from
/// the script's time in its answer.
#[derive(Clone, Copy)]
struct Span {
    sent: Instant,
    at: u64,
    life: u64,
}

/// One rule and key: its lease, whether leasing is off for it, and whether a top-up is on
/// its way.
#[derive(Clone, Copy)]
struct Entry {
    params: Params,
    /// The removal count when the entry was made: a grant whose call was sent before (it
    /// may predate a reset that removed the key's earlier entry) is not kept.
    created: u64,
    /// The lease's units not used yet.
    units: u64,
    /// When the lease was granted, and for how long (µs).
    lease: Option<Span>,
    /// Until when no top-up is asked for (the quota was almost used up).
    off: Option<Span>,
    /// A top-up asked for and not answered yet: no other is asked for meanwhile.
    pending_until: Option<Instant>,
    /// Redis's remaining units right after the grant.
    remaining: u64,
    /// The grant's reset (µs).
    reset: u64,
    window_start: u64,
    generation: u32,
}

fn elapsed(span: &Span, when: When) -> Option<u64> {
    match when {
        When::Local(now) => Some(
            u64::try_from(now.saturating_duration_since(span.sent).as_micros()).unwrap_or(u64::MAX),
        ),
        When::At(t) => t.checked_sub(span.at),
    }
}

fn live(span: Option<&Span>, when: When) -> bool {
    span.is_some_and(|s| elapsed(s, when).is_some_and(|e| e < s.life))
}

impl Entry {
    /// The units the lease can answer with `when`: none once it has ended.
    fn available(&self, when: When) -> u64 {
        if live(self.lease.as_ref(), when) {
            self.units
        } else {
            0
        }
    }

    fn empty(params: Params, created: u64) -> Self {
        Self {
            params,
            created,
            units: 0,
            lease: None,
            off: None,
            pending_until: None,
            remaining: 0,
            reset: 0,
            window_start: 0,
            generation: 0,
        }
    }

    /// Whether the entry says nothing any more: no live lease or off mark, no top-up on its
    /// way.
    fn expired(&self, when: When, now: Instant) -> bool {
        !live(self.lease.as_ref(), when)
            && !live(self.off.as_ref(), when)
            && self.pending_until.is_none_or(|p| p <= now)
    }
}

type Map = hashbrown::HashMap<(Box<str>, RateKey), Entry, foldhash::fast::RandomState>;

/// A borrowed `(rule, key)`, as the blocked cache's.
#[derive(Hash)]
struct Lookup<'k>(&'k str, &'k RateKey);

impl hashbrown::Equivalent<(Box<str>, RateKey)> for Lookup<'_> {
    fn equivalent(&self, key: &(Box<str>, RateKey)) -> bool {
        *self.0 == *key.0 && *self.1 == key.1
    }
}

struct State {
    map: Map,
    /// No pass over every entry to drop expired ones before this.
    next_sweep: Option<Instant>,
}

/// The leases of one store.
pub(super) struct Leases {
    lease: Option<Lease>,
    /// How long a top-up may be on its way (the store's timeout).
    pending_for: Duration,
    state: Mutex<State>,
    /// Bumped by every removal: a grant of a key whose entry was made after the grant's
    /// call was sent is not kept (it may predate a reset of its key); grants of other keys
    /// are.
    removals: AtomicU64,
    answered: AtomicU64,
}

/// What one check asks of Redis besides its costs: a top-up per item (0: none).
pub(super) type TopUps = SmallVec<[u64; 2]>;

impl Leases {
    pub fn new(lease: Option<Lease>, pending_for: Duration) -> Self {
        Self {
            lease,
            // Added to instants: a timeout of any length may be configured (past a day, a
            // second top-up of a key may be asked for while the first is on its way).
            pending_for: pending_for.min(Duration::from_secs(86_400)),
            state: Mutex::new(State {
                map: Map::default(),
                next_sweep: None,
            }),
            removals: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.lease.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decisions answered from leases.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// Rule and key pairs held (some may have expired).
    pub fn len(&self) -> usize {
        if !self.enabled() {
            return 0;
        }
        self.lock().map.len()
    }

    /// The removal count, read before a check is sent: see [`Leases::grant`].
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Acquire)
    }

    /// The decision of a group whose every item has a live lease with room for its cost:
    /// their units are debited here, all or none, and no round trip is made.
    pub fn answer(&self, items: &[CheckItem<'_>], when: When) -> Option<Decision> {
        if self.lease.is_none() || items.is_empty() {
            return None;
        }
        // One rule and key twice in a group would spend one lease twice: Redis decides it.
        if items.len() > 1 {
            for (i, a) in items.iter().enumerate() {
                if items[i + 1..]
                    .iter()
                    .any(|b| a.rule == b.rule && a.key == b.key)
                {
                    return None;
                }
            }
        }
        let mut state = self.lock();
        if state.map.is_empty() {
            return None;
        }
        let usable = |e: &Entry, item: &CheckItem<'_>| {
            e.params == item.params && e.available(when) >= item.cost
        };
        for item in items {
            let e = state.map.get(&Lookup(item.rule, item.key))?;
            if !usable(e, item) {
                return None;
            }
        }
        let mut rules = SmallVec::new();
        for item in items {
            // Present and usable: checked above under the same lock.
            let e = state.map.get_mut(&Lookup(item.rule, item.key))?;
            e.units -= item.cost;
            let span = e.lease.as_ref()?;
            let elapsed = elapsed(span, when).unwrap_or(0);
            rules.push(RuleDecision {
                verdict: Verdict::Allowed,
                remaining: e.remaining.saturating_add(e.units),
                reset_micros: e.reset.saturating_sub(elapsed),
                window_start: e.window_start,
                generation: e.generation,
                reservation_end: 0,
                debited: true,
            });
        }
        drop(state);
        self.answered.fetch_add(1, Ordering::Relaxed);
        Some(Decision {
            admitted: true,
            rules,
        })
    }

    /// The top-up each item asks Redis for (0: none, always for a GCRA rule), marking those
    /// that ask as pending; `None` when no item asks for one.
    pub fn plan(&self, items: &[CheckItem<'_>], when: When) -> Option<TopUps> {
        let lease = self.lease?;
        let mut top_ups = TopUps::new();
        let mut any = false;
        let mut state: Option<std::sync::MutexGuard<'_, State>> = None;
        let now = Instant::now();
        for item in items {
            let capacity = item.params.capacity();
            let size = lease.size(capacity);
            // GCRA rules are decided in Redis on every request: never leased.
            let mut top =
                if size == 0 || item.cost > capacity || item.params.algorithm == Algorithm::Gcra {
                    0
                } else {
                    size.min(capacity - item.cost)
                };
            if top == 0 {
                top_ups.push(0);
                continue;
            }
            let state = state.get_or_insert_with(|| self.lock());
            let asks = match state.map.get_mut(&Lookup(item.rule, item.key)) {
                Some(e) if e.params == item.params => {
                    let held = e.available(when);
                    let off = live(e.off.as_ref(), when);
                    let pending = e.pending_until.is_some_and(|p| p > now);
                    // A live lease keeps its units with the top-up (see `grant`):
                    // together they hold at most one lease's size.
                    top = top.saturating_sub(held);
                    if held >= item.cost || off || pending || top == 0 {
                        false
                    } else {
                        e.pending_until = Some(now + self.pending_for);
                        true
                    }
                }
                Some(e) => {
                    // Other parameters (a per-key override): the old lease no longer
                    // applies.
                    *e = Entry::empty(item.params, self.removals());
                    e.pending_until = Some(now + self.pending_for);
                    true
                }
                None => {
                    if state.map.len() >= lease.entries {
                        Self::sweep(state, &lease, when, now);
                    }
                    if state.map.len() >= lease.entries {
                        false
                    } else {
                        let mut e = Entry::empty(item.params, self.removals());
                        e.pending_until = Some(now + self.pending_for);
                        state.map.insert((item.rule.into(), item.key.clone()), e);
                        true
                    }
                }
            };
            any |= asks;
            top_ups.push(if asks { top } else { 0 });
        }
        any.then_some(top_ups)
    }

    /// Drops the expired entries, at most once per eighth of the maximum age (a full table
    /// of live leases is not walked on every new key).
    fn sweep(state: &mut State, lease: &Lease, when: When, now: Instant) {
        if state.next_sweep.is_some_and(|t| t > now) {
            return;
        }
        state.map.retain(|_, e| !e.expired(when, now));
        state.next_sweep = Some(now + lease.max_age / 8);
    }

    /// Keeps the lease of `top` units that Redis granted with `rule`'s decision (the script
    /// answered at `at` for a call sent at `sent`), unless the key's entry was removed since
    /// `removals` was read. Returns the units the lease holds now (its old ones too when it
    /// kept them), or `None` when it was not kept.
    #[allow(clippy::too_many_arguments)]
    pub fn grant(
        &self,
        name: &str,
        key: &RateKey,
        params: Params,
        top: u64,
        rule: &RuleDecision,
        sent: Instant,
        at: u64,
        removals: u64,
    ) -> Option<u64> {
        let lease = self.lease?;
        let life = lease.life(&params, rule, at);
        let mut state = self.lock();
        let e = state.map.get_mut(&Lookup(name, key))?;
        e.pending_until = None;
        if life == 0 || e.created > removals || e.params != params {
            return None;
        }
        let span = Span { sent, at, life };
        // A live lease of the same window keeps its units (a top-up that was too small for
        // a large cost).
        let merge = live(e.lease.as_ref(), When::At(at))
            && e.window_start == rule.window_start
            && e.generation == rule.generation;
        e.units = if merge {
            // never more than one lease's size (the top-up was planned so)
            e.units
                .saturating_add(top)
                .min(lease.size(params.capacity()).max(top))
        } else {
            top
        };
        e.lease = Some(span);
        e.remaining = rule.remaining;
        e.reset = rule.reset_micros;
        e.window_start = rule.window_start;
        e.generation = rule.generation;
        Some(e.units)
    }

    /// Leasing stays off for this rule and key until the window of `rule`'s refusal ends,
    /// and at most for the maximum age.
    pub fn turn_off(
        &self,
        name: &str,
        key: &RateKey,
        params: Params,
        rule: &RuleDecision,
        sent: Instant,
        at: u64,
    ) {
        let Some(lease) = self.lease else {
            return;
        };
        let life = lease.life(&params, rule, at);
        let mut state = self.lock();
        if let Some(e) = state.map.get_mut(&Lookup(name, key)) {
            e.pending_until = None;
            if e.params == params && life > 0 {
                e.off = Some(Span { sent, at, life });
            }
        }
    }

    /// The top-up asked for this rule and key is answered (or failed): another may be asked.
    pub fn settled(&self, name: &str, key: &RateKey) {
        if let Some(e) = self.lock().map.get_mut(&Lookup(name, key)) {
            e.pending_until = None;
        }
    }

    /// Forgets a rule's lease for a key (a reset): its units are no longer used here.
    pub fn remove(&self, name: &str, key: &RateKey) {
        if !self.enabled() {
            return;
        }
        let mut state = self.lock();
        self.removals.fetch_add(1, Ordering::AcqRel);
        state.map.remove(&Lookup(name, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::Quota;

    /// A one-unit item of rule `r` for `key`.
    fn one(key: &RateKey, params: Params) -> CheckItem<'_> {
        CheckItem {
            rule_index: 0,
            rule: "r",
            key,
            params,
            cost: 1,
            shadow: false,
        }
    }

    /// Redis's answer to an admitted call in window `window_start`: 5,000 units left.
    fn allowed(window_start: u64, reset_micros: u64) -> RuleDecision {
        RuleDecision {
            verdict: Verdict::Allowed,
            remaining: 5_000,
            reset_micros,
            window_start,
            generation: 0,
            reservation_end: 0,
            debited: true,
        }
    }

    #[test]
    fn a_lease_is_the_share_of_the_capacity_within_the_units_and_never_below_two() {
        let lease = Lease::units(100);
        assert_eq!(lease.size(1_000), 10);
        assert_eq!(lease.size(100_000), 100);
        assert_eq!(lease.size(199), 0);
        assert_eq!(lease.size(200), 2);
        let lease = Lease::units(1_000).share(0.29);
        // 100 × 0.29 is 28.999999999999996 as doubles: still 29 units
        assert_eq!(lease.size(100), 29);
        assert_eq!(Lease::units(3).share(1.0).size(10), 3);
    }

    #[test]
    fn bad_leases_are_refused_with_a_reason() {
        for bad in [
            Lease::units(0),
            Lease::units(1),
            Lease::units(10).share(0.0),
            Lease::units(10).share(1.5),
            Lease::units(10).share(f64::NAN),
            Lease::units(10).max_age(Duration::ZERO),
            Lease::units(10).entries(0),
        ] {
            let err = bad.validate().unwrap_err();
            assert!(
                matches!(err, RedisConfigError::InvalidLease { .. }),
                "{err}"
            );
        }
        Lease::units(10).share(1.0).validate().unwrap();
    }

    /// A GCRA rule never asks for a top-up, alone or beside a window rule that does: no
    /// entry is made for it, so it is never answered here.
    #[test]
    fn a_gcra_rule_never_asks_for_a_top_up() {
        let leases = Leases::new(Some(Lease::units(100)), Duration::from_secs(1));
        let gcra = Params::new(Algorithm::Gcra, Quota::per_minute(10_000));
        let window = Params::new(Algorithm::SlidingWindow, Quota::per_minute(10_000));
        let key = RateKey::principal("a");
        let item = |rule, params| CheckItem {
            rule_index: 0,
            rule,
            key: &key,
            params,
            cost: 1,
            shadow: false,
        };
        let when = When::At(1_000);
        assert!(leases.plan(&[item("g", gcra)], when).is_none());
        let tops = leases
            .plan(&[item("g", gcra), item("w", window)], when)
            .unwrap();
        assert_eq!(tops.as_slice(), &[0, 100]);
        assert_eq!(leases.len(), 1);
        assert!(leases.answer(&[item("g", gcra)], when).is_none());
    }

    /// A full table leases nothing for a new key while its entries live, and drops them
    /// once they have expired; a key with a top-up on its way asks for no second one.
    #[test]
    fn a_full_table_leases_nothing_new_until_its_entries_expire() {
        let leases = Leases::new(Some(Lease::units(100).entries(2)), Duration::from_secs(1));
        let params = Params::new(Algorithm::FixedWindow, Quota::per_minute(10_000));
        let keys: Vec<RateKey> = ["a", "b", "c", "d", "e"]
            .into_iter()
            .map(RateKey::principal)
            .collect();
        let item = |key| one(key, params);
        let rule = |window_start| allowed(window_start, 0);
        let (first, second) = (When::At(1_000), When::At(61_000_000));
        assert!(leases.plan(&[item(&keys[0])], first).is_some());
        // on its way: no second top-up for a
        assert!(leases.plan(&[item(&keys[0])], first).is_none());
        assert!(leases.plan(&[item(&keys[1])], first).is_some());
        for key in &keys[..2] {
            let held = leases.grant("r", key, params, 100, &rule(0), Instant::now(), 1_000, 0);
            assert_eq!(held, Some(100));
        }
        // past the window (a minute), a and b have expired: c takes their room
        assert!(leases.plan(&[item(&keys[2])], second).is_some());
        assert_eq!(leases.len(), 1);
        assert!(leases.plan(&[item(&keys[3])], second).is_some());
        for key in &keys[2..4] {
            let held = leases.grant(
                "r",
                key,
                params,
                100,
                &rule(60_000_000),
                Instant::now(),
                61_000_000,
                0,
            );
            assert_eq!(held, Some(100));
        }
        // full of live leases: e is decided without one
        assert!(leases.plan(&[item(&keys[4])], second).is_none());
        assert_eq!(leases.len(), 2);
    }

    /// A removal (a reset) drops the grants of its key sent before it,
    /// even when a later top-up made the key's entry again, and no other key's.
    #[test]
    fn a_removal_drops_the_grants_in_flight_of_its_key_only() {
        let leases = Leases::new(Some(Lease::units(100)), Duration::from_secs(1));
        let params = Params::new(Algorithm::FixedWindow, Quota::per_minute(10_000));
        let (a, b) = (RateKey::principal("a"), RateKey::principal("b"));
        let when = When::At(1_000);
        let item = |key| one(key, params);
        let rule = allowed(0, 60_000_000);
        let grant = |key, removals| {
            leases.grant(
                "r",
                key,
                params,
                100,
                &rule,
                Instant::now(),
                1_000,
                removals,
            )
        };
        assert!(leases.plan(&[item(&a)], when).is_some());
        assert!(leases.plan(&[item(&b)], when).is_some());
        let before = leases.removals();
        leases.remove("r", &a);
        // a top-up of a sent after the removal makes a's entry again
        assert!(leases.plan(&[item(&a)], when).is_some());
        let after = leases.removals();
        assert_eq!(grant(&a, before), None, "sent before the removal");
        assert_eq!(grant(&b, before), Some(100), "another key");
        assert_eq!(grant(&a, after), Some(100));
    }

    /// Concurrent answers never spend one unit twice, and a group is answered all or none.
    #[test]
    fn concurrent_answers_spend_each_leased_unit_once_and_groups_all_or_none() {
        let leases =
            std::sync::Arc::new(Leases::new(Some(Lease::units(100)), Duration::from_secs(1)));
        let params = Params::new(Algorithm::FixedWindow, Quota::per_minute(10_000));
        let (a, b) = (RateKey::principal("a"), RateKey::Global);
        let when = When::At(1_000);
        let item = |key| one(key, params);
        for (key, top) in [(&a, 100), (&b, 30)] {
            assert_eq!(leases.plan(&[item(key)], when).unwrap()[0], 100);
            let rule = allowed(0, 60_000_000);
            let held = leases.grant("r", key, params, top, &rule, Instant::now(), 1_000, 0);
            assert_eq!(held, Some(top));
        }
        let admitted = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if leases.answer(&[item(&a), item(&b)], when).is_some() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        // b's 30 units bound the groups; a keeps the other 70
        assert_eq!(admitted.load(Ordering::Relaxed), 30);
        let d = leases.answer(&[item(&a)], when).unwrap();
        assert_eq!(d.rules[0].remaining, 5_000 + 69);
        // past the window's end, no answer
        assert!(leases.answer(&[item(&a)], When::At(60_000_000)).is_none());
    }
}
