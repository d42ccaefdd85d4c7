//! The memory store's table for IP keys: 32-byte slots in a `hashbrown::HashTable`, found
//! by the hash the store computed once for the decision.
//!
//! The table keeps at most 7/8 of its slots full, with one control byte per slot beside
//! the slots: a lookup reads a group of control bytes, then the slot. A removed slot is
//! reused by a later insert, so a table that churns through keys stays within its size.

use crate::rate_limit::algorithm::State;
use crate::rate_limit::key::RateKey;

/// A small slot's expiry unit in µs (2^20, about a second): the expiry only decides when
/// a key may be dropped, so keeping a key up to a second longer loses nothing.
pub(super) const EXPIRY_UNIT: u64 = 1 << 20;

/// A resident IP key in half a cache line: the key as one word (see `IpKey::packed`), the
/// counts in 32 bits and the expiry in units of [`EXPIRY_UNIT`].
#[derive(Clone, Copy)]
#[repr(align(32))]
pub(super) struct SmallSlot {
    ip: u64,
    start: u64,
    /// The rule index, with [`SmallKey::V6`] set for an IPv6 network.
    tag: u32,
    prev: u32,
    count: u32,
    /// `expires_at` in [`EXPIRY_UNIT`]s, rounded up (`u32::MAX`: never).
    expires: u32,
}

/// The largest tag, which no key has (see [`SmallKey::of`]).
const EMPTY: u32 = u32::MAX;

impl SmallSlot {
    /// A slot for `key` holding `state`, or `None` when the counts do not fit in 32 bits.
    pub(super) fn new(key: SmallKey, state: &State, expires_at: u64) -> Option<Self> {
        let mut slot = Self {
            ip: key.ip,
            start: 0,
            tag: key.tag,
            prev: 0,
            count: 0,
            expires: 0,
        };
        slot.set(state, expires_at).then_some(slot)
    }

    #[inline]
    fn is(&self, key: SmallKey) -> bool {
        self.tag == key.tag && self.ip == key.ip
    }

    pub(super) fn key(&self) -> SmallKey {
        SmallKey {
            tag: self.tag,
            ip: self.ip,
        }
    }

    #[inline]
    pub(super) fn state(&self) -> State {
        State {
            start: self.start,
            prev: u64::from(self.prev),
            count: u64::from(self.count),
        }
    }

    pub(super) fn expires_at(&self) -> u64 {
        match self.expires {
            u32::MAX => u64::MAX,
            units => u64::from(units) * EXPIRY_UNIT,
        }
    }

    /// Stores `state`; false (and nothing stored) when its counts do not fit in 32 bits.
    #[inline]
    pub(super) fn set(&mut self, state: &State, expires_at: u64) -> bool {
        let (Ok(prev), Ok(count)) = (u32::try_from(state.prev), u32::try_from(state.count)) else {
            return false;
        };
        self.start = state.start;
        self.prev = prev;
        self.count = count;
        self.expires = u32::try_from(expires_at.div_ceil(EXPIRY_UNIT)).unwrap_or(u32::MAX);
        true
    }
}

/// The small table's form of a rule index and an IP key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SmallKey {
    tag: u32,
    pub(super) ip: u64,
}

impl SmallKey {
    /// The tag bit of an IPv6 network.
    pub(super) const V6: u32 = 1 << 31;

    /// The small form of a rule's IP key. Rule indexes from `V6 − 1` up have none (the
    /// largest tag would be [`EMPTY`]); their keys live in the wide table.
    #[inline]
    pub(super) fn of(rule: u32, key: &RateKey) -> Option<Self> {
        match key {
            RateKey::Ip(ip) if rule < EMPTY & !Self::V6 => {
                let (word, v6) = ip.packed();
                Some(Self {
                    tag: rule | if v6 { Self::V6 } else { 0 },
                    ip: word,
                })
            }
            _ => None,
        }
    }

    pub(super) fn rule(self) -> u32 {
        self.tag & !Self::V6
    }
}

/// IP keys in a `hashbrown::HashTable`, found by the store's hash of their rule and key.
/// The hash is not stored: growing the table takes the store's hash function to place the
/// slots again.
#[derive(Default)]
pub(super) struct IpTable {
    slots: hashbrown::HashTable<SmallSlot>,
}

impl IpTable {
    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    pub(super) fn find(&self, hash: u64, key: SmallKey) -> Option<&SmallSlot> {
        self.slots.find(hash, |s| s.is(key))
    }

    #[inline]
    pub(super) fn find_mut(&mut self, hash: u64, key: SmallKey) -> Option<&mut SmallSlot> {
        self.slots.find_mut(hash, |s| s.is(key))
    }

    /// Adds a slot whose key is not resident.
    pub(super) fn insert(&mut self, hash: u64, slot: SmallSlot, rehash: impl Fn(SmallKey) -> u64) {
        self.slots.insert_unique(hash, slot, |s| rehash(s.key()));
    }

    /// Removes `key`'s slot, if resident, and says whether it was.
    pub(super) fn remove(&mut self, hash: u64, key: SmallKey) -> bool {
        match self.slots.find_entry(hash, |s| s.is(key)) {
            Ok(entry) => {
                entry.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the slots for which `keep` is true, in one O(n) pass.
    pub(super) fn retain(&mut self, mut keep: impl FnMut(&SmallSlot) -> bool) {
        self.slots.retain(|s| keep(s));
    }

    /// The resident slots, in table order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &SmallSlot> {
        self.slots.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(i: u64) -> SmallKey {
        SmallKey { tag: 0, ip: i }
    }

    fn state(n: u64) -> State {
        State {
            start: n,
            prev: 0,
            count: n % 7,
        }
    }

    /// A deliberately poor hash: every key's home is one of the last five slots, so runs
    /// are long and wrap around the end of the array.
    fn clustered(k: SmallKey) -> u64 {
        u64::MAX - k.ip % 5
    }

    #[test]
    fn no_key_has_the_empty_tag() {
        let v6 = RateKey::ip("2001:db8::1".parse().unwrap());
        assert!(SmallKey::of(SmallKey::V6 - 2, &v6).is_some_and(|k| k.tag != EMPTY));
        assert!(SmallKey::of(SmallKey::V6 - 1, &v6).is_none());
    }

    proptest! {
        /// Inserts, removals and sweeps in any order agree with a `HashMap`, under a hash
        /// that piles keys onto a few homes (so removals shift long, wrapping runs).
        #[test]
        fn the_table_agrees_with_a_map(ops in proptest::collection::vec((0u8..4, 0u64..60), 1..400)) {
            let mut table = IpTable::default();
            let mut model: HashMap<u64, State> = HashMap::new();
            for (op, k) in ops {
                let sk = key(k);
                match op {
                    0 | 1 => {
                        if let Some(slot) = table.find_mut(clustered(sk), sk) {
                            prop_assert!(slot.set(&state(k + 1), 0));
                            model.insert(k, state(k + 1));
                        } else {
                            let slot = SmallSlot::new(sk, &state(k), 0).unwrap();
                            table.insert(clustered(sk), slot, clustered);
                            model.insert(k, state(k));
                        }
                    }
                    2 => {
                        let removed = table.remove(clustered(sk), sk);
                        prop_assert_eq!(removed, model.remove(&k).is_some());
                    }
                    _ => {
                        table.retain(|s| s.key().ip % 3 != k % 3);
                        model.retain(|ip, _| ip % 3 != k % 3);
                    }
                }
                prop_assert_eq!(table.len(), model.len());
                prop_assert_eq!(table.iter().count(), model.len());
                for probe in 0..60 {
                    let got = table.find(clustered(key(probe)), key(probe)).map(SmallSlot::state);
                    prop_assert_eq!(got, model.get(&probe).copied(), "key {}", probe);
                }
            }
        }
    }
}
