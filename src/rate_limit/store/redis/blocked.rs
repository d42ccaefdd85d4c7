//! The local cache of keys known to be blocked: repeated refusals without a round trip.

use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

use super::super::super::algorithm::Params;
use super::super::super::key::RateKey;

/// One blocked rule for one key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Blocked {
    /// The parameters the refusal was decided with (an override changes them, and then
    /// the entry no longer applies).
    pub params: Params,
    /// Until when no request of any cost can pass.
    pub until: Instant,
    /// When the quota is fully restored.
    pub reset_at: Instant,
    /// The window of the refusal.
    pub window_start: u64,
}

type Map = hashbrown::HashMap<(u32, RateKey), Blocked, foldhash::fast::RandomState>;

/// A borrowed `(rule, key)`: looks an entry up without cloning the key. Hashes as the
/// tuple does (each field in order).
#[derive(Hash)]
struct Lookup<'k>(u32, &'k RateKey);

impl hashbrown::Equivalent<(u32, RateKey)> for Lookup<'_> {
    fn equivalent(&self, key: &(u32, RateKey)) -> bool {
        self.0 == key.0 && *self.1 == key.1
    }
}

/// A bounded map from (rule, key) to [`Blocked`].
pub(super) struct BlockedCache {
    capacity: usize,
    map: Mutex<Map>,
}

impl BlockedCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            map: Mutex::new(Map::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The entry for a rule and key that still blocks at `now` with these parameters.
    pub fn get(&self, rule: u32, key: &RateKey, params: &Params, now: Instant) -> Option<Blocked> {
        if !self.enabled() {
            return None;
        }
        let map = self.lock();
        if map.is_empty() {
            return None;
        }
        map.get(&Lookup(rule, key))
            .filter(|b| b.until > now && b.params == *params)
            .copied()
    }

    /// Remembers a blocked rule; when the cache is full, expired entries go first, and if
    /// none has expired the newcomer is not kept.
    pub fn insert(&self, rule: u32, key: &RateKey, blocked: Blocked, now: Instant) {
        if !self.enabled() {
            return;
        }
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&Lookup(rule, key)) {
            map.retain(|_, b| b.until > now);
            if map.len() >= self.capacity {
                return;
            }
        }
        map.insert((rule, key.clone()), blocked);
    }

    /// Forgets one rule's entry for one key.
    pub fn remove(&self, rule: u32, key: &RateKey) {
        if !self.enabled() {
            return;
        }
        self.lock().remove(&Lookup(rule, key));
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Entries held now (some may have expired).
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}
