//! The store's script calls through the shared group-commit batcher
//! ([`crate::redis_batch`]): a call made while two are in flight waits and goes with the
//! others as one script call (`decide.lua`'s mode `b`), one batcher per Cluster slot.

use std::sync::Arc;

pub(super) use crate::redis_batch::Kind;
use crate::redis_batch::{self, BatchScript};

use super::{Inner, SCRIPT, eval};

/// The batchers of the store's connection.
pub(super) type Batchers = redis_batch::Batchers<i64>;

/// A script call's answer, or why it has none.
pub(super) type Answer = redis_batch::Answer<i64>;

impl BatchScript for Inner {
    type Item = i64;

    fn batchers(&self) -> &Batchers {
        &self.batcher
    }

    fn hash(&self) -> &str {
        SCRIPT.get_hash()
    }

    fn eval(&self, cmd: &redis::Cmd) -> impl Future<Output = redis::RedisResult<Vec<i64>>> + Send {
        eval(self.conn.clone(), cmd)
    }

    fn length(item: &i64) -> Option<i64> {
        Some(*item)
    }

    fn batched(&self, calls: usize) {
        self.health.batched(calls);
    }
}

/// Runs one script call (an `EVALSHA` of the store's script) through the batcher.
pub(super) async fn submit(inner: Arc<Inner>, cmd: redis::Cmd, kind: Kind) -> Answer {
    redis_batch::submit(inner, cmd, kind).await
}
