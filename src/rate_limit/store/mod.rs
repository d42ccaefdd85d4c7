//! Where rate-limit state lives.
//!
//! ```
//! use palisade::rate_limit::{MemoryStore, Quota, RateLimitLayer, Rule};
//!
//! // the default store, sized explicitly: at most 100,000 keys, idle keys dropped first
//! let store = MemoryStore::builder().max_entries(100_000).build().unwrap();
//! assert!(store.max_entries() <= 100_000); // the bound, shared out among the shards
//! let layer = RateLimitLayer::builder()
//!     .rule(Rule::new("chat", Quota::per_minute(60)))
//!     .store(store)
//!     .build()
//!     .unwrap();
//! # let _ = layer;
//! ```
//!
//! A [`Store`] decides **all of a request's rules in one call**, atomically: either every
//! admitted rule is debited or none is. The inputs are self-contained ([`CheckItem`]: the
//! rule's name and index, the key, the algorithm parameters and the cost), so a remote store
//! can turn them into one script call; the store reads its **own** clock (the memory store
//! tokio's, a Redis store the server's `TIME`), so instances sharing a store agree on
//! windows. The arithmetic is in [`algorithm`](super::algorithm), pure and portable.
//!
//! The check future is an associated type: the memory store answers with a ready future
//! (no allocation, no await), a network store with its own future.
//!
//! ```
//! use palisade::rate_limit::algorithm::Params;
//! use palisade::rate_limit::store::{CheckItem, Store};
//! use palisade::rate_limit::{Algorithm, MemoryStore, Quota, RateKey};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let (user, global) = (RateKey::principal("user-1"), RateKey::Global);
//! let item = |rule_index, rule, key, limit| CheckItem {
//!     rule_index,
//!     rule,
//!     key,
//!     params: Params::new(Algorithm::FixedWindow, Quota::per_minute(limit)),
//!     cost: 1,
//!     shadow: false,
//! };
//! let items = [item(0, "user", &user, 1), item(1, "global", &global, 10)];
//! assert!(store.check(&items).await.unwrap().admitted);
//! let refused = store.check(&items).await.unwrap();
//! assert!(!refused.admitted);
//! // all or nothing: the global rule allowed, but was not debited
//! assert!(refused.rules[1].verdict.is_allowed() && !refused.rules[1].debited);
//! assert_eq!(refused.rules[1].remaining, 9);
//! # }
//! ```

pub(crate) mod memory;
#[cfg(feature = "redis")]
mod redis;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use smallvec::SmallVec;

use super::algorithm::{Decided, Params, Verdict};
use super::error::StoreError;
use super::key::RateKey;

#[cfg(feature = "redis")]
pub use self::redis::{
    HashTag, Lease, RedisClock, RedisConfigError, RedisFailMode, RedisHealth, RedisStore,
    RedisStoreBuilder, RedisStoreConfig,
};
pub use memory::{MemoryStore, MemoryStoreBuilder};

/// A boxed future, for the store's admin calls (not on the request path).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// How long a key reset by [`Store::reset`] keeps its generation at least, by default: an
/// hour, longer than a gateway lets a request run, so that every reservation made before
/// the reset is settled while its key still knows it was reset.
pub const DEFAULT_RESET_RETENTION: Duration = Duration::from_secs(60 * 60);

/// The longest reset retention a store accepts: a day.
pub const MAX_RESET_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// A reset retention in µs, or `None` when it is shorter than a millisecond or longer
/// than [`MAX_RESET_RETENTION`].
pub(crate) fn reset_retention_micros(retention: Duration) -> Option<u64> {
    if retention < Duration::from_millis(1) || retention > MAX_RESET_RETENTION {
        return None;
    }
    u64::try_from(retention.as_micros()).ok()
}

/// Whether generation `a` is newer than `b`, counted modulo 2^32 (serial number
/// arithmetic): `a` is 1 to 2^31 - 1 resets past `b`.
pub(crate) const fn generation_is_newer(a: u32, b: u32) -> bool {
    let d = a.wrapping_sub(b);
    d != 0 && d < 1 << 31
}

/// One rule to decide for one request.
#[derive(Debug, Clone, Copy)]
pub struct CheckItem<'a> {
    /// The rule's index in the layer (stable for the layer's lifetime).
    pub rule_index: u32,
    /// The rule's name (stable across processes; remote stores key by it).
    pub rule: &'a str,
    /// The key the rule counts against.
    pub key: &'a RateKey,
    /// The algorithm and quota (after any per-key override).
    pub params: Params,
    /// Units this request spends (0 peeks).
    pub cost: u64,
    /// Shadow rules are decided and counted when they admit, but never refuse the group.
    pub shadow: bool,
}

/// The decision for one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleDecision {
    /// What the algorithm said.
    pub verdict: Verdict,
    /// Units left in the quota: after this request when it was debited, else without it.
    pub remaining: u64,
    /// µs until the quota is fully restored.
    pub reset_micros: u64,
    /// The window the cost was counted in (for settling); for GCRA, which has no windows,
    /// the epoch: the time its bucket was last found full.
    pub window_start: u64,
    /// The key's generation: bumped by every [`Store::reset`] of a key that holds state,
    /// so that a settlement of a reservation made before a reset never applies to the
    /// state after it (for settling).
    pub generation: u32,
    /// GCRA: where this request's units end in the bucket, on its epoch's timeline (for
    /// settling): the theoretical arrival time right after the request, plus what earlier
    /// give-backs of the epoch had moved it back. A give-back of the reservation refunds
    /// at most the part of it still outstanding when it is settled (what has not drained
    /// yet), never units that later requests hold. 0 for the window algorithms, which
    /// need no such mark (a unit stays counted in its window's count until the whole
    /// window is dropped).
    pub reservation_end: u64,
    /// Whether this rule's cost was actually debited.
    pub debited: bool,
}

impl RuleDecision {
    pub(crate) fn from_decided(d: &Decided) -> Self {
        Self {
            verdict: d.verdict,
            remaining: d.remaining,
            reset_micros: d.reset,
            window_start: d.window_start,
            generation: 0,
            reservation_end: 0,
            debited: false,
        }
    }
}

/// The decision for a whole request: one [`RuleDecision`] per [`CheckItem`], in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is admitted (every non-shadow rule allowed it).
    pub admitted: bool,
    /// Per-rule decisions, in the order of the items.
    pub rules: SmallVec<[RuleDecision; 2]>,
}

impl Decision {
    /// Combines per-rule decisions by the group rule: admitted when every non-shadow rule
    /// allows; then every allowing rule is debited (shadow ones included), else none.
    pub fn group(items: &[CheckItem<'_>], mut rules: SmallVec<[RuleDecision; 2]>) -> Self {
        let admitted = items
            .iter()
            .zip(&rules)
            .all(|(item, d)| item.shadow || d.verdict.is_allowed());
        for (item, d) in items.iter().zip(&mut rules) {
            d.debited = admitted && d.verdict.is_allowed();
            if !admitted && d.verdict.is_allowed() {
                // Nothing was debited: report what is left without this request.
                d.remaining = d.remaining.saturating_add(item.cost);
            }
        }
        Decision { admitted, rules }
    }
}

/// A correction for a reserved amount, applied by [`Store::settle`].
#[derive(Debug, Clone, Copy)]
pub struct Settlement<'a> {
    /// The rule's index.
    pub rule_index: u32,
    /// The rule's name.
    pub rule: &'a str,
    /// The key.
    pub key: &'a RateKey,
    /// The parameters the reservation was decided with.
    pub params: Params,
    /// [`RuleDecision::window_start`] of the reservation.
    pub window_start: u64,
    /// [`RuleDecision::generation`] of the reservation: a key reset since then holds
    /// another generation, and the settlement is dropped (the units it would give back or
    /// take were reset already).
    pub generation: u32,
    /// [`RuleDecision::reservation_end`] of the reservation: a GCRA give-back moves the
    /// bucket back by at most the part of the reservation still outstanding at settlement
    /// (0 gives nothing back). The window algorithms ignore it.
    pub reservation_end: u64,
    /// Actual minus reserved units (a give-back is at most the units reserved).
    pub delta: i64,
}

/// Rate-limit state: decides groups of rules atomically, settles reservations, and answers
/// admin calls.
pub trait Store: Send + Sync + 'static {
    /// The future of [`Store::check`].
    type CheckFuture: Future<Output = Result<Decision, StoreError>> + Send + 'static;

    /// Decides every item at once: all admitted rules are debited, or none (see
    /// [`Decision::group`]). Items with a cost above their capacity get
    /// [`Verdict::Never`].
    fn check(&self, items: &[CheckItem<'_>]) -> Self::CheckFuture;

    /// Decides at once when the store can do so without waiting (the memory store can),
    /// letting the layer skip the asynchronous path; `None` (the default) means "use
    /// [`Store::check`]".
    fn check_now(&self, items: &[CheckItem<'_>]) -> Option<Result<Decision, StoreError>> {
        let _ = items;
        None
    }

    /// Decides a single item at once, like [`Store::check_now`] with one item but without
    /// the list: the request is admitted when the rule was debited
    /// ([`RuleDecision::debited`]) or the item is a shadow rule. `None` (the default) means
    /// "use [`Store::check_now`]"; a store that answers must give the same decision.
    fn check_one_now(&self, item: &CheckItem<'_>) -> Option<Result<RuleDecision, StoreError>> {
        let _ = item;
        None
    }

    /// Applies corrections for reservations (never refuses: the units were spent). A
    /// settlement applies only to the state its reservation was counted in: same
    /// [`Settlement::generation`], and a window still held by the state (GCRA: a give-back
    /// applies only in its reservation's epoch, and refunds at most what of the
    /// reservation is still outstanding, see [`Settlement::reservation_end`]; a charge
    /// applies in any epoch, and on a bucket that has drained full, or a key whose idle
    /// state the store has dropped, is debited from now as a request's units would be,
    /// whether the store still holds the idle key or not).
    ///
    /// Around a [`Store::reset`]: a settlement from before the reset is dropped while the
    /// key keeps the generation the reset gave it, which it does at least for the store's
    /// reset retention (an hour by default; a reset key dropped sooner, which only a
    /// store out of room or an operator deleting it does, forgets the reset: a charge
    /// from before it then counts as a new one, and once the key, started again, is reset
    /// again to the same generation, a settlement from that earlier generation in the same
    /// window applies, a give-back included). A charge (more used than reserved) from
    /// after a reset applies even on a key dropped and started again since, at
    /// generation 0: its generation is newer than the key's (counted modulo 2^32), so its
    /// units were used after the reset.
    fn settle(&self, settlements: &[Settlement<'_>]) -> BoxFuture<Result<(), StoreError>>;

    /// The state of one rule for one key without changing it (the item's cost is ignored).
    fn peek(&self, item: &CheckItem<'_>) -> BoxFuture<Result<RuleDecision, StoreError>>;

    /// Forgets one rule's state for one key, and bumps the key's
    /// [`RuleDecision::generation`] (modulo 2^32) so that reservations made before the
    /// reset are not settled against what comes after it: the key keeps that generation
    /// as long as its state from before the reset would have lasted, and at least for the
    /// store's reset retention (an hour by default). A key the store does not hold (never
    /// used, or idle and dropped: Redis lets it expire, the memory store drops it when it
    /// needs room) has nothing to reset, so a charge from before such a reset counts; an
    /// idle key the store still holds is reset.
    fn reset(
        &self,
        rule_index: u32,
        rule: &str,
        key: &RateKey,
    ) -> BoxFuture<Result<(), StoreError>>;
}
