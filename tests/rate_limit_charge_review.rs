//! GCRA charges (settlements of more units than reserved) on drained buckets and on keys
//! the store no longer holds: the memory store's bound on its keys holds, window
//! algorithms' settlements are unchanged, and give-backs around such a charge refund only
//! what their reservation still holds. Around an admin reset, a charge from before it
//! does not count while the store keeps the reset key (other keys filling the store push
//! it out only after them; past the reset retention it is forgotten), and a charge from
//! after it always does, whether or not the store has dropped the reset key meanwhile.

#[path = "support/rate_items.rs"]
mod rate_items;
mod support;

use palisade::rate_limit::store::RuleDecision;
use rate_items::{item, settlement};

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::{Algorithm, MemoryStore, Quota, RateKey};

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

/// A charge from a reservation made before an admin reset does not count after it, even
/// when a full store has pushed other keys out meanwhile: the reset key keeps its
/// generation (and is pushed out only after every other key). The key used to be pushed
/// out first (its state from before the reset was the nearest to expiry), and the charge
/// then counted on it as on a fresh key: 0 left instead of 5.
#[test]
fn a_charge_from_before_a_reset_does_not_count_once_other_keys_fill_the_store() {
    // 5 a second: a unit is 200 ms, the bucket holds 5
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    for key in [
        RateKey::principal("k"),
        RateKey::ip("192.0.2.7".parse().unwrap()),
    ] {
        let store = store(4);
        let before = store.check_at(&[item(&key, params, 1)], 0).rules[0];
        assert!(before.debited);
        store.reset_now(0, &key);
        // at 0.1 s four newcomers fill the store: one key must go
        let now = 100_000;
        for i in 0..4 {
            let other = RateKey::principal(format!("other-{i}"));
            assert!(store.check_at(&[item(&other, params, 1)], now).admitted);
        }
        assert_eq!(store.len(), 4);
        assert_eq!(store.evictions(), 1);
        // the request from before the reset used 5 more units than it reserved
        store.settle_at(&[settlement(&key, params, &before, 5)], now);
        assert_eq!(
            remaining(&store, &key, params, now),
            5,
            "{key}: a charge from before the reset counted after it"
        );
    }
}

/// A charge from a reservation made after an admin reset counts, even when the reset key
/// went idle, was dropped to make room and a new request started it again: the charge
/// was dropped as from another generation (4 left instead of 1).
#[test]
fn a_charge_from_after_a_reset_counts_once_the_key_went_idle_and_started_again() {
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    for key in [
        RateKey::principal("k"),
        RateKey::ip("192.0.2.7".parse().unwrap()),
    ] {
        let store = store(4);
        assert!(store.check_at(&[item(&key, params, 1)], 0).admitted);
        store.reset_now(0, &key);
        let after = store.check_at(&[item(&key, params, 1)], 0).rules[0];
        assert!(after.debited && after.generation == 1, "{after:?}");
        // at 1.1 s the key is idle (its bucket full since 0.2 s); four newcomers fill the
        // store, and a new request for the key comes
        let now = 1_100_000;
        for i in 0..4 {
            let other = RateKey::principal(format!("other-{i}"));
            assert!(store.check_at(&[item(&other, params, 1)], now).admitted);
        }
        assert!(store.check_at(&[item(&key, params, 1)], now).admitted);
        // the request from after the reset used 3 more units than it reserved
        store.settle_at(&[settlement(&key, params, &after, 3)], now);
        assert_eq!(
            remaining(&store, &key, params, now),
            1,
            "{key}: a charge from after the reset was dropped"
        );
    }
}

/// Past the store's reset retention a reset key is forgotten like any other idle key, and
/// a charge from after the reset still counts on the key started again at generation 0
/// (its generation is newer than the key's), while a charge from before the reset counts
/// too (the key no longer knows of it: the one case the retention bounds).
#[test]
fn past_the_reset_retention_a_charge_from_after_the_reset_still_counts() {
    let params = Params::new(Algorithm::Gcra, Quota::per_second(5));
    let sec = 1_000_000;
    for key in [
        RateKey::principal("k"),
        RateKey::ip("192.0.2.7".parse().unwrap()),
    ] {
        let store = MemoryStore::builder()
            .max_entries(4)
            .shards(1)
            .reset_retention(std::time::Duration::from_secs(2))
            .build()
            .unwrap();
        let before = store.check_at(&[item(&key, params, 1)], 0).rules[0];
        store.reset_at(0, &key, 0);
        let after = store.check_at(&[item(&key, params, 1)], 0).rules[0];
        assert_eq!((before.generation, after.generation), (0, 1));
        // at 1.9 s the reset key is idle but kept: newcomers push one of them out instead
        for i in 0..4 {
            let other = RateKey::principal(format!("early-{i}"));
            assert!(
                store
                    .check_at(&[item(&other, params, 1)], 1_900_000)
                    .admitted
            );
        }
        assert_eq!(store.peek_now(&item(&key, params, 0)).generation, 1);
        // at 2.1 s it is past the retention: newcomers drop it, and it starts again
        for i in 0..4 {
            let other = RateKey::principal(format!("late-{i}"));
            assert!(
                store
                    .check_at(&[item(&other, params, 1)], 2_100_000)
                    .admitted
            );
        }
        let again = store
            .check_at(&[item(&key, params, 1)], 2 * sec + 100_000)
            .rules[0];
        assert_eq!(again.generation, 0, "{key}");
        let now = 2 * sec + 100_000;
        store.settle_at(&[settlement(&key, params, &after, 2)], now);
        assert_eq!(remaining(&store, &key, params, now), 2, "{key}");
        store.settle_at(&[settlement(&key, params, &before, 1)], now);
        assert_eq!(remaining(&store, &key, params, now), 1, "{key}");
    }
}

/// The reset retention is checked when the store is built: from 1 ms to a day.
#[test]
fn a_reset_retention_out_of_range_is_refused() {
    use palisade::rate_limit::RateLimitConfigError;
    use std::time::Duration;
    for bad in [
        Duration::ZERO,
        Duration::from_micros(999),
        Duration::from_secs(24 * 60 * 60 + 1),
        Duration::MAX,
    ] {
        let err = MemoryStore::builder()
            .reset_retention(bad)
            .build()
            .unwrap_err();
        assert_eq!(err, RateLimitConfigError::InvalidResetRetention, "{bad:?}");
        assert!(err.to_string().contains("reset retention"), "{err}");
    }
    for good in [Duration::from_millis(1), Duration::from_secs(24 * 60 * 60)] {
        assert!(MemoryStore::builder().reset_retention(good).build().is_ok());
    }
}

#[cfg(feature = "redis")]
mod redis {
    use super::*;
    use palisade::rate_limit::RedisStore;
    use palisade::rate_limit::store::Store;
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

    /// Redis's answer for `cmd` on the server.
    async fn ask(server: &RedisServer, cmd: &str) -> String {
        support::command(server.addr(), cmd).await.unwrap()
    }

    /// A charge from a reservation made before an admin reset does not count after it:
    /// the reset key lives at least as long as the store's reset retention (an hour by
    /// default), where it kept only its state's expiry (seconds) and then expired, after
    /// which the charge counted on it as on a fresh key: 0 left instead of 5.
    #[tokio::test]
    async fn a_charge_from_before_a_reset_does_not_count_and_the_reset_key_outlives_its_state() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        // 5 a minute: a unit is 12 s
        let params = Params::new(Algorithm::Gcra, Quota::per_minute(5));
        let key = RateKey::principal("k");
        let redis = RedisStore::builder()
            .url(server.url())
            .prefix("before-reset")
            .blocked_cache(0)
            .build()
            .await
            .unwrap();
        let before = redis.check(&[item(&key, params, 1)]).await.unwrap().rules[0];
        assert!(before.debited);
        Store::reset(&redis, 0, "r", &key).await.unwrap();
        let name = redis.key_name("r", &key);
        let ttl = ask(&server, &format!("PTTL {name}")).await;
        let ttl: i64 = ttl.trim_start_matches(':').trim().parse().unwrap();
        assert!(ttl > 3_500_000, "the reset key expires in {ttl} ms");
        redis
            .settle(&[settlement(&key, params, &before, 5)])
            .await
            .unwrap();
        let left = redis.peek(&item(&key, params, 0)).await.unwrap().remaining;
        assert_eq!(left, 5, "a charge from before the reset counted after it");
    }

    /// A charge from a reservation made after an admin reset counts, even when the reset
    /// key has gone (deleted here) and a new request started it again at generation 0:
    /// the charge was dropped as from another generation (4 left instead of 1), as in the
    /// memory store.
    #[tokio::test]
    async fn a_charge_from_after_a_reset_counts_once_the_key_is_gone_and_started_again() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let params = Params::new(Algorithm::Gcra, Quota::per_minute(5));
        let key = RateKey::principal("k");
        let redis = RedisStore::builder()
            .url(server.url())
            .prefix("after-reset")
            .blocked_cache(0)
            .build()
            .await
            .unwrap();
        assert!(
            redis
                .check(&[item(&key, params, 1)])
                .await
                .unwrap()
                .admitted
        );
        Store::reset(&redis, 0, "r", &key).await.unwrap();
        let after = redis.check(&[item(&key, params, 1)]).await.unwrap().rules[0];
        assert!(after.debited && after.generation == 1, "{after:?}");
        let name = redis.key_name("r", &key);
        assert_eq!(ask(&server, &format!("DEL {name}")).await, ":1\r\n");
        let again = redis.check(&[item(&key, params, 1)]).await.unwrap().rules[0];
        assert!(again.debited && again.generation == 0, "{again:?}");
        redis
            .settle(&[settlement(&key, params, &after, 3)])
            .await
            .unwrap();
        let left = redis.peek(&item(&key, params, 0)).await.unwrap().remaining;
        assert_eq!(left, 1, "a charge from after the reset was dropped");
    }

    /// With explicit instants, Redis and the memory store agree around a reset whose key
    /// is then dropped (deleted in Redis, forgotten in memory): a charge from before the
    /// reset counts (the key no longer knows of it), one from after it counts too, and
    /// without the drop the charge from before the reset is dropped in both.
    #[tokio::test]
    async fn around_a_reset_and_a_dropped_key_redis_settles_as_memory() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let params = Params::new(Algorithm::Gcra, Quota::per_minute(5));
        let key = RateKey::principal("k");
        let sec = 1_000_000;
        for drop in [false, true] {
            let memory = store(8);
            let redis = RedisStore::builder()
                .url(server.url())
                .prefix(format!("agree{drop}"))
                .blocked_cache(0)
                .build()
                .await
                .unwrap();
            let mut left = Vec::new();
            let mut seen = Vec::new();
            let before = memory.check_at(&[item(&key, params, 1)], 0).rules[0];
            assert_eq!(
                redis
                    .check_at(&[item(&key, params, 1)], 0)
                    .await
                    .unwrap()
                    .rules[0],
                before
            );
            memory.reset_at(0, &key, sec);
            redis.reset_at(0, "r", &key, sec).await.unwrap();
            let after = memory.check_at(&[item(&key, params, 1)], sec).rules[0];
            assert_eq!(
                redis
                    .check_at(&[item(&key, params, 1)], sec)
                    .await
                    .unwrap()
                    .rules[0],
                after
            );
            if drop {
                memory.forget(0, &key);
                let name = redis.key_name("r", &key);
                assert_eq!(ask(&server, &format!("DEL {name}")).await, ":1\r\n");
            }
            let now = 2 * sec;
            for (d, delta) in [(&before, 1), (&after, 2)] {
                memory.settle_at(&[settlement(&key, params, d, delta)], now);
                redis
                    .settle_at(&[settlement(&key, params, d, delta)], now)
                    .await
                    .unwrap();
                let want = memory.check_at(&[item(&key, params, 0)], now).rules[0];
                let got = redis
                    .check_at(&[item(&key, params, 0)], now)
                    .await
                    .unwrap()
                    .rules[0];
                assert_eq!(got, want, "drop {drop}");
                left.push(want.remaining);
                seen.push(want.generation);
            }
            if drop {
                // the charge from before the reset counts (as a new one), then the one after
                assert_eq!((left, seen), (vec![4, 2], vec![0, 0]));
            } else {
                // the charge from before the reset is dropped; 1 unit after it, then 2 more
                assert_eq!((left, seen), (vec![4, 2], vec![1, 1]));
            }
        }
    }

    /// The Redis store's reset retention is checked when it is built: from 1 ms to a day.
    #[tokio::test]
    async fn a_redis_reset_retention_out_of_range_is_refused() {
        use palisade::rate_limit::RedisConfigError;
        for bad in [
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(24 * 60 * 60 + 1),
        ] {
            let err = RedisStore::builder()
                .url("redis://127.0.0.1:1/")
                .reset_retention(bad)
                .build()
                .await
                .unwrap_err();
            assert!(
                matches!(err, RedisConfigError::InvalidResetRetention),
                "{bad:?}: {err}"
            );
        }
    }
}
