//! The in-memory store: sharded, lock-light, bounded.

use std::future::{Ready, ready};
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::clock::{Clock, ClockSource};
use smallvec::SmallVec;

use super::{
    BoxFuture, CheckItem, DEFAULT_RESET_RETENTION, Decision, RuleDecision, Settlement, Store,
    generation_is_newer, reset_retention_micros,
};
use crate::rate_limit::Algorithm;
use crate::rate_limit::algorithm::{self, Decided, Params, State};
use crate::rate_limit::error::{RateLimitConfigError, StoreError};
use crate::rate_limit::key::RateKey;

mod ip_table;

#[cfg(test)]
use ip_table::EXPIRY_UNIT;
use ip_table::{IpTable, SmallKey, SmallSlot};

/// The default bound on resident keys.
pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// The default number of shards.
pub const DEFAULT_SHARDS: usize = 64;

/// State kept in process memory, shared by clones.
///
/// Keys are spread over shards (a power of two, each a `Mutex<HashMap>` on its own cache
/// line), chosen by one fast hash that the shard's map reuses, so a decision hashes once
/// and takes one uncontended lock. A request with several rules locks their shards in
/// index order, decides all of them, and commits all or none.
///
/// **Bounded memory.** Each shard holds at most `max_entries / shards` keys. When a new
/// key finds its shard full, the shard first drops every idle key (whose state has expired
/// back to fresh: nothing is lost), and if that is not enough it drops the keys closest to
/// expiry until it is 7/8 full; those evictions (a lost count for a quiet key) are counted
/// in [`MemoryStore::evictions`]. A flood of random keys therefore costs at most the cap.
/// Keys an admin reset (which keep their generation for the reset retention, see
/// [`MemoryStore::reset_now`]) go only after every other key.
///
/// **Compact slots.** An IP key (the usual key, and the one a flood of random addresses
/// brings) lives in a 32-byte slot, half a cache line, with its counts in 32 bits (GCRA:
/// how far its theoretical arrival time is from when its bucket was last full, and what
/// has been given back since, in µs: up to 71 minutes each); any other key, and an IP key whose counts outgrow 32 bits or that has been
/// reset (a reset key keeps its generation, see [`MemoryStore::reset_now`]), in a 64-byte
/// slot. Both tables are `hashbrown` tables, at most 7/8 full with one control byte per
/// slot: with that spare capacity an IP key takes about 38 to 75 bytes and any other key
/// about 74 to 149: 1,000,000 peer addresses take under 80 MB. A principal or header key also
/// holds its text: a header value up to [`MAX_HEADER_KEY_LEN`](crate::rate_limit::MAX_HEADER_KEY_LEN)
/// bytes, a longer one as a 39-byte hash, so **any header key costs at most 300 bytes**
/// whatever a client sends.
///
/// Time is counted in microseconds since the store was created, on tokio's clock by default
/// (so tests can pause it) or on a faster source ([`ClockSource::Fast`] or
/// [`ClockSource::Coarse`], see [`clock`](crate::clock)).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Padded]>,
    mask: usize,
    per_shard: usize,
    max_entries: usize,
    hasher: StoreHasher,
    clock: Clock,
    evictions: AtomicU64,
    /// µs a reset key keeps its generation after the reset, at least.
    reset_retention: u64,
}

#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// One shard: two `hashbrown` tables of slots found by their precomputed hash (so a lookup
/// neither rehashes nor clones the key), one per slot size.
#[derive(Default)]
struct Shard {
    /// IP keys whose counts fit in 32 bits: the common key, and the one a flood of random
    /// addresses brings, in 32-byte slots.
    small: IpTable,
    /// Every other key, and IP keys with counts past `u32::MAX`.
    wide: hashbrown::HashTable<Slot>,
}

/// A resident key with its state (64 bytes: the hash is recomputed on the rare rehash
/// instead of being stored), aligned so a slot is exactly one cache line: a lookup touches
/// one line, not two.
#[repr(align(64))]
struct Slot {
    rule: u32,
    /// Bumped by a reset (see [`MemoryStore::reset_now`]); in the padding after `rule`. A
    /// small slot's generation is 0: a reset key moves to this table.
    generation: u32,
    key: RateKey,
    state: State,
    expires_at: u64,
}

impl Slot {
    #[inline]
    fn is(&self, rule: u32, key: &RateKey) -> bool {
        self.rule == rule && self.key == *key
    }
}

/// A resident slot, in whichever table it lives.
enum SlotMut<'s> {
    Small(&'s mut SmallSlot),
    Wide(&'s mut Slot),
}

impl SlotMut<'_> {
    #[inline]
    fn state(&self) -> State {
        match self {
            SlotMut::Small(s) => s.state(),
            SlotMut::Wide(s) => s.state,
        }
    }

    #[inline]
    fn generation(&self) -> u32 {
        match self {
            SlotMut::Small(_) => 0,
            SlotMut::Wide(s) => s.generation,
        }
    }

    fn expires_at(&self) -> u64 {
        match self {
            SlotMut::Small(s) => s.expires_at(),
            SlotMut::Wide(s) => s.expires_at,
        }
    }

    /// Stores `state`; false when a small slot cannot hold it (the caller moves the key
    /// to the wide table). A reset key (generation above 0) never expires sooner than it
    /// already would: its generation lives at least as long as its state from before the
    /// reset would have (see [`MemoryStore::reset_now`]).
    #[inline]
    fn set(&mut self, state: &State, expires_at: u64) -> bool {
        match self {
            SlotMut::Small(s) => s.set(state, expires_at),
            SlotMut::Wide(s) => {
                s.state = *state;
                s.expires_at = if s.generation > 0 {
                    s.expires_at.max(expires_at)
                } else {
                    expires_at
                };
                true
            }
        }
    }
}

impl Shard {
    fn len(&self) -> usize {
        self.small.len() + self.wide.len()
    }

    #[inline]
    fn find_mut(&mut self, hash: u64, rule: u32, key: &RateKey) -> Option<SlotMut<'_>> {
        if let Some(k) = SmallKey::of(rule, key) {
            if let Some(s) = self.small.find_mut(hash, k) {
                return Some(SlotMut::Small(s));
            }
            if self.wide.is_empty() {
                return None;
            }
        }
        self.wide
            .find_mut(hash, |s| s.is(rule, key))
            .map(SlotMut::Wide)
    }

    /// A resident key's state and generation.
    #[inline]
    fn state(&self, hash: u64, rule: u32, key: &RateKey) -> Option<(State, u32)> {
        if let Some(k) = SmallKey::of(rule, key) {
            if let Some(s) = self.small.find(hash, k) {
                return Some((s.state(), 0));
            }
        }
        self.wide
            .find(hash, |s| s.is(rule, key))
            .map(|s| (s.state, s.generation))
    }

    fn remove(&mut self, hash: u64, rule: u32, key: &RateKey) {
        if let Some(k) = SmallKey::of(rule, key) {
            if self.small.remove(hash, k) {
                return;
            }
        }
        if let Ok(entry) = self.wide.find_entry(hash, |s| s.is(rule, key)) {
            entry.remove();
        }
    }

    /// Drops every key whose state has expired back to fresh.
    fn drop_idle(&mut self, now: u64) {
        self.small.retain(|s| s.expires_at() > now);
        self.wide.retain(|s| s.expires_at > now);
    }
}

/// The store's hash function (seeded once per store).
type StoreHasher = foldhash::fast::RandomState;

/// The hash of a small slot's key, equal to [`MemoryStore::hash`] of the same rule and IP key
/// (an IP key hashes as its packed word), so a slot moved by the table is found again.
fn small_hash(hasher: &StoreHasher, key: SmallKey) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u32(key.rule());
    h.write_u64(key.ip);
    h.finish()
}

/// A key and its precomputed hash.
struct MapKey<'k> {
    hash: u64,
    rule: u32,
    key: &'k RateKey,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("max_entries", &self.inner.max_entries)
            .field("len", &self.len())
            .finish()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Builds a [`MemoryStore`].
#[derive(Debug, Clone)]
#[must_use]
pub struct MemoryStoreBuilder {
    max_entries: usize,
    shards: usize,
    clock: ClockSource,
    reset_retention: Duration,
}

impl MemoryStoreBuilder {
    /// The bound on resident keys (default 1,000,000).
    pub fn max_entries(mut self, max_entries: usize) -> Self {
        self.max_entries = max_entries;
        self
    }

    /// The number of shards (default 64): at least 1 and at most one per 16 entries, then
    /// rounded up to a power of two (100 entries and the default give 8 shards).
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Where the store reads time (default [`ClockSource::Tokio`], which tests can pause;
    /// see [`clock`](crate::clock) for the faster sources).
    pub fn clock(mut self, clock: ClockSource) -> Self {
        self.clock = clock;
        self
    }

    /// How long a key reset by [`Store::reset`] keeps its
    /// [generation](RuleDecision::generation) at least, after the reset (default 1 hour,
    /// from 1 ms to 24 hours): set it to the longest a request may run, so that every
    /// reservation made before a reset is settled while the key still knows it was reset
    /// (see [`MemoryStore::reset_now`]). A reset key takes one slot this long, or as long
    /// as its state from before the reset would have lasted if that is longer.
    ///
    /// ```
    /// use std::time::Duration;
    /// use palisade::rate_limit::MemoryStore;
    ///
    /// let store = MemoryStore::builder()
    ///     .reset_retention(Duration::from_secs(15 * 60))
    ///     .build()
    ///     .unwrap();
    /// # let _ = store;
    /// assert!(MemoryStore::builder().reset_retention(Duration::ZERO).build().is_err());
    /// ```
    pub fn reset_retention(mut self, retention: Duration) -> Self {
        self.reset_retention = retention;
        self
    }

    /// Builds the store.
    pub fn build(self) -> Result<MemoryStore, RateLimitConfigError> {
        if self.max_entries == 0 {
            return Err(RateLimitConfigError::ZeroCapacity);
        }
        let reset_retention = reset_retention_micros(self.reset_retention)
            .ok_or(RateLimitConfigError::InvalidResetRetention)?;
        let shards = self
            .shards
            .clamp(1, (self.max_entries / 16).max(1))
            .next_power_of_two();
        let per_shard = self.max_entries / shards;
        let per_shard = per_shard.max(1);
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..shards)
                    .map(|_| Padded(Mutex::new(Shard::default())))
                    .collect(),
                mask: shards - 1,
                per_shard,
                max_entries: per_shard * shards,
                hasher: foldhash::fast::RandomState::default(),
                clock: Clock::new(self.clock),
                evictions: AtomicU64::new(0),
                reset_retention,
            }),
        })
    }
}

impl MemoryStore {
    /// A store with the defaults (1,000,000 keys over 64 shards).
    pub fn new() -> Self {
        Self::builder()
            .build()
            .unwrap_or_else(|_| unreachable!("the defaults are valid"))
    }

    /// A builder.
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder {
            max_entries: DEFAULT_MAX_ENTRIES,
            shards: DEFAULT_SHARDS,
            clock: ClockSource::Tokio,
            reset_retention: DEFAULT_RESET_RETENTION,
        }
    }

    /// Keys resident now (idle keys linger until their shard needs room).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(&s.0).len()).sum()
    }

    /// Whether no key is resident.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The effective bound on resident keys.
    pub fn max_entries(&self) -> usize {
        self.inner.max_entries
    }

    /// Keys dropped before they went idle, to stay within the bound.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    /// Microseconds on the store's clock.
    #[inline]
    pub fn now_micros(&self) -> u64 {
        self.inner.clock.nanos() / 1_000
    }

    fn map_key<'k>(&self, rule: u32, key: &'k RateKey) -> MapKey<'k> {
        MapKey {
            hash: self.hash(rule, key),
            rule,
            key,
        }
    }

    #[inline(always)]
    fn hash(&self, rule: u32, key: &RateKey) -> u64 {
        let mut h = self.inner.hasher.build_hasher();
        h.write_u32(rule);
        key.hash(&mut h);
        h.finish()
    }

    #[inline]
    fn shard_of(&self, hash: u64) -> usize {
        (hash >> 40) as usize & self.inner.mask
    }

    /// Decides a group at a given time (µs on the store's clock).
    #[inline]
    pub fn check_at(&self, items: &[CheckItem<'_>], now: u64) -> Decision {
        if let [item] = items {
            return self.check_one(item, now);
        }
        let keys: SmallVec<[MapKey<'_>; 4]> = items
            .iter()
            .map(|i| self.map_key(i.rule_index, i.key))
            .collect();
        let mut shard_ids: SmallVec<[usize; 4]> =
            keys.iter().map(|k| self.shard_of(k.hash)).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: SmallVec<[(usize, MutexGuard<'_, Shard>); 4]> = shard_ids
            .iter()
            .map(|&i| (i, lock(&self.inner.shards[i].0)))
            .collect();
        let mut decided: SmallVec<[(algorithm::State, algorithm::Decided); 4]> = SmallVec::new();
        let mut rules: SmallVec<[RuleDecision; 2]> = SmallVec::new();
        for (item, key) in items.iter().zip(&keys) {
            let shard = guard_for(&mut guards, self.shard_of(key.hash));
            let (state, generation) = shard.state(key.hash, key.rule, key.key).unwrap_or_default();
            let d = decide(&item.params, &state, now, item.cost);
            rules.push(rule_decision(&item.params, &d, generation));
            decided.push((state, d));
        }
        let mut decision = Decision::group(items, rules);
        if !decision.admitted {
            // Nothing was debited: what is left is what a peek sees (GCRA's remaining after
            // a debit is rounded down, so adding the cost back can come out one short).
            for ((item, (state, _)), r) in items.iter().zip(&decided).zip(&mut decision.rules) {
                if r.verdict.is_allowed() {
                    r.remaining = algorithm::decide(&item.params, state, now, 0).remaining;
                }
            }
        }
        if decision.admitted {
            for ((key, (_, d)), r) in keys.iter().zip(&decided).zip(&decision.rules) {
                if r.debited {
                    let shard = guard_for(&mut guards, self.shard_of(key.hash));
                    self.put(shard, key, &d.state, d.expires_at, now);
                }
            }
        }
        decision
    }

    fn check_one(&self, item: &CheckItem<'_>, now: u64) -> Decision {
        let rule = self.decide_one(item, now);
        let mut rules = SmallVec::new();
        rules.push(rule);
        Decision {
            admitted: rule.debited || item.shadow,
            rules,
        }
    }

    /// Decides one item at a given time (µs on the store's clock): the same decision as
    /// [`MemoryStore::check_at`] with one item, without the list. The request is admitted
    /// when the rule was debited or is a shadow rule.
    #[inline]
    pub fn check_one_at(&self, item: &CheckItem<'_>, now: u64) -> RuleDecision {
        self.decide_one(item, now)
    }

    #[inline]
    fn decide_one(&self, item: &CheckItem<'_>, now: u64) -> RuleDecision {
        let hash = self.hash(item.rule_index, item.key);
        let mut shard = lock(&self.inner.shards[self.shard_of(hash)].0);
        let entry = shard.find_mut(hash, item.rule_index, item.key);
        let (state, generation) = entry
            .as_ref()
            .map(|e| (e.state(), e.generation()))
            .unwrap_or_default();
        let d = decide(&item.params, &state, now, item.cost);
        let mut rule = rule_decision(&item.params, &d, generation);
        let allowed = d.verdict.is_allowed();
        rule.debited = allowed;
        if allowed {
            let key = MapKey {
                hash,
                rule: item.rule_index,
                key: item.key,
            };
            match entry {
                Some(mut e) => {
                    if !e.set(&d.state, d.expires_at) {
                        self.promote(&mut shard, &key, &d.state, d.expires_at);
                    }
                }
                None => self.insert(&mut shard, &key, &d.state, d.expires_at, now),
            }
        }
        rule
    }

    /// Stores a key's state: in place when it is resident and its slot can hold the state,
    /// else (new, or an IP key whose counts outgrew 32 bits) in a new slot.
    fn put(&self, shard: &mut Shard, key: &MapKey<'_>, state: &State, expires_at: u64, now: u64) {
        let stored = match shard.find_mut(key.hash, key.rule, key.key) {
            Some(mut slot) => slot.set(state, expires_at),
            None => return self.insert(shard, key, state, expires_at, now),
        };
        if !stored {
            self.promote(shard, key, state, expires_at);
        }
    }

    /// Adds a key that is not resident, making room first when the shard is full.
    fn insert(
        &self,
        shard: &mut Shard,
        key: &MapKey<'_>,
        state: &State,
        expires_at: u64,
        now: u64,
    ) {
        if shard.len() >= self.inner.per_shard {
            self.make_room(shard, now);
        }
        let small = SmallKey::of(key.rule, key.key);
        if let Some(slot) = small.and_then(|k| SmallSlot::new(k, state, expires_at)) {
            let hasher = &self.inner.hasher;
            shard
                .small
                .insert(key.hash, slot, |k| small_hash(hasher, k));
            return;
        }
        self.insert_wide(shard, key, state, expires_at, 0);
    }

    /// Moves an IP key whose counts outgrew its small slot (generation 0) to the wide
    /// table (the key was resident, so no room is needed).
    fn promote(&self, shard: &mut Shard, key: &MapKey<'_>, state: &State, expires_at: u64) {
        shard.remove(key.hash, key.rule, key.key);
        self.insert_wide(shard, key, state, expires_at, 0);
    }

    fn insert_wide(
        &self,
        shard: &mut Shard,
        key: &MapKey<'_>,
        state: &State,
        expires_at: u64,
        generation: u32,
    ) {
        shard.wide.insert_unique(
            key.hash,
            Slot {
                rule: key.rule,
                generation,
                key: key.key.clone(),
                state: *state,
                expires_at,
            },
            |s| self.hash(s.rule, &s.key),
        );
    }

    /// Drops idle keys; if the shard is still over 7/8 full, drops the keys nearest to
    /// expiry down to 7/8, so the O(n) sweep runs at most once per n/8 inserts. Keys reset
    /// (generation above 0) go last, after every other key: a reset key dropped forgets
    /// its generation, and a charge from before the reset would count again.
    fn make_room(&self, shard: &mut Shard, now: u64) {
        shard.drop_idle(now);
        let target = self.inner.per_shard - self.inner.per_shard / 8 - 1;
        let target = target.min(self.inner.per_shard.saturating_sub(1));
        if shard.len() <= target {
            return;
        }
        let excess = shard.len() - target;
        // The order of eviction: keys not reset first, then by expiry.
        let mut ranks: Vec<(bool, u64)> = shard
            .small
            .iter()
            .map(|e| (false, e.expires_at()))
            .chain(shard.wide.iter().map(|e| (e.generation > 0, e.expires_at)))
            .collect();
        let (nearer, &mut cut, _) = ranks.select_nth_unstable(excess - 1);
        // Every key ranked below the cut goes (all of them are before it), and of those
        // ranked at it (keys reset at the same instant tie) as many as make up the excess:
        // the first keys met at or below the cut would let ties met early take the place
        // of a key ranked strictly below them.
        let mut at_cut = excess - nearer.iter().filter(|&&r| r < cut).count();
        let mut keep = |rank: (bool, u64)| {
            if rank < cut {
                false
            } else if rank == cut && at_cut > 0 {
                at_cut -= 1;
                false
            } else {
                true
            }
        };
        shard.small.retain(|e| keep((false, e.expires_at())));
        shard
            .wide
            .retain(|e| keep((e.generation > 0, e.expires_at)));
        self.inner
            .evictions
            .fetch_add(excess as u64, Ordering::Relaxed);
        tracing::debug!(
            evicted = excess,
            "rate-limit memory store full: evicted the keys nearest to expiry"
        );
    }

    /// Settles corrections. A settlement whose key is not resident, or was reset since
    /// its reservation (an older [`Settlement::generation`]), or (GCRA) a give-back whose
    /// key has started afresh since (another epoch: the time its bucket was last found
    /// full, the reservation's [`RuleDecision::window_start`]), is dropped; a GCRA charge
    /// (more used than reserved) applies in any epoch, and to a key that is not resident
    /// as to a fresh one: on a bucket that has drained full (or a key dropped as idle) it
    /// is debited from now, as a request's units would be, whether or not the idle key was
    /// dropped. A charge from before a reset is dropped as long as the reset key keeps
    /// its generation (see [`MemoryStore::reset_now`]); a charge from after a reset
    /// applies even on a key dropped and started again since (at generation 0: the
    /// charge's generation is newer, counted modulo 2^32, so its units were used after
    /// the reset). A GCRA give-back refunds at most what of its reservation is still
    /// outstanding now (see [`Settlement::reservation_end`]).
    pub fn settle_now(&self, settlements: &[Settlement<'_>]) {
        self.settle_at(settlements, self.now_micros());
    }

    /// Settles corrections at a given time (µs on the store's clock), as
    /// [`MemoryStore::settle_now`] does: for tests and replays that drive the store with
    /// explicit instants ([`MemoryStore::check_at`]).
    pub fn settle_at(&self, settlements: &[Settlement<'_>], now: u64) {
        for s in settlements {
            let key = self.map_key(s.rule_index, s.key);
            let mut shard = lock(&self.inner.shards[self.shard_of(key.hash)].0);
            let Some(mut slot) = shard.find_mut(key.hash, key.rule, key.key) else {
                // A GCRA charge on a key with no state lands as on a fresh one: the key
                // may have been dropped as idle, and that must not lose the units.
                if s.params.algorithm == Algorithm::Gcra && s.delta > 0 {
                    if let Some(state) = settle(&s.params, &State::default(), s, now) {
                        self.insert(&mut shard, &key, &state, state.start, now);
                    }
                }
                continue;
            };
            let generation = slot.generation();
            if generation != s.generation
                && !(s.delta > 0 && generation_is_newer(s.generation, generation))
            {
                continue;
            }
            let Some(state) = settle(&s.params, &slot.state(), s, now) else {
                continue;
            };
            let expires_at = if s.params.algorithm == Algorithm::Gcra {
                state.start
            } else {
                slot.expires_at()
            };
            if !slot.set(&state, expires_at) {
                self.promote(&mut shard, &key, &state, expires_at);
            }
        }
    }

    /// Drops one rule's key, its state and its generation, as a shard out of room drops a
    /// key (without counting an eviction): for tests and replays that model a store
    /// losing keys. The next request for the key starts it afresh, at generation 0.
    pub fn forget(&self, rule_index: u32, key: &RateKey) {
        let key = self.map_key(rule_index, key);
        let mut shard = lock(&self.inner.shards[self.shard_of(key.hash)].0);
        shard.remove(key.hash, key.rule, key.key);
    }

    /// The state of one rule for one key, unchanged.
    pub fn peek_now(&self, item: &CheckItem<'_>) -> RuleDecision {
        self.peek_at(item, self.now_micros())
    }

    /// The state of one rule for one key at a given time (µs on the store's clock).
    fn peek_at(&self, item: &CheckItem<'_>, now: u64) -> RuleDecision {
        let key = self.map_key(item.rule_index, item.key);
        let shard = lock(&self.inner.shards[self.shard_of(key.hash)].0);
        let (state, generation) = shard.state(key.hash, key.rule, key.key).unwrap_or_default();
        drop(shard);
        let d = decide(&item.params, &state, now, 0);
        rule_decision(&item.params, &d, generation)
    }

    /// Forgets one rule's state for one key. A resident key keeps a fresh state with the
    /// next generation (modulo 2^32) until its old state would have expired, and at least
    /// for the store's reset retention ([`MemoryStoreBuilder::reset_retention`], an hour by
    /// default), so that a reservation made before the reset is not settled against
    /// requests admitted after it (later decisions and settlements never make it expire
    /// sooner). A full shard drops a reset key only when every other key has gone: only
    /// a shard whose keys are nearly all reset ones (over 7/8 of them) forgets a reset
    /// early, and a charge from before that reset then counts as a new one.
    pub fn reset_now(&self, rule_index: u32, key: &RateKey) {
        self.reset_at(rule_index, key, self.now_micros());
    }

    /// Resets at a given time (µs on the store's clock), as [`MemoryStore::reset_now`]
    /// does: for tests and replays that drive the store with explicit instants.
    pub fn reset_at(&self, rule_index: u32, key: &RateKey, now: u64) {
        let key = self.map_key(rule_index, key);
        let mut shard = lock(&self.inner.shards[self.shard_of(key.hash)].0);
        let Some(slot) = shard.find_mut(key.hash, key.rule, key.key) else {
            return;
        };
        let generation = slot.generation().wrapping_add(1);
        let expires_at = slot
            .expires_at()
            .max(now.saturating_add(self.inner.reset_retention));
        match slot {
            SlotMut::Wide(s) => {
                s.state = State::default();
                s.generation = generation;
                s.expires_at = expires_at;
            }
            SlotMut::Small(_) => {
                shard.remove(key.hash, key.rule, key.key);
                self.insert_wide(&mut shard, &key, &State::default(), expires_at, generation);
            }
        }
    }
}

/// [`algorithm::decide`], with GCRA's epoch: the time its bucket was last found full, kept
/// beside the TAT as the TAT's distance from it (in `count`) and reported as the decision's
/// `window_start`, and the µs that give-backs have moved the TAT back in the epoch (in
/// `prev`). A bucket found full (TAT at or before now: every unit debited before has come
/// back) starts a new epoch, so a give-back of a reservation from an earlier one refunds
/// nothing (see [`settle`]). The Redis script keeps the same state.
#[inline]
fn decide(params: &Params, state: &State, now: u64, cost: u64) -> Decided {
    let mut d = algorithm::decide(params, state, now, cost);
    if params.algorithm == Algorithm::Gcra {
        let (epoch, given_back) = if state.start > now {
            (state.start.saturating_sub(state.count), state.prev)
        } else {
            (now, 0)
        };
        d.window_start = epoch;
        d.state.prev = given_back;
        d.state.count = d.state.start.saturating_sub(epoch);
    }
    d
}

/// The rule's decision as reported, with the key's generation and (GCRA) where the
/// decided state's units end on the epoch's timeline: the TAT plus what give-backs have
/// moved it back in the epoch ([`RuleDecision::reservation_end`]).
#[inline]
fn rule_decision(params: &Params, d: &Decided, generation: u32) -> RuleDecision {
    let mut rule = RuleDecision::from_decided(d);
    rule.generation = generation;
    if params.algorithm == Algorithm::Gcra {
        rule.reservation_end = d.state.start.saturating_add(d.state.prev);
    }
    rule
}

/// [`algorithm::settle`] at time `now`, or `None` for a GCRA give-back of a reservation
/// made in an earlier epoch than the state's (a charge, more used than reserved, applies
/// in any epoch: the units were used; on a bucket that has drained full it is debited
/// from now, in a new epoch).
///
/// A GCRA give-back moves the TAT back by at most what of its reservation is still
/// outstanding: its end ([`Settlement::reservation_end`], less what other give-backs have
/// moved the TAT back since it was made) minus now. The units before that have drained
/// already, and the units after the reservation's end belong to later requests: giving
/// either back would let a client past its limit. It never moves the TAT before the
/// epoch's start either: the bucket is then full, and stays no fuller.
fn settle(params: &Params, state: &State, s: &Settlement<'_>, now: u64) -> Option<State> {
    if params.algorithm != Algorithm::Gcra {
        return Some(algorithm::settle(params, state, s.window_start, s.delta));
    }
    let drained = State {
        start: now,
        prev: 0,
        count: 0,
    };
    // A charge on a bucket that has drained full is debited from now, in a new epoch, as a
    // request's units would be: the drained state decides as no state at all, and so must
    // settle (whether the store still holds an idle key must not change a later decision).
    let state = if s.delta > 0 && state.start <= now {
        &drained
    } else {
        state
    };
    let mut new = algorithm::settle(params, state, s.window_start, s.delta);
    let epoch = state.start.saturating_sub(state.count);
    let mut given_back = state.prev;
    if s.delta < 0 {
        if epoch != s.window_start {
            return None;
        }
        // Where the reservation ends now: each give-back since it was made moved it back
        // (giving back units before it) or took back units after it; either way, what is
        // still its own ends no later than this.
        let end = s.reservation_end.saturating_sub(given_back);
        let outstanding = end.saturating_sub(now);
        new.start = new
            .start
            .max(state.start.saturating_sub(outstanding))
            .max(epoch);
        given_back = given_back.saturating_add(state.start - new.start);
    }
    new.start = new.start.max(epoch);
    new.prev = given_back;
    new.count = new.start - epoch;
    Some(new)
}

#[inline]
fn lock(m: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn guard_for<'g, 'a>(guards: &'g mut [(usize, MutexGuard<'a, Shard>)], id: usize) -> &'g mut Shard {
    let pos = guards
        .iter()
        .position(|(i, _)| *i == id)
        .unwrap_or_else(|| unreachable!("every item's shard is locked"));
    &mut guards[pos].1
}

impl Store for MemoryStore {
    type CheckFuture = Ready<Result<Decision, StoreError>>;

    fn check(&self, items: &[CheckItem<'_>]) -> Self::CheckFuture {
        ready(Ok(self.check_at(items, self.now_micros())))
    }

    #[inline]
    fn check_now(&self, items: &[CheckItem<'_>]) -> Option<Result<Decision, StoreError>> {
        Some(Ok(self.check_at(items, self.now_micros())))
    }

    #[inline]
    fn check_one_now(&self, item: &CheckItem<'_>) -> Option<Result<RuleDecision, StoreError>> {
        Some(Ok(self.decide_one(item, self.now_micros())))
    }

    fn settle(&self, settlements: &[Settlement<'_>]) -> BoxFuture<Result<(), StoreError>> {
        self.settle_now(settlements);
        Box::pin(ready(Ok(())))
    }

    fn peek(&self, item: &CheckItem<'_>) -> BoxFuture<Result<RuleDecision, StoreError>> {
        Box::pin(ready(Ok(self.peek_now(item))))
    }

    fn reset(
        &self,
        rule_index: u32,
        _rule: &str,
        key: &RateKey,
    ) -> BoxFuture<Result<(), StoreError>> {
        self.reset_now(rule_index, key);
        Box::pin(ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::algorithm::Params;
    use crate::rate_limit::{Algorithm, Quota};

    fn item<'a>(key: &'a RateKey, params: Params) -> CheckItem<'a> {
        CheckItem {
            rule_index: 0,
            rule: "r",
            key,
            params,
            cost: 1,
            shadow: false,
        }
    }

    /// The settlement of decision `d` on rule 0 (`"r"`) by `delta` units.
    fn settlement<'a>(
        key: &'a RateKey,
        params: Params,
        d: &RuleDecision,
        delta: i64,
    ) -> Settlement<'a> {
        Settlement {
            rule_index: 0,
            rule: "r",
            key,
            params,
            window_start: d.window_start,
            generation: d.generation,
            reservation_end: d.reservation_end,
            delta,
        }
    }

    /// In a group refused by another rule nothing is debited, and each allowing rule
    /// reports what is left without the request: exactly what a peek reports. GCRA's
    /// remaining after a debit is rounded down from the bucket's slack, so adding the cost
    /// back (as for the window algorithms) came out one short.
    #[test]
    fn a_refused_group_reports_each_rules_remaining_as_a_peek_does() {
        let store = MemoryStore::new();
        let key = RateKey::Global;
        let spent = Params::new(Algorithm::FixedWindow, Quota::per_minute(1));
        let exhaust = CheckItem {
            rule_index: 1,
            ..item(&key, spent)
        };
        assert!(store.check_at(&[exhaust], 0).admitted);
        for algorithm in [
            Algorithm::Gcra,
            Algorithm::SlidingWindow,
            Algorithm::FixedWindow,
        ] {
            let open = Params::new(algorithm, Quota::per_second(3));
            let decision = store.check_at(&[item(&key, open), exhaust], 1_000);
            assert!(!decision.admitted);
            let peek = store.peek_at(&item(&key, open), 1_000);
            assert_eq!(
                decision.rules[0].remaining, peek.remaining,
                "{algorithm:?}: {decision:?}"
            );
            assert_eq!(peek.remaining, 3, "{algorithm:?}");
        }
    }

    /// Every clock source decides the same way within a window; the faster ones ignore
    /// tokio's paused clock (advancing it does not restore the quota).
    #[tokio::test(start_paused = true)]
    async fn every_clock_source_limits_and_only_tokio_follows_the_paused_clock() {
        use crate::clock::ClockSource;
        let params = Params::new(Algorithm::SlidingWindow, Quota::per_minute(3));
        let key = RateKey::Global;
        for source in [ClockSource::Tokio, ClockSource::Fast, ClockSource::Coarse] {
            let store = MemoryStore::builder().clock(source).build().unwrap();
            for _ in 0..3 {
                let d = store.check_now(&[item(&key, params)]).unwrap().unwrap();
                assert!(d.admitted, "{source}");
            }
            let d = store.check_now(&[item(&key, params)]).unwrap().unwrap();
            assert!(!d.admitted, "{source}: the fourth of 3 a minute");
            let reset = d.rules[0].reset_micros;
            // the three weigh until the end of the next window
            assert!(
                reset > 60_000_000 && reset <= 120_000_000,
                "{source}: {reset}"
            );
            tokio::time::advance(std::time::Duration::from_secs(120)).await;
            let d = store.check_now(&[item(&key, params)]).unwrap().unwrap();
            assert_eq!(d.admitted, source == ClockSource::Tokio, "{source}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_under_the_cap_for_a_million_keys() {
        let store = MemoryStore::builder()
            .max_entries(10_000)
            .shards(16)
            .build()
            .unwrap();
        let params = Params::new(Algorithm::SlidingWindow, Quota::per_minute(5));
        let mut peak = 0;
        for i in 0..1_000_000u32 {
            let key = RateKey::ip(std::net::IpAddr::from(i.to_be_bytes()));
            let d = store.check_at(&[item(&key, params)], 0);
            assert!(d.admitted);
            if i % 50_000 == 0 {
                peak = peak.max(store.len());
            }
        }
        peak = peak.max(store.len());
        assert!(peak <= 10_000, "peak {peak}");
        assert!(store.len() <= store.max_entries());
        // all keys were active in the same window, so the bound forced evictions
        assert!(store.evictions() >= 990_000);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keys_are_dropped_before_active_ones() {
        let store = MemoryStore::builder()
            .max_entries(16)
            .shards(1)
            .build()
            .unwrap();
        let params = Params::new(Algorithm::FixedWindow, Quota::per_second(1));
        for i in 0..16u8 {
            let key = RateKey::principal(format!("old-{i}"));
            assert!(store.check_at(&[item(&key, params)], 0).admitted);
        }
        // A second later every old key is idle: inserting drops them, no eviction.
        let key = RateKey::principal("new");
        assert!(store.check_at(&[item(&key, params)], 1_000_000).admitted);
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.len(), 1);
    }

    /// A GCRA charge on an idle key lands alike whether the store still holds the key or
    /// has dropped it to make room: debited from now, as a request's units would be. A
    /// charge on the idle state was added to its old TAT, and a charge on a dropped key was
    /// lost, so dropping an idle key changed the next decision.
    #[test]
    fn a_gcra_charge_on_an_idle_key_lands_alike_whether_or_not_it_was_dropped() {
        // 5 a second: a unit is 200 ms, the bucket holds 5
        let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
        for key in [RateKey::principal("k"), ip("192.0.2.7")] {
            let build = || {
                MemoryStore::builder()
                    .max_entries(4)
                    .shards(1)
                    .build()
                    .unwrap()
            };
            let (kept, dropped) = (build(), build());
            let mut reservations = Vec::new();
            for store in [&kept, &dropped] {
                let d = store.check_at(&[item(&key, params)], 0);
                assert!(d.admitted);
                reservations.push(d.rules[0]);
            }
            // 1.1 s on the key is idle (its TAT was 0.2 s); four newcomers make the second
            // store drop it, without an eviction
            let now = 1_100_000;
            for i in 0..4 {
                let other = RateKey::principal(format!("other-{i}"));
                assert!(dropped.check_at(&[item(&other, params)], now).admitted);
            }
            assert_eq!(dropped.evictions(), 0);
            assert_eq!((kept.len(), dropped.len()), (1, 4));
            // the request used 5 more units than it reserved
            for (store, d) in [(&kept, &reservations[0]), (&dropped, &reservations[1])] {
                store.settle_at(&[settlement(&key, params, d, 5)], now);
            }
            for store in [&kept, &dropped] {
                let peek = store.peek_at(&item(&key, params), now);
                assert_eq!(
                    (peek.remaining, peek.reset_micros, peek.window_start),
                    (0, 1_000_000, now),
                    "{key}"
                );
                assert!(!store.check_at(&[item(&key, params)], now).admitted);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_single_item_path_answers_like_a_list_of_one() {
        let store = MemoryStore::new();
        let key = RateKey::principal("k");
        let params = Params::new(Algorithm::SlidingWindow, Quota::per_minute(1));
        for shadow in [false, true] {
            let rule_index = u32::from(shadow);
            let it = CheckItem {
                rule_index,
                shadow,
                ..item(&key, params)
            };
            let first = store.check_one_now(&it).unwrap().unwrap();
            assert!(first.debited);
            // refused: not debited; a shadow rule's request is still admitted by the list path
            let one = store.check_one_now(&it).unwrap().unwrap();
            let list = store.check_now(&[it]).unwrap().unwrap();
            assert_eq!(list.rules[0], one);
            assert!(!one.debited);
            assert_eq!(list.admitted, shadow);
        }
    }

    #[test]
    fn a_slot_is_one_cache_line_and_an_ip_slot_half_of_one() {
        assert_eq!(std::mem::size_of::<Slot>(), 64);
        assert_eq!(std::mem::align_of::<Slot>(), 64);
        assert_eq!(std::mem::size_of::<SmallSlot>(), 32);
        assert_eq!(std::mem::align_of::<SmallSlot>(), 32);
    }

    fn ip(s: &str) -> RateKey {
        RateKey::ip(s.parse().unwrap())
    }

    /// A small slot rehashes to the hash its key was found by (else a key would be lost
    /// when its table grows).
    #[test]
    fn a_small_slot_rehashes_like_its_key() {
        let store = MemoryStore::new();
        for key in [
            ip("203.0.113.9"),
            ip("0.0.0.0"),
            ip("2001:db8::1"),
            ip("::"),
        ] {
            for rule in [0, 1, 7, SmallKey::V6 - 2] {
                let small = SmallKey::of(rule, &key).unwrap();
                assert_eq!(small.rule(), rule);
                assert_eq!(
                    small_hash(&store.inner.hasher, small),
                    store.hash(rule, &key),
                    "{key} {rule}"
                );
            }
            assert!(SmallKey::of(SmallKey::V6 - 1, &key).is_none());
        }
        assert!(SmallKey::of(0, &RateKey::principal("p")).is_none());
    }

    /// Keys whose packed words are equal still count apart: an IPv4 address and the IPv6
    /// network whose prefix spells the same word, and the same key under two rules.
    #[tokio::test(start_paused = true)]
    async fn ip_keys_with_the_same_word_count_apart() {
        let store = MemoryStore::new();
        let params = Params::new(Algorithm::FixedWindow, Quota::per_minute(1));
        let v4 = ip("1.2.3.4");
        let v6 = ip("0:ffff:102:304::1");
        assert_eq!(v4_word(&v4), v4_word(&v6));
        for (rule, key) in [(0, &v4), (0, &v6), (1, &v4), (SmallKey::V6 - 2, &v6)] {
            let it = CheckItem {
                rule_index: rule,
                ..item(key, params)
            };
            assert!(store.check_at(&[it], 0).admitted, "{rule} {key}");
            assert!(!store.check_at(&[it], 0).admitted, "{rule} {key}");
        }
        // a rule index too large for the small table's tag uses the wide one
        let it = CheckItem {
            rule_index: u32::MAX,
            ..item(&v4, params)
        };
        assert!(store.check_at(&[it], 0).admitted);
        assert!(!store.check_one_at(&it, 0).debited);
        assert_eq!(table_lens(&store), (4, 1));
    }

    fn v4_word(key: &RateKey) -> u64 {
        match key {
            RateKey::Ip(ip) => ip.packed().0,
            _ => unreachable!(),
        }
    }

    /// Resident keys in the small and the wide tables.
    fn table_lens(store: &MemoryStore) -> (usize, usize) {
        store.inner.shards.iter().fold((0, 0), |(small, wide), s| {
            let shard = lock(&s.0);
            (small + shard.small.len(), wide + shard.wide.len())
        })
    }

    /// An IP key whose count outgrows 32 bits moves to the wide table and keeps counting
    /// exactly; idle IP keys are dropped despite the coarse expiry, active ones are not.
    #[tokio::test(start_paused = true)]
    async fn ip_counts_past_32_bits_move_to_the_wide_table() {
        let store = MemoryStore::builder()
            .max_entries(16)
            .shards(1)
            .build()
            .unwrap();
        let big = u64::from(u32::MAX) * 3;
        let params = Params::new(Algorithm::SlidingWindow, Quota::per_minute(big));
        let key = ip("198.51.100.7");
        let spend = |cost, now| {
            store
                .check_one_at(
                    &CheckItem {
                        cost,
                        ..item(&key, params)
                    },
                    now,
                )
                .debited
        };
        assert!(spend(u64::from(u32::MAX), 0));
        assert_eq!(table_lens(&store), (1, 0));
        assert!(spend(2, 0));
        assert_eq!(table_lens(&store), (0, 1));
        assert!(spend(big - u64::from(u32::MAX) - 2, 0));
        assert!(!spend(1, 0));
        assert_eq!(store.peek_at(&item(&key, params), 0).remaining, 0);
        // a minute on, the whole previous window still weighs in: nothing left yet
        assert!(!spend(1, 60_000_000));
        // 15 more keys fill the shard (the wide key is idle two windows on, but no room was
        // needed yet)
        for i in 0..15u8 {
            let other = RateKey::ip(std::net::IpAddr::from([10, 0, 0, i]));
            let fixed = Params::new(Algorithm::FixedWindow, Quota::per_second(1));
            assert!(
                store
                    .check_one_at(&item(&other, fixed), 120_000_000)
                    .debited
            );
        }
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.len(), 16);
        // the small keys expire with their window, rounded up to a whole EXPIRY_UNIT: a
        // newcomer then finds every key idle and drops them all without an eviction
        let late = 121_000_000 + EXPIRY_UNIT;
        let newcomer = ip("192.0.2.1");
        let fixed = Params::new(Algorithm::FixedWindow, Quota::per_second(1));
        assert!(store.check_one_at(&item(&newcomer, fixed), late).debited);
        assert_eq!(store.evictions(), 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn zero_capacity_is_an_error() {
        assert_eq!(
            MemoryStore::builder().max_entries(0).build().unwrap_err(),
            RateLimitConfigError::ZeroCapacity
        );
    }

    #[tokio::test(start_paused = true)]
    async fn groups_commit_all_or_nothing() {
        let store = MemoryStore::new();
        let a = RateKey::principal("a");
        let g = RateKey::Global;
        let small = Params::new(Algorithm::FixedWindow, Quota::per_minute(1));
        let big = Params::new(Algorithm::FixedWindow, Quota::per_minute(10));
        let items = |ka| {
            [
                CheckItem {
                    rule_index: 0,
                    ..item(ka, small)
                },
                CheckItem {
                    rule_index: 1,
                    ..item(&g, big)
                },
            ]
        };
        assert!(store.check_at(&items(&a), 0).admitted);
        let refused = store.check_at(&items(&a), 0);
        assert!(!refused.admitted);
        assert!(refused.rules.iter().all(|r| !r.debited));
        // the global rule was not debited by the refusal: 9 left, not 8
        let peek = store.peek_now(&CheckItem {
            rule_index: 1,
            ..item(&g, big)
        });
        assert_eq!(peek.remaining, 9);
    }

    fn all_algorithms(limit: u64) -> [Params; 4] {
        let q = Quota::per_minute(limit);
        [
            Params::new(Algorithm::SlidingWindow, q),
            Params::new(Algorithm::SlidingWindow, q).strict(true),
            Params::new(Algorithm::FixedWindow, q),
            Params::new(Algorithm::Gcra, q),
        ]
    }

    /// 1,000 concurrent single-rule requests from 8 threads against a limit of 100 admit
    /// exactly 100, for every algorithm.
    #[test]
    fn concurrent_decisions_admit_exactly_the_limit() {
        for params in all_algorithms(100) {
            let store = MemoryStore::builder().build().unwrap();
            let key = RateKey::principal("hot");
            // A cost-0 check makes the key resident, so the racers update one entry.
            let warm = CheckItem {
                cost: 0,
                ..item(&key, params)
            };
            assert!(store.check_at(&[warm], 0).admitted);
            let admitted = AtomicU64::new(0);
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| {
                        barrier.wait();
                        for _ in 0..125 {
                            if store.check_at(&[item(&key, params)], 1_000).admitted {
                                admitted.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert_eq!(admitted.load(Ordering::Relaxed), 100, "{params:?}");
            assert_eq!(store.peek_at(&item(&key, params), 1_000).remaining, 0);
        }
    }

    /// Single-rule requests and two-rule groups race on the same key: the shared rule
    /// admits exactly its limit over both, and the group's second rule is debited exactly
    /// once per admitted group (all or none).
    #[test]
    fn groups_stay_all_or_nothing_against_concurrent_single_rules() {
        for params in all_algorithms(100) {
            let store = MemoryStore::builder().build().unwrap();
            let key = RateKey::principal("hot");
            let other = RateKey::Global;
            let wide = Params::new(params.algorithm, Quota::per_minute(10_000));
            let single = item(&key, params);
            let group = [
                single,
                CheckItem {
                    rule_index: 1,
                    ..item(&other, wide)
                },
            ];
            assert!(
                store
                    .check_at(&[CheckItem { cost: 0, ..single }], 0)
                    .admitted
            );
            let (singles, groups) = (AtomicU64::new(0), AtomicU64::new(0));
            let barrier = std::sync::Barrier::new(8);
            std::thread::scope(|s| {
                for t in 0..8 {
                    let (singles, groups, barrier, store) = (&singles, &groups, &barrier, &store);
                    s.spawn(move || {
                        barrier.wait();
                        for _ in 0..50 {
                            if t % 2 == 0 {
                                if store.check_at(&[single], 1_000).admitted {
                                    singles.fetch_add(1, Ordering::Relaxed);
                                }
                            } else if store.check_at(&group, 1_000).admitted {
                                groups.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            let (singles, groups) = (singles.into_inner(), groups.into_inner());
            assert_eq!(singles + groups, 100, "{params:?}");
            let peek = store.peek_at(&group[1], 1_000);
            assert_eq!(peek.remaining, 10_000 - groups, "{params:?}");
        }
    }

    /// The store gives the same decisions as the pure algorithm applied in sequence, through
    /// costs, refusals, long idle gaps, settlements (including very large ones) and resets.
    #[test]
    fn decisions_match_the_algorithm_in_sequence() {
        let quotas = [
            Quota::per_second(5),
            Quota::new(3, std::time::Duration::from_micros(1)),
            Quota::per_minute((1 << 20) - 1),
            Quota::per_minute((1 << 20) - 1 + 7),
            Quota::per_second(4).with_burst(9),
            // counts past 32 bits: IP keys move to the wide table
            Quota::per_minute(u64::from(u32::MAX) + 9),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for quota in quotas {
            for algorithm in [
                Algorithm::SlidingWindow,
                Algorithm::FixedWindow,
                Algorithm::Gcra,
            ] {
                for (strict, key) in [
                    (false, RateKey::principal("k")),
                    (true, RateKey::principal("k")),
                    (false, ip("192.0.2.44")),
                    (true, ip("2001:db8:5::9")),
                ] {
                    let params = Params::new(algorithm, quota).strict(strict);
                    let store = MemoryStore::new();
                    let mut model = State::default();
                    // A settlement for a key that is not resident is dropped.
                    let mut resident = false;
                    let mut now = 0u64;
                    for step in 0..3_000 {
                        now += match next(10) {
                            0 => next(3 * params.window.min(1 << 30)),
                            1 => 1 << 25, // past the packed index width for µs windows
                            _ => next(params.window.min(1 << 30) / 4 + 1),
                        };
                        let cost = match next(8) {
                            0 => 0,
                            1 => params.capacity() + 1,
                            2 => 1 + next(params.capacity()),
                            _ => 1 + next(params.capacity().min(3)),
                        };
                        if step % 97 == 96 {
                            store.reset_now(0, &key);
                            model = State::default();
                            resident = false;
                            continue;
                        }
                        // the store's decide: the algorithm's, with GCRA's epoch
                        let want = decide(&params, &model, now, cost);
                        let it = CheckItem {
                            cost,
                            ..item(&key, params)
                        };
                        // the list path and the single-item path alternate
                        let got = if step % 2 == 0 {
                            let d = store.check_at(&[it], now);
                            assert_eq!(d.rules.len(), 1);
                            assert_eq!(d.admitted, d.rules[0].debited);
                            d.rules[0]
                        } else {
                            store.check_one_at(&it, now)
                        };
                        assert_eq!(got.verdict, want.verdict, "{params:?} step {step}");
                        assert_eq!(got.debited, want.verdict.is_allowed());
                        assert_eq!(got.remaining, want.remaining);
                        assert_eq!(got.reset_micros, want.reset);
                        assert_eq!(got.window_start, want.window_start);
                        if want.verdict.is_allowed() {
                            model = want.state;
                            resident = true;
                        }
                        if step % 31 == 30 && resident {
                            let delta = i64::try_from(next(2 * (1 << 20) - 1)).unwrap() - 1_000;
                            let s = Settlement {
                                rule_index: 0,
                                rule: "r",
                                key: &key,
                                params,
                                window_start: want.window_start,
                                generation: got.generation,
                                reservation_end: got.reservation_end,
                                delta,
                            };
                            store.settle_at(&[s], now);
                            if let Some(settled) = settle(&params, &model, &s, now) {
                                model = settled;
                            }
                        }
                        let peek = store.peek_at(&item(&key, params), now);
                        let want = decide(&params, &model, now, 0);
                        assert_eq!(peek.remaining, want.remaining, "{params:?} step {step}");
                    }
                }
            }
        }
    }

    #[test]
    fn peek_settle_and_reset_follow_the_decisions() {
        for (params, key) in all_algorithms(10)
            .into_iter()
            .flat_map(|p| [(p, RateKey::principal("k")), (p, ip("192.0.2.8"))])
        {
            let store = MemoryStore::new();
            let (mut window_start, mut reservation_end) = (0, 0);
            for _ in 0..4 {
                let d = store.check_at(&[item(&key, params)], 5);
                assert!(d.admitted);
                window_start = d.rules[0].window_start;
                reservation_end = d.rules[0].reservation_end;
            }
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 6);
            let settle = |delta| Settlement {
                rule_index: 0,
                rule: "r",
                key: &key,
                params,
                window_start,
                generation: 0,
                reservation_end,
                delta,
            };
            store.settle_at(&[settle(3)], 5);
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 3);
            store.settle_at(&[settle(-2)], 5);
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 5);
            // a very large settlement
            store.settle_at(&[settle(i64::from(u32::MAX))], 5);
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 0);
            assert!(!store.check_at(&[item(&key, params)], 5).admitted);
            store.reset_now(0, &key);
            // the key keeps only its next generation, until its old state would expire
            assert_eq!(store.len(), 1);
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 10);
            assert_eq!(store.peek_at(&item(&key, params), 5).generation, 1);
            store.reset_now(0, &key);
            assert_eq!(store.peek_at(&item(&key, params), 5).generation, 2);
            // a key holding nothing has nothing to reset
            let other = RateKey::principal("never-seen");
            store.reset_now(0, &other);
            assert_eq!(store.len(), 1);
            assert_eq!(store.peek_at(&item(&other, params), 5).generation, 0);
        }
    }

    /// A reservation made before a reset and settled after it gives nothing back: the
    /// units a request admitted after the reset paid stay paid, while that request's own
    /// settlement still applies.
    #[test]
    fn a_give_back_after_a_reset_does_not_refund_requests_admitted_after_it() {
        for (params, key) in all_algorithms(10)
            .into_iter()
            .flat_map(|p| [(p, RateKey::principal("k")), (p, ip("192.0.2.8"))])
        {
            let store = MemoryStore::new();
            let spend = |cost| {
                let d = store.check_one_at(
                    &CheckItem {
                        cost,
                        ..item(&key, params)
                    },
                    5,
                );
                assert!(d.debited, "{params:?} {key}");
                d
            };
            let give_back = |d: &RuleDecision, delta| {
                let s = settlement(&key, params, d, delta);
                store.settle_at(&[s], 5);
            };
            let before = spend(6);
            store.reset_now(0, &key);
            let after = spend(7);
            assert_ne!(after.generation, before.generation);
            give_back(&before, -6);
            let left = store.peek_at(&item(&key, params), 5).remaining;
            assert_eq!(left, 3, "{params:?} {key}: a pre-reset give-back refunded");
            give_back(&after, -2);
            assert_eq!(store.peek_at(&item(&key, params), 5).remaining, 5);
        }
    }

    /// A GCRA charge (a settlement of more than was reserved) is kept whatever epoch the
    /// key is in: the units were used, so a request that reserved little and used much
    /// pays for it even when another request has started the key afresh meanwhile; only a
    /// give-back is bound to its reservation's epoch. For IP keys (small slots) and others.
    #[test]
    fn a_gcra_charge_from_an_earlier_epoch_is_kept() {
        for key in [RateKey::principal("k"), ip("192.0.2.8")] {
            let store = MemoryStore::new();
            let params = Params::new(Algorithm::Gcra, Quota::per_second(10));
            let sec = 1_000_000;
            let long = store.check_one_at(&item(&key, params), 0);
            assert!(long.debited);
            // full again after 0.1 s; at 5 s another request starts a new epoch
            let next = store.check_one_at(&item(&key, params), 5 * sec);
            assert!(next.debited);
            assert_ne!(next.window_start, long.window_start);
            // the first request used 6 units where it reserved 1
            let charge = settlement(&key, params, &long, 5);
            store.settle_at(&[charge], 5 * sec);
            assert_eq!(
                store.peek_at(&item(&key, params), 5 * sec).remaining,
                4,
                "{key}: a charge from an earlier epoch was dropped"
            );
        }
    }

    /// A GCRA give-back applies only to the state its reservation debited. Once the
    /// bucket has filled again (the key's state expired back to fresh), a new request
    /// starts the key afresh, and a give-back of a reservation made before refunds
    /// nothing: its units came back with time, and the new request's stay paid (as after
    /// a reset), while the new request's own give-back applies; for IP keys (small slots)
    /// and others, and for a give-back that drains the bucket.
    #[test]
    fn a_gcra_give_back_after_the_key_expired_does_not_refund_the_new_state() {
        for key in [RateKey::principal("k"), ip("192.0.2.8")] {
            let store = MemoryStore::new();
            let params = Params::new(Algorithm::Gcra, Quota::per_second(10));
            let with = |cost| CheckItem {
                cost,
                ..item(&key, params)
            };
            let sec = 1_000_000;
            let give_back = |d: &RuleDecision, delta| {
                let s = settlement(&key, params, d, delta);
                store.settle_at(&[s], 5 * sec);
            };
            let before = store.check_one_at(&with(6), 0);
            assert!(before.debited);
            // full again after 0.6 s; at 5 s a new request takes 7 of 10
            let after = store.check_one_at(&with(7), 5 * sec);
            assert!(after.debited);
            give_back(&before, -6);
            assert_eq!(
                store.peek_at(&with(0), 5 * sec).remaining,
                3,
                "{key}: a give-back from before the key expired refunded a later request"
            );
            give_back(&after, -2);
            assert_eq!(store.peek_at(&with(0), 5 * sec).remaining, 5, "{key}");
            // a give-back past what is debited leaves the bucket full, not fuller
            give_back(&after, -9);
            assert_eq!(store.peek_at(&with(0), 5 * sec).remaining, 10, "{key}");
            let next = store.check_one_at(&with(10), 5 * sec);
            assert!(next.debited, "{key}: {next:?}");
            assert_eq!(store.peek_at(&with(0), 5 * sec).remaining, 0, "{key}");
        }
    }

    /// A reset key keeps its generation until its state from before the reset would have
    /// expired: a decision after the reset set the slot's expiry to its own, shorter state,
    /// a full shard then dropped the slot as idle, the key started again at generation 0,
    /// and a give-back from before the reset refunded a request admitted after it (as the
    /// Redis store's key expired).
    #[test]
    fn a_reset_keys_generation_outlives_what_is_decided_after_the_reset() {
        let store = MemoryStore::builder()
            .max_entries(16)
            .shards(1)
            .build()
            .unwrap();
        let key = RateKey::principal("hot");
        let params = Params::new(Algorithm::Gcra, Quota::per_minute(10));
        let with = |cost| CheckItem {
            cost,
            ..item(&key, params)
        };
        let sec = 1_000_000;
        // six units at 0 weigh until 36 s
        let before = store.check_at(&[with(6)], 0).rules[0];
        assert!(before.debited);
        store.reset_now(0, &key);
        // one unit at 1 s weighs until 7 s
        let after = store.check_at(&[with(1)], sec).rules[0];
        assert!(after.debited && after.generation == 1);
        // at 10 s other keys fill the shard
        for i in 0..20 {
            let other = RateKey::principal(format!("user-{i}"));
            assert!(store.check_at(&[item(&other, params)], 10 * sec).admitted);
        }
        let all = store.check_at(&[with(10)], 10 * sec).rules[0];
        assert!(all.debited);
        assert_eq!(all.generation, 1, "the reset key lost its generation");
        let give_back = settlement(&key, params, &before, -6);
        store.settle_at(&[give_back], 10 * sec);
        assert_eq!(
            store.peek_at(&with(0), 10 * sec).remaining,
            0,
            "a give-back from before the reset refunded a later request"
        );
    }

    /// A full shard drops reset keys (generation above 0) only after every other key,
    /// nearest to expiry first among each, and keeps its bound when every key is a reset
    /// one (the one case where a reset key is forgotten within the reset retention).
    #[test]
    fn a_full_shard_drops_reset_keys_last_and_keeps_its_bound() {
        let store = MemoryStore::builder()
            .max_entries(8)
            .shards(1)
            .build()
            .unwrap();
        let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
        let reset: Vec<RateKey> = (0..4)
            .map(|i| RateKey::principal(format!("reset-{i}")))
            .collect();
        for key in &reset {
            assert!(store.check_at(&[item(key, params)], 0).admitted);
            store.reset_at(0, key, 0);
        }
        // newcomers at 0.1 s: the shard of 8 keeps 7 on each sweep, the reset keys among
        // them
        for i in 0..40 {
            let key = RateKey::principal(format!("new-{i}"));
            assert!(store.check_at(&[item(&key, params)], 100_000).admitted);
            assert!(store.len() <= 8);
        }
        for key in &reset {
            assert_eq!(store.peek_at(&item(key, params), 100_000).generation, 1);
        }
        // a shard of reset keys alone still keeps its bound: the nearest to expiry go
        let store = MemoryStore::builder()
            .max_entries(8)
            .shards(1)
            .build()
            .unwrap();
        for i in 0..40u64 {
            let key = RateKey::principal(format!("reset-{i}"));
            assert!(store.check_at(&[item(&key, params)], i).admitted);
            store.reset_at(0, &key, i);
            assert!(store.len() <= 8);
        }
        assert!(store.evictions() > 0);
        // the latest reset keys are kept
        let last = RateKey::principal("reset-39");
        assert_eq!(store.peek_at(&item(&last, params), 40).generation, 1);
    }

    /// Generations count modulo 2^32: a charge from the generation after the key's is
    /// newer (it applies), one from the generation before it is older (dropped), across
    /// the wrap too.
    #[test]
    fn generations_compare_modulo_two_to_the_32() {
        use super::super::generation_is_newer;
        assert!(generation_is_newer(1, 0));
        assert!(generation_is_newer(0, u32::MAX));
        assert!(generation_is_newer((1 << 31) - 1, 0));
        assert!(!generation_is_newer(1 << 31, 0));
        assert!(!generation_is_newer(0, 0));
        assert!(!generation_is_newer(0, 1));
        assert!(!generation_is_newer(u32::MAX, 0));
    }

    /// A GCRA give-back refunds at most what of its reservation is still outstanding. At
    /// 10 units a second, A takes 6 at 0 and B 5 at 0.5 s; by then 5 of A's units have
    /// drained, so A giving its 6 back refunds one, and the bucket keeps B's 5 (it was
    /// left full: 5 of B's units refunded, and 10 more admitted at once beside them). B's
    /// own give-back then refunds its 5. For IP keys (small slots) and others, on the
    /// store's own (paused) clock.
    #[tokio::test(start_paused = true)]
    async fn a_gcra_give_back_refunds_only_what_its_reservation_still_holds() {
        for key in [RateKey::principal("k"), ip("192.0.2.8")] {
            let store = MemoryStore::new();
            let params = Params::new(Algorithm::Gcra, Quota::per_second(10));
            let with = |cost| CheckItem {
                cost,
                ..item(&key, params)
            };
            let give_back = |d: &RuleDecision, delta| settlement(&key, params, d, delta);
            let a = store.check(&[with(6)]).await.unwrap().rules[0];
            assert!(a.debited, "{key}");
            tokio::time::advance(std::time::Duration::from_millis(500)).await;
            let b = store.check(&[with(5)]).await.unwrap().rules[0];
            assert!(b.debited, "{key}");
            store.settle(&[give_back(&a, -6)]).await.unwrap();
            let left = store.peek(&with(0)).await.unwrap().remaining;
            assert_eq!(
                left, 5,
                "{key}: a give-back refunded units a later request holds"
            );
            assert!(!store.check(&[with(6)]).await.unwrap().admitted, "{key}");
            store.settle(&[give_back(&b, -5)]).await.unwrap();
            assert_eq!(store.peek(&with(0)).await.unwrap().remaining, 10, "{key}");
        }
    }

    /// A give-back that another give-back has moved down the bucket refunds no more than
    /// what of it is still outstanding there. At 10 units a second, X and A take 5 each at
    /// 0, X gives its 5 back at once (A's units now drain first), B takes 5 at 0.49 s, and
    /// A gives its 5 back: only 0.01 s of A is left, so the bucket keeps B's 5 (counting
    /// A's end from its reservation alone refunded 4 of B's units).
    #[test]
    fn a_gcra_give_back_moved_down_by_another_refunds_only_its_outstanding_part() {
        for key in [RateKey::principal("k"), ip("192.0.2.8")] {
            let store = MemoryStore::new();
            let params = Params::new(Algorithm::Gcra, Quota::per_second(10));
            let take = |cost, now| {
                let d = store.check_one_at(
                    &CheckItem {
                        cost,
                        ..item(&key, params)
                    },
                    now,
                );
                assert!(d.debited, "{key}");
                d
            };
            let give_back = |d: &RuleDecision, delta, now| {
                let s = settlement(&key, params, d, delta);
                store.settle_at(&[s], now);
            };
            let left = |now| store.peek_at(&item(&key, params), now).remaining;
            let (x, a) = (take(5, 0), take(5, 0));
            give_back(&x, -5, 0);
            assert_eq!(left(0), 5, "{key}");
            let b = take(5, 490_000);
            give_back(&a, -5, 490_000);
            assert_eq!(left(490_000), 5, "{key}: A's give-back refunded B's units");
            // B's own give-back refunds all of it: nothing else is left
            give_back(&b, -5, 490_000);
            assert_eq!(left(490_000), 10, "{key}: B's give-back");
        }
    }

    /// What one rule's key must still hold, reservation by reservation: the units admitted
    /// and not given back that have not drained yet. A GCRA bucket is a queue of cells (one
    /// per reservation, one per charge) draining from the bottom one µs a µs: a give-back
    /// takes back at most the part of its own cell still above now, and the cells above it
    /// move down. A window keeps every unit counted in it until the window is dropped.
    #[derive(Debug, Default)]
    struct Held {
        /// GCRA: (reservation, µs) cells, bottom first (`None`: a charge).
        cells: Vec<(Option<usize>, u64)>,
        /// GCRA: where the last cell ends (below now when the bucket is full).
        top: u64,
        /// Windows: units counted per window start.
        windows: Vec<(u64, u64)>,
    }

    impl Held {
        fn step(params: &Params, units: u64) -> u64 {
            let num = u128::from(units) * u128::from(params.window);
            u64::try_from(num.div_ceil(u128::from(params.limit))).unwrap()
        }

        fn state(&self, params: &Params, now: u64) -> State {
            let units = |start| {
                self.windows
                    .iter()
                    .filter(|(s, _)| *s == start)
                    .map(|(_, u)| u)
                    .sum()
            };
            let aligned = now - now % params.window;
            match params.algorithm {
                Algorithm::Gcra => State {
                    start: self.top,
                    ..State::default()
                },
                Algorithm::FixedWindow => State {
                    start: aligned,
                    prev: 0,
                    count: units(aligned),
                },
                Algorithm::SlidingWindow => State {
                    start: aligned,
                    prev: aligned.checked_sub(params.window).map_or(0, units),
                    count: units(aligned),
                },
            }
        }

        fn admit(&mut self, params: &Params, id: usize, window_start: u64, now: u64, units: u64) {
            if params.algorithm != Algorithm::Gcra {
                self.windows.push((window_start, units));
                return;
            }
            if self.top <= now {
                self.cells.clear();
                self.top = now;
            }
            self.top += Self::step(params, units);
            self.cells.push((Some(id), Self::step(params, units)));
        }

        fn settle(&mut self, params: &Params, id: usize, window_start: u64, now: u64, delta: i64) {
            let units = delta.unsigned_abs();
            if params.algorithm != Algorithm::Gcra {
                if delta >= 0 {
                    self.windows.push((window_start, units));
                    return;
                }
                let mut left = units;
                for (_, u) in self.windows.iter_mut().filter(|(s, _)| *s == window_start) {
                    let take = left.min(*u);
                    *u -= take;
                    left -= take;
                }
                return;
            }
            let step = Self::step(params, units);
            if delta >= 0 {
                self.cells.push((None, step));
                self.top += step;
                return;
            }
            let Some(k) = self.cells.iter().position(|(r, _)| *r == Some(id)) else {
                return;
            };
            let end = self.top - self.cells[k + 1..].iter().map(|(_, l)| l).sum::<u64>();
            let back = step.min(self.cells[k].1).min(end.saturating_sub(now));
            self.cells[k].1 -= back;
            self.top -= back;
        }
    }

    /// Random decisions, give-backs (each reservation settled at most once, by at most what
    /// it reserved), charges and resets, at times spread over the window, for every
    /// algorithm and for IP keys (small slots) and others: every admission fits beside what
    /// the reservations admitted and not given back still hold, and the store never leaves
    /// more units (GCRA: never refills sooner) than they do.
    #[test]
    fn give_backs_never_refund_units_other_requests_hold() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let quotas = [
            Quota::per_second(10),
            Quota::per_minute(7).with_burst(12),
            Quota::new(3, std::time::Duration::from_micros(700)),
        ];
        let mut partly_drained = 0;
        for quota in quotas {
            for params in [
                Params::new(Algorithm::Gcra, quota),
                Params::new(Algorithm::FixedWindow, quota),
                Params::new(Algorithm::SlidingWindow, quota),
                Params::new(Algorithm::SlidingWindow, quota).strict(true),
            ] {
                for key in [RateKey::principal("k"), ip("192.0.2.8")] {
                    let store = MemoryStore::new();
                    let mut held = Held::default();
                    // (decision, units, settled) per admitted request; a reset ends them
                    let mut open: Vec<(RuleDecision, u64, bool)> = Vec::new();
                    let mut now = 1 << 30;
                    for step in 0..4_000 {
                        match next(10) {
                            0..=5 => {
                                now += params.window * next(24) / 16 * next(2);
                                let cost = next(params.capacity().min(6) + 1);
                                let it = CheckItem {
                                    cost,
                                    ..item(&key, params)
                                };
                                let d = store.check_one_at(&it, now);
                                if d.debited {
                                    let fits = algorithm::decide(
                                        &params,
                                        &held.state(&params, now),
                                        now,
                                        cost,
                                    );
                                    assert!(
                                        fits.verdict.is_allowed(),
                                        "{params:?} {key} step {step}: {cost} beside {held:?}"
                                    );
                                    held.admit(&params, open.len(), d.window_start, now, cost);
                                    open.push((d, cost, false));
                                }
                            }
                            6..=8 => {
                                let ids: Vec<usize> =
                                    (0..open.len()).filter(|&r| !open[r].2).collect();
                                if ids.is_empty() {
                                    continue;
                                }
                                let id = ids[usize::try_from(next(ids.len() as u64)).unwrap()];
                                let (d, units, _) = open[id];
                                open[id].2 = true;
                                let delta = i64::try_from(next(units + 4)).unwrap()
                                    - i64::try_from(units).unwrap();
                                let before = held.top;
                                held.settle(&params, id, d.window_start, now, delta);
                                if delta < 0
                                    && params.algorithm == Algorithm::Gcra
                                    && before - held.top < Held::step(&params, units)
                                    && held.top > now
                                {
                                    partly_drained += 1;
                                }
                                let s = settlement(&key, params, &d, delta);
                                store.settle_at(&[s], now);
                            }
                            _ => {
                                if next(4) == 0 {
                                    store.reset_now(0, &key);
                                    held = Held::default();
                                    open.iter_mut().for_each(|r| r.2 = true);
                                }
                            }
                        }
                        let peek = store.peek_at(&item(&key, params), now);
                        let model = algorithm::decide(&params, &held.state(&params, now), now, 0);
                        assert!(
                            peek.remaining <= model.remaining,
                            "{params:?} {key} step {step}: {} left beside {held:?}",
                            peek.remaining
                        );
                        if params.algorithm == Algorithm::Gcra {
                            assert!(
                                peek.reset_micros >= model.reset,
                                "{params:?} {key} step {step}: full in {} µs beside {held:?}",
                                peek.reset_micros
                            );
                        }
                    }
                }
            }
        }
        // the case the bound is for: a give-back of a reservation partly drained, with
        // later requests holding the rest of the bucket
        assert!(partly_drained > 100, "{partly_drained}");
    }
}
