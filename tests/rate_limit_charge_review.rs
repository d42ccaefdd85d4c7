//! GCRA charges (settlements of more units than reserved) on drained buckets and on keys
//! the store no longer holds: the memory store's bound on its keys holds, window
//! algorithms' settlements are unchanged, and give-backs around such a charge refund only
//! what their reservation still holds.

mod support;

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, RuleDecision, Settlement};
use palisade::rate_limit::{Algorithm, MemoryStore, Quota, RateKey};

fn item(key: &RateKey, params: Params, cost: u64) -> CheckItem<'_> {
    CheckItem {
        rule_index: 0,
        rule: "r",
        key,
        params,
        cost,
        shadow: false,
    }
}

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

fn store(max_entries: usize) -> MemoryStore {
    MemoryStore::builder()
        .max_entries(max_entries)
        .shards(1)
        .build()
        .unwrap()
}

/// Units left on the key at `now` (a cost-0 check).
fn remaining(store: &MemoryStore, key: &RateKey, params: Params, now: u64) -> u64 {
    store.check_at(&[item(key, params, 0)], now).rules[0].remaining
}

/// Charges on keys the store does not hold insert them as requests would: never past
/// `max_entries`, and a live key pushed out for one is counted as an eviction.
#[test]
fn charges_on_keys_not_held_keep_the_store_within_max_entries() {
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    let store = store(8);
    let keys: Vec<RateKey> = (0..40)
        .map(|i| RateKey::principal(format!("user-{i}")))
        .collect();
    let decisions: Vec<RuleDecision> = keys
        .iter()
        .map(|k| store.check_at(&[item(k, params, 1)], 0).rules[0])
        .collect();
    assert!(store.len() <= 8);
    let before = store.evictions();
    assert!(before > 0);
    // every key is still live at 0.1 s; each charge lands on a key held or not
    for (k, d) in keys.iter().zip(&decisions) {
        store.settle_at(&[settlement(k, params, d, 2)], 100_000);
        assert!(store.len() <= 8, "{} keys", store.len());
    }
    assert!(store.evictions() > before);
}

/// A settlement of a window algorithm on a key the store does not hold writes nothing.
#[test]
fn window_settlements_on_keys_not_held_write_nothing() {
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let params = Params::new(algorithm, Quota::per_second(5));
        let key = RateKey::principal("k");
        let reserving = store(8);
        let d = reserving.check_at(&[item(&key, params, 1)], 0).rules[0];
        let other = store(8);
        other.settle_at(&[settlement(&key, params, &d, 3)], 100_000);
        assert_eq!(other.len(), 0, "{algorithm:?}");
        // on the key held, the charge lands in the reservation's window
        reserving.settle_at(&[settlement(&key, params, &d, 3)], 100_000);
        assert_eq!(
            remaining(&reserving, &key, params, 100_000),
            1,
            "{algorithm:?}"
        );
    }
}

/// A charge on a drained bucket starts a new epoch: a give-back of a reservation from the
/// epoch before refunds nothing, and a give-back of a reservation made after the charge
/// refunds its own units only.
#[test]
fn give_backs_around_a_charge_on_a_drained_bucket_refund_only_their_own_units() {
    // 5 a second: a unit is 200 ms, the bucket holds 5
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    let key = RateKey::principal("k");
    let store = store(8);
    let first = store.check_at(&[item(&key, params, 1)], 0).rules[0];
    let second = store.check_at(&[item(&key, params, 2)], 0).rules[0];
    assert!(first.debited && second.debited);
    // at 1.1 s the bucket has drained; the first request used 3 more units
    let now = 1_100_000;
    assert_eq!(remaining(&store, &key, params, now), 5);
    store.settle_at(&[settlement(&key, params, &first, 3)], now);
    assert_eq!(remaining(&store, &key, params, now), 2);
    // the second request (an earlier epoch) gives back its 2 units: nothing comes back
    store.settle_at(&[settlement(&key, params, &second, -2)], now);
    assert_eq!(remaining(&store, &key, params, now), 2);
    // a request after the charge, in its epoch, gives back its own units
    let third = store.check_at(&[item(&key, params, 2)], now).rules[0];
    assert!(third.debited);
    assert_eq!(remaining(&store, &key, params, now), 0);
    store.settle_at(&[settlement(&key, params, &third, -2)], now);
    assert_eq!(remaining(&store, &key, params, now), 2);
}

/// A charge on a drained bucket and a charge on a key dropped as idle leave the same
/// state, for a key kept in either of the memory store's tables (an IP key starts in the
/// small one).
#[test]
fn a_charge_on_a_drained_key_held_or_dropped_decides_alike_afterwards() {
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    for key in [
        RateKey::principal("k"),
        RateKey::ip("192.0.2.7".parse().unwrap()),
    ] {
        let (kept, dropped) = (store(4), store(4));
        let mut reservations = Vec::new();
        for s in [&kept, &dropped] {
            reservations.push(s.check_at(&[item(&key, params, 2)], 0).rules[0]);
        }
        for i in 0..4 {
            let other = RateKey::principal(format!("other-{i}"));
            assert!(
                dropped
                    .check_at(&[item(&other, params, 1)], 1_100_000)
                    .admitted
            );
        }
        assert_eq!(dropped.evictions(), 0);
        assert_eq!(dropped.len(), 4);
        for (s, d) in [(&kept, &reservations[0]), (&dropped, &reservations[1])] {
            s.settle_at(&[settlement(&key, params, d, 4)], 1_100_000);
        }
        for now in [1_100_000, 1_300_000, 1_700_000, 2_000_000] {
            let a = kept.check_at(&[item(&key, params, 0)], now).rules[0];
            let b = dropped.check_at(&[item(&key, params, 0)], now).rules[0];
            assert_eq!(
                (a.remaining, a.reset_micros, a.window_start),
                (b.remaining, b.reset_micros, b.window_start),
                "{key} at {now}"
            );
        }
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use palisade::rate_limit::RedisStore;
    use support::RedisServer;

    /// In Redis too, a charge on a drained key lands alike whether the key is still held
    /// or has gone (expired: deleted here), and as in the memory store.
    #[tokio::test]
    async fn a_charge_on_a_drained_key_held_or_gone_lands_alike_and_as_in_memory() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        // 5 a minute: a unit is 12 s, far from any real-time expiry during the test
        let params = Params::new(Algorithm::Gcra, Quota::per_minute(5));
        let key = RateKey::principal("k");
        let memory = store(8);
        let d = memory.check_at(&[item(&key, params, 2)], 0).rules[0];
        let now = 70_000_000;
        memory.settle_at(&[settlement(&key, params, &d, 4)], now);
        let times = [now, now + 12_000_000, now + 50_000_000];
        let want: Vec<RuleDecision> = times
            .iter()
            .map(|&at| memory.check_at(&[item(&key, params, 0)], at).rules[0])
            .collect();
        let mut seen = Vec::new();
        for gone in [false, true] {
            let redis = RedisStore::builder()
                .url(server.url())
                .prefix(format!("review{gone}"))
                .blocked_cache(0)
                .build()
                .await
                .unwrap();
            let got = redis.check_at(&[item(&key, params, 2)], 0).await.unwrap();
            assert_eq!(got.rules[0], d);
            if gone {
                let name = redis.key_name("r", &key);
                let reply = support::command(server.addr(), &format!("DEL {name}"))
                    .await
                    .unwrap();
                assert_eq!(reply, ":1\r\n");
            }
            redis
                .settle_at(&[settlement(&key, params, &d, 4)], now)
                .await
                .unwrap();
            for (&at, want) in times.iter().zip(&want) {
                let peek = redis.peek_at(&item(&key, params, 0), at).await.unwrap();
                assert_eq!(
                    (peek.remaining, peek.reset_micros, peek.window_start),
                    (want.remaining, want.reset_micros, want.window_start),
                    "gone {gone} at {at}"
                );
                seen.push(peek.remaining);
            }
        }
        assert_eq!(seen, [1, 2, 5, 1, 2, 5]);
    }
}
