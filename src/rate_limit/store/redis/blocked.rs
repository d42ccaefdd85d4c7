//! The local cache of keys known to be blocked: repeated refusals without a round trip.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

use crate::rate_limit::algorithm::Params;
use crate::rate_limit::key::RateKey;

/// One blocked rule for one key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Blocked {
    /// The parameters the refusal was decided with (an override changes them, and then
    /// the entry no longer applies).
    pub params: Params,
    /// Until when no request of any cost can pass.
    pub until: Instant,
    /// Until when the entry answers without asking Redis (another instance may reset the
    /// key or give units back meanwhile); past it, only while Redis does not answer.
    pub fresh_until: Instant,
    /// When the quota is fully restored.
    pub reset_at: Instant,
    /// The window of the refusal.
    pub window_start: u64,
}

/// Entries are keyed by the rule's name, as Redis keys are: layers sharing one store
/// number their rules from 0 each, but their names differ.
type Map = hashbrown::HashMap<(Box<str>, RateKey), Blocked, foldhash::fast::RandomState>;

/// A borrowed `(rule, key)`: looks an entry up without cloning the key. Hashes as the
/// tuple does (each field in order).
#[derive(Hash)]
struct Lookup<'k>(&'k str, &'k RateKey);

impl hashbrown::Equivalent<(Box<str>, RateKey)> for Lookup<'_> {
    fn equivalent(&self, key: &(Box<str>, RateKey)) -> bool {
        *self.0 == *key.0 && *self.1 == key.1
    }
}

/// A bounded map from (rule name, key) to [`Blocked`].
pub(super) struct BlockedCache {
    capacity: usize,
    map: Mutex<Map>,
    /// Bumped by every removal, per slot of keys: a refusal decided before one is not
    /// remembered after it (the key may have been reset or given units back since).
    generations: [AtomicU64; SLOTS],
    /// Passes over every entry to make room (each costs O(capacity)).
    #[cfg(test)]
    sweeps: AtomicU64,
}

/// Slots of removal generations: a removal holds back the blocked entries of the keys in
/// its slot that were being decided, not of every key.
const SLOTS: usize = 64;

fn slot(rule: &str, key: &RateKey) -> usize {
    use std::hash::BuildHasher;
    // The remainder is below SLOTS: the cast cannot truncate.
    (foldhash::fast::FixedState::default().hash_one(Lookup(rule, key)) % SLOTS as u64) as usize
}

impl BlockedCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(Map::default()),
            generations: [const { AtomicU64::new(0) }; SLOTS],
            #[cfg(test)]
            sweeps: AtomicU64::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry for a rule and key that still blocks at `now` with these parameters: a
    /// fresh one, or with `stale_ok` (Redis did not answer) any.
    pub fn get(
        &self,
        rule: &str,
        key: &RateKey,
        params: &Params,
        now: Instant,
        stale_ok: bool,
    ) -> Option<Blocked> {
        if !self.enabled() {
            return None;
        }
        let map = self.lock();
        if map.is_empty() {
            return None;
        }
        map.get(&Lookup(rule, key))
            .filter(|b| b.until > now && (stale_ok || b.fresh_until > now) && b.params == *params)
            .copied()
    }

    /// The key's current generation, read before a decision is sent: see
    /// [`BlockedCache::insert`].
    pub fn generation(&self, rule: &str, key: &RateKey) -> u64 {
        self.generations[slot(rule, key)].load(Ordering::Acquire)
    }

    /// Remembers a blocked rule, unless an entry was removed since `generation` was read
    /// (the refusal may predate a reset or a give-back). A full cache makes room first
    /// (see [`BlockedCache::make_room`]): an insert costs O(1) amortized.
    pub fn insert(
        &self,
        rule: &str,
        key: &RateKey,
        blocked: Blocked,
        now: Instant,
        generation: u64,
    ) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        if self.generations[slot(rule, key)].load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.capacity && !map.contains_key(&Lookup(rule, key)) {
            self.make_room(&mut map, now);
        }
        map.insert((rule.into(), key.clone()), blocked);
    }

    /// Drops the expired entries; if more than 7/8 of the capacity is still held, drops the
    /// entries that stop blocking soonest down to 7/8 (a dropped key only costs a round
    /// trip when it comes back). One pass over the entries makes room for at least an
    /// eighth of the capacity, so it runs at most once per `capacity / 8` inserts.
    fn make_room(&self, map: &mut Map, now: Instant) {
        #[cfg(test)]
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        map.retain(|_, b| b.until > now);
        let target = self.capacity - self.capacity / 8 - 1;
        if map.len() <= target {
            return;
        }
        let excess = map.len() - target;
        let mut untils: Vec<Instant> = map.values().map(|b| b.until).collect();
        let (_, &mut cut, _) = untils.select_nth_unstable(excess - 1);
        let mut dropped = 0;
        map.retain(|_, b| {
            let drop = dropped < excess && b.until <= cut;
            dropped += usize::from(drop);
            !drop
        });
    }

    /// Forgets one rule's entry for one key.
    pub fn remove(&self, rule: &str, key: &RateKey) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        self.generations[slot(rule, key)].fetch_add(1, Ordering::AcqRel);
        map.remove(&Lookup(rule, key));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        let mut map = self.lock();
        for generation in &self.generations {
            generation.fetch_add(1, Ordering::AcqRel);
        }
        map.clear();
    }

    /// Entries held now (some may have expired).
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::rate_limit::{Algorithm, Quota};

    fn blocked(now: Instant, for_ms: u64) -> Blocked {
        let until = now + Duration::from_millis(for_ms);
        Blocked {
            params: Params::new(Algorithm::FixedWindow, Quota::per_minute(1)),
            until,
            fresh_until: until,
            reset_at: until,
            window_start: 0,
        }
    }

    /// Under a flood of distinct blocked keys the cache holds its cap, keeps the newest
    /// keys, and passes over all its entries only once per eighth of its capacity
    /// inserted (it used to pass over all of them on every insert once full).
    #[test]
    fn a_flood_of_distinct_blocked_keys_keeps_the_cap_with_few_sweeps() {
        let cache = BlockedCache::new(1_000);
        let now = Instant::now();
        let params = blocked(now, 0).params;
        for i in 0..100_000 {
            let key = RateKey::principal(format!("user-{i}"));
            cache.insert("chat", &key, blocked(now, 60_000 + i), now, 0);
            assert!(cache.len() <= 1_000, "{} entries", cache.len());
            assert!(cache.get("chat", &key, &params, now, false).is_some());
        }
        let sweeps = cache.sweeps.load(Ordering::Relaxed);
        assert!(sweeps <= 100_000 / 125 + 1, "{sweeps} sweeps");
    }

    /// A full cache drops the expired entries first; if none has expired, those that stop
    /// blocking soonest, down to 7/8 of its capacity.
    #[test]
    fn a_full_cache_drops_expired_entries_then_those_that_unblock_soonest() {
        let cache = BlockedCache::new(100);
        let now = Instant::now();
        let params = blocked(now, 0).params;
        let user = |i| RateKey::principal(format!("user-{i}"));
        let held = |key: &RateKey, at| cache.get("chat", key, &params, at, false).is_some();
        for i in 0..100 {
            cache.insert("chat", &user(i), blocked(now, 60_000 + i), now, 0);
        }
        assert_eq!(cache.len(), 100);
        cache.insert("chat", &user(100), blocked(now, 1), now, 0);
        assert_eq!(cache.len(), 88);
        assert!(held(&user(100), now) && held(&user(99), now) && held(&user(13), now));
        assert!(!held(&user(12), now) && !held(&user(0), now));
        // a minute and more on, the first 88 have expired: the newcomer that finds the cache
        // full drops them and nothing else
        let later = now + Duration::from_secs(61);
        let late = RateKey::principal("late");
        for i in 101..113 {
            cache.insert("chat", &user(i), blocked(later, 1), later, 0);
        }
        assert_eq!(cache.len(), 100);
        cache.insert("chat", &late, blocked(later, 1), later, 0);
        assert_eq!(cache.len(), 13);
        // another rule's name, the same key: a different entry
        assert!(held(&late, later));
        assert!(cache.get("embed", &late, &params, later, false).is_none());
    }
}
