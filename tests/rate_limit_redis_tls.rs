//! The Redis store over TLS (`rediss://`) against real servers that serve TLS with a test
//! CA made by `openssl`: a single server and a three-master Cluster decide as they do over
//! TCP; a certificate that does not verify is a clear error, never a panic.
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use palisade::rate_limit::algorithm::Params;
use palisade::rate_limit::store::{CheckItem, Decision};
use palisade::rate_limit::{
    Algorithm, Quota, RateKey, RedisConfigError, RedisFailMode, RedisStore, RedisStoreConfig, Store,
};
use support::{RedisCluster, RedisServer, unrelated_ca_pem};

fn item<'a>(key: &'a RateKey, params: Params, cost: u64) -> CheckItem<'a> {
    CheckItem {
        rule_index: 0,
        rule: "chat",
        key,
        params,
        cost,
        shadow: false,
    }
}

fn prefix(tag: &str) -> String {
    format!("t{}:{tag}", rand::random::<u32>())
}

/// The same sequence of costs at the same instants, through a `rediss://` store and a
/// `redis://` store on one server (each under its own prefix), answers the same decisions,
/// remaining counts and retry-after values, for every algorithm (the blocked-key cache is
/// off, so every answer is the script's).
#[tokio::test]
async fn decisions_over_tls_equal_decisions_over_tcp() {
    let server = RedisServer::start_tls().await.expect("redis-server");
    let tls = RedisStore::builder()
        .url(server.tls_url())
        .tls_ca_pem(server.certs().ca_pem())
        .prefix(prefix("tls"))
        .blocked_cache(0)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let tcp = RedisStore::builder()
        .url(server.url())
        .prefix(prefix("tcp"))
        .blocked_cache(0)
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let key = RateKey::principal("user-1");
    let start: u64 = 1_800_000_000_000_000;
    for algorithm in [
        Algorithm::SlidingWindow,
        Algorithm::FixedWindow,
        Algorithm::Gcra,
    ] {
        let params = Params::new(algorithm, Quota::new(10, Duration::from_secs(1)));
        let mut admitted = 0;
        for step in 0..40u64 {
            let now = start + step * 97_000;
            let cost = 1 + step % 3;
            let over_tls: Decision = tls
                .check_at(&[item(&key, params, cost)], now)
                .await
                .expect("a decision over TLS");
            let over_tcp = tcp
                .check_at(&[item(&key, params, cost)], now)
                .await
                .expect("a decision over TCP");
            assert_eq!(over_tls, over_tcp, "{algorithm:?} step {step}");
            admitted += usize::from(over_tls.admitted);
        }
        assert!(
            (5..40).contains(&admitted),
            "{algorithm:?}: the sequence should both admit and refuse ({admitted} admitted)"
        );
        tls.reset(0, "chat", &key).await.unwrap();
        tcp.reset(0, "chat", &key).await.unwrap();
    }
    assert!(tls.health().healthy);
    assert_eq!(tls.health().failures, 0);
}

/// A Cluster whose nodes serve TLS, reached from `rediss://` seed URLs with the test CA,
/// admits exactly the limit under concurrency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_admits_exactly_the_limit() {
    let cluster = RedisCluster::start_tls().await.expect("redis-server");
    let store = RedisStore::builder()
        .cluster(cluster.tls_urls())
        .tls_ca_pem(cluster.certs().ca_pem())
        .prefix(prefix("cluster-tls"))
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect("a Cluster store over TLS");
    let mut tasks = Vec::new();
    for i in 0..300 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            // three keys, so the decisions spread over the nodes
            let key = RateKey::principal(format!("user-{}", i % 3));
            let params = Params::new(
                Algorithm::SlidingWindow,
                Quota::new(40, Duration::from_secs(3600)),
            );
            store
                .check(&[item(&key, params, 1)])
                .await
                .expect("a decision over TLS")
                .admitted
        }));
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += usize::from(task.await.unwrap());
    }
    assert_eq!(admitted, 3 * 40);
}

/// A server whose certificate the configured CA did not sign: the decision fails (fail
/// closed: an error naming the certificate problem), health says why, nothing panics; a
/// Cluster refuses to build with an error that says so.
#[tokio::test]
async fn a_wrong_ca_fails_with_a_clear_error_never_a_panic() {
    let server = RedisServer::start_tls().await.expect("redis-server");
    let store = RedisStore::builder()
        .url(server.tls_url())
        .tls_ca_pem(unrelated_ca_pem())
        .timeout(Duration::from_secs(2))
        .on_failure(RedisFailMode::Closed)
        .build()
        .await
        .expect("a single server connects lazily");
    let key = RateKey::principal("user-1");
    let params = Params::new(
        Algorithm::FixedWindow,
        Quota::new(10, Duration::from_secs(60)),
    );
    let err = store
        .check(&[item(&key, params, 1)])
        .await
        .expect_err("a certificate from another CA must not verify");
    let message = err.to_string().to_ascii_lowercase();
    assert!(message.contains("certificate"), "{err}");
    let health = store.health();
    assert!(!health.healthy);
    assert!(
        health
            .last_error
            .as_deref()
            .is_some_and(|e| e.to_ascii_lowercase().contains("certificate")),
        "{health:?}"
    );
    // the system's roots do not know the test CA either
    let system_roots = RedisStore::builder()
        .url(server.tls_url())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let err = system_roots
        .check(&[item(&key, params, 1)])
        .await
        .expect_err("a test CA is in no system store");
    assert!(
        err.to_string().to_ascii_lowercase().contains("certificate"),
        "{err}"
    );
    // a plain client on the TLS port gets an error, not a hang
    let plain = RedisStore::builder()
        .url(server.tls_url().replacen("rediss://", "redis://", 1))
        .timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    assert!(plain.check(&[item(&key, params, 1)]).await.is_err());

    let cluster = RedisCluster::start_tls().await.expect("redis-server");
    let err = RedisStore::builder()
        .cluster(cluster.tls_urls())
        .tls_ca_pem(unrelated_ca_pem())
        .timeout(Duration::from_secs(2))
        .build()
        .await
        .expect_err("no Cluster node verifies");
    assert!(matches!(err, RedisConfigError::Connect { .. }), "{err}");
}

/// A CA that is not PEM, a CA for `redis://` URLs, and a CA file that cannot be read are
/// typed configuration errors.
#[tokio::test]
async fn tls_settings_are_checked_when_the_store_is_built() {
    let err = RedisStore::builder()
        .url("rediss://127.0.0.1:1/")
        .tls_ca_pem("not a certificate")
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RedisConfigError::InvalidTlsCa { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("PEM"), "{err}");

    let pem = unrelated_ca_pem();
    let err = RedisStore::builder()
        .url("redis://127.0.0.1:1/")
        .tls_ca_pem(pem.clone())
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, RedisConfigError::TlsCaWithoutTls), "{err}");
    let err = RedisStore::builder()
        .cluster(["rediss://127.0.0.1:1/", "redis://127.0.0.1:2/"])
        .tls_ca_pem(pem.clone())
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, RedisConfigError::TlsCaWithoutTls), "{err}");

    let mut env = palisade::config::Env::from_pairs([
        ("PALISADE_RATE_LIMIT_REDIS_URL", "rediss://127.0.0.1:1/"),
        (
            "PALISADE_RATE_LIMIT_REDIS_TLS_CA_FILE",
            "/nonexistent/palisade/ca.pem",
        ),
    ]);
    let config = RedisStoreConfig::from_env(&mut env);
    env.finish().unwrap();
    let err = RedisStore::from_config(config).await.unwrap_err();
    assert!(
        matches!(err, RedisConfigError::InvalidTlsCa { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("/nonexistent/palisade/ca.pem"),
        "{err}"
    );

    // a good CA for rediss:// builds (a single server connects lazily)
    assert!(
        RedisStore::builder()
            .url("rediss://127.0.0.1:1/")
            .tls_ca_pem(pem)
            .build()
            .await
            .is_ok()
    );
}
