//! `ip_table_1m/*`: the memory store's private IP-keyed table against hashbrown, at
//! 1,000,000 IPv4 keys, each behind the same `Mutex` as a shard holds it.
//!
//! One iteration takes the lock, finds a resident key and updates its counts, as an
//! allowed decision does. Keys are visited in a scattered order so that, as at scale, most
//! lookups miss the cache. Both tables hold the same 32-byte slot and are found by the same
//! precomputed foldhash hash (the store's hasher), so only the table differs: the store's
//! `IpTable` (open addressing, linear probing) or a `hashbrown::HashTable`, the form of
//! hashbrown the store's other table uses.
//!
//! The table is private to the store; it is compiled here from its own source file, with
//! the two crate types it names (`State`, `RateKey`) supplied below (the bench's crate root
//! re-exports them as `crate::rate_limit`), so the bench measures the code the store runs.
//! The file's unit tests are not run here (a bench has no test harness), so their helpers
//! and imports go unused.

use std::hash::{BuildHasher, Hasher as _};
use std::hint::black_box;
use std::sync::Mutex;

use criterion::Criterion;
use palisade::rate_limit::algorithm::State;

#[allow(dead_code, unused_imports)]
#[path = "../../src/rate_limit/store/memory/ip_table.rs"]
mod ip_table;

use ip_table::{SmallKey, SmallSlot};

/// What `ip_table.rs` imports from the crate, as the bench crate provides it.
pub mod rate_limit {
    /// The store's per-key state.
    pub mod algorithm {
        pub use palisade::rate_limit::algorithm::State;
    }

    /// An IP key in the packed form the store keeps (an IPv4 address: its 32 bits, not
    /// IPv6).
    pub mod key {
        /// An IPv4 peer address.
        pub struct Ipv4Key(pub u32);

        impl Ipv4Key {
            /// The key as one word and whether it is an IPv6 network.
            pub const fn packed(&self) -> (u64, bool) {
                (self.0 as u64, false)
            }
        }

        /// The key kinds the table tells apart: IP keys, and the rest.
        #[allow(dead_code)]
        pub enum RateKey {
            /// A peer address.
            Ip(Ipv4Key),
            /// Any other key (never in the table).
            Other,
        }
    }
}

use rate_limit::key::{Ipv4Key, RateKey};

/// Resident keys.
const KEYS: u32 = 1_000_000;

type StoreHasher = foldhash::fast::RandomState;

fn hash(hasher: &StoreHasher, key: SmallKey) -> u64 {
    let mut h = hasher.build_hasher();
    h.write_u32(key.rule());
    h.write_u64(key.ip);
    h.finish()
}

fn key(i: u32) -> SmallKey {
    // 10.0.0.0/8 and up: distinct addresses, spread over the address space.
    let addr = 0x0a00_0000u32.wrapping_add(i.wrapping_mul(2_654_435_761));
    SmallKey::of(0, &RateKey::Ip(Ipv4Key(addr))).expect("an IP key of rule 0")
}

fn state(i: u64) -> State {
    State {
        start: i,
        prev: 0,
        count: 1,
    }
}

pub fn ip_table_1m(c: &mut Criterion) {
    let hasher = StoreHasher::default();
    let keys: Vec<(u64, SmallKey)> = (0..KEYS)
        .map(|i| {
            let k = key(i);
            (hash(&hasher, k), k)
        })
        .collect();
    let rehash = |k: SmallKey| hash(&hasher, k);

    let table = Mutex::new(ip_table::IpTable::default());
    let map = Mutex::new(hashbrown::HashTable::<(u64, SmallSlot)>::new());
    {
        let (mut table, mut map) = (table.lock().unwrap(), map.lock().unwrap());
        for (i, &(h, k)) in keys.iter().enumerate() {
            let slot = SmallSlot::new(k, &state(i as u64), u64::MAX).unwrap();
            table.insert(h, slot, rehash);
            map.insert_unique(h, (h, slot), |(h, _)| *h);
        }
        assert_eq!((table.len(), map.len()), (KEYS as usize, KEYS as usize));
    }
    // A scattered walk over every key (a stride prime to the key count).
    let at = |i: u64| keys[((i * 7_919) % u64::from(KEYS)) as usize];

    let mut group = c.benchmark_group("ip_table_1m");
    group.bench_function("ip_table", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let (h, k) = at(i);
            let mut table = table.lock().unwrap();
            let slot = table.find_mut(h, k).expect("resident");
            let next = State {
                count: slot.state().count + 1,
                ..slot.state()
            };
            black_box(slot.set(&next, u64::MAX));
        })
    });
    group.bench_function("hashbrown", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            let (h, k) = at(i);
            let mut map = map.lock().unwrap();
            let (_, slot) = map.find_mut(h, |(_, s)| s.key() == k).expect("resident");
            let next = State {
                count: slot.state().count + 1,
                ..slot.state()
            };
            black_box(slot.set(&next, u64::MAX));
        })
    });
    group.finish();
}
