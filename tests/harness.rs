//! The test harness really starts Redis and a Redis Cluster, and they really answer.

mod support;

use redis::AsyncCommands;
use support::{RedisCluster, RedisServer};

#[tokio::test]
async fn spawned_redis_answers_and_is_private() {
    let Some(server) = RedisServer::start().await else {
        return;
    };
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.set("palisade:harness", "hello").await.unwrap();
    let back: String = conn.get("palisade:harness").await.unwrap();
    assert_eq!(back, "hello");
    // No persistence was configured.
    let save: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("save")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(save, ["save", ""]);

    // A second server is a separate world.
    let other = RedisServer::start().await.unwrap();
    assert_ne!(other.addr(), server.addr());
    let mut conn2 = redis::Client::open(other.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let missing: Option<String> = conn2.get("palisade:harness").await.unwrap();
    assert_eq!(missing, None);

    // Dropping the handle stops the server.
    let addr = server.addr();
    drop(server);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn spawned_cluster_shares_keys_across_nodes() {
    let Some(cluster) = RedisCluster::start().await else {
        return;
    };
    assert_eq!(cluster.addrs().len(), 3);

    // Through the cluster client, seeded with the first node only.
    let client = redis::cluster::ClusterClient::new(vec![cluster.urls()[0].clone()]).unwrap();
    let mut conn = client.get_async_connection().await.unwrap();
    for i in 0..30 {
        let _: () = conn.set(format!("k{i}"), i).await.unwrap();
    }

    // Keys landed on more than one master.
    let mut owners = std::collections::BTreeSet::new();
    for i in 0..30 {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("k{i}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        owners.insert(slot / 5462);
    }
    assert!(
        owners.len() > 1,
        "keys all hashed to one third of the slots"
    );

    // A key set through one node is read back through another: a client seeded with the
    // last node only follows the cluster's redirections to wherever the key lives.
    let other = redis::cluster::ClusterClient::new(vec![cluster.urls()[2].clone()]).unwrap();
    let mut conn2 = other.get_async_connection().await.unwrap();
    for i in 0..30 {
        let v: i64 = conn2.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, i);
    }

    // And a plain connection to a node that does not own a key is told where it lives.
    let slot_owner_of_k0: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("k0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut moved = 0;
    for url in cluster.urls() {
        let mut plain = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let r: redis::RedisResult<Option<i64>> = plain.get("k0").await;
        match r {
            Ok(v) => assert_eq!(v, Some(0)),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.to_ascii_uppercase().contains("MOVED"),
                    "{text} (slot {slot_owner_of_k0})"
                );
                // ...to one of the cluster's own nodes.
                assert!(
                    cluster
                        .addrs()
                        .iter()
                        .any(|a| text.contains(&a.to_string())),
                    "{text}"
                );
                moved += 1;
            }
        }
    }
    assert_eq!(moved, 2, "exactly one of three masters owns k0");
}
