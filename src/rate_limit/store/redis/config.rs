//! The Redis store's configuration, from files (serde) or the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{
    DEFAULT_BLOCKED_CACHE, DEFAULT_PREFIX, DEFAULT_TIMEOUT, HashTag, RedisClock, RedisConfigError,
    RedisFailMode, RedisStore,
};
use crate::config::{Env, env_var};

/// The environment prefix of the store's settings (`PALISADE_RATE_LIMIT_REDIS_URL`, ...).
const PREFIX: &str = "PALISADE_RATE_LIMIT";

/// Settings of a [`RedisStore`].
///
/// ```
/// use palisade::config::Env;
/// use palisade::rate_limit::{RedisFailMode, RedisStoreConfig};
///
/// let mut env = Env::from_pairs([
///     ("PALISADE_RATE_LIMIT_REDIS_URL", "redis://127.0.0.1:6379/"),
///     ("PALISADE_RATE_LIMIT_REDIS_FAIL_MODE", "local"),
///     ("PALISADE_RATE_LIMIT_REDIS_TIMEOUT", "30ms"),
/// ]);
/// let config = RedisStoreConfig::from_env(&mut env);
/// env.finish().unwrap();
/// assert_eq!(config.fail_mode, RedisFailMode::Local);
/// assert_eq!(config.timeout, std::time::Duration::from_millis(30));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisStoreConfig {
    /// One server's URL (`redis://[:password@]host:port/[db]`).
    pub url: Option<String>,
    /// Cluster seed node URLs (instead of `url`).
    pub cluster_nodes: Vec<String>,
    /// The key prefix.
    pub prefix: String,
    /// How long a decision may wait for Redis.
    #[serde(with = "crate::config::duration")]
    pub timeout: Duration,
    /// What to do when Redis fails.
    pub fail_mode: RedisFailMode,
    /// Whose clock decides windows.
    pub clock: RedisClock,
    /// Entries in the local cache of blocked keys (0 turns it off).
    pub blocked_cache: usize,
    /// One hash tag for every key (Cluster groups of different keys); none: each key's own.
    pub hash_tag: Option<String>,
    /// A PEM file of the certificate authority that `rediss://` servers are checked
    /// against, instead of the system's roots (see [`RedisStoreBuilder::tls_ca_pem`](super::RedisStoreBuilder::tls_ca_pem)).
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            fail_mode: RedisFailMode::default(),
            clock: RedisClock::default(),
            blocked_cache: DEFAULT_BLOCKED_CACHE,
            hash_tag: None,
            tls_ca_file: None,
        }
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may hold passwords: only whether they are set.
        f.debug_struct("RedisStoreConfig")
            .field("url", &self.url.as_ref().map(|_| "<set>"))
            .field("cluster_nodes", &self.cluster_nodes.len())
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("fail_mode", &self.fail_mode)
            .field("clock", &self.clock)
            .field("blocked_cache", &self.blocked_cache)
            .field("hash_tag", &self.hash_tag)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl RedisStoreConfig {
    /// Reads the settings from the environment, recording every problem in `env`:
    ///
    /// | variable | example |
    /// |---|---|
    /// | `PALISADE_RATE_LIMIT_REDIS_URL` | `redis://:password@10.0.0.5:6379/0` |
    /// | `PALISADE_RATE_LIMIT_REDIS_CLUSTER_NODES` | `redis://10.0.0.1:7000/,redis://10.0.0.2:7000/` |
    /// | `PALISADE_RATE_LIMIT_REDIS_PREFIX` | `myapp:rl` |
    /// | `PALISADE_RATE_LIMIT_REDIS_TIMEOUT` | `50ms` |
    /// | `PALISADE_RATE_LIMIT_REDIS_FAIL_MODE` | `closed`, `open` or `local` |
    /// | `PALISADE_RATE_LIMIT_REDIS_CLOCK` | `server` or `client` |
    /// | `PALISADE_RATE_LIMIT_REDIS_BLOCKED_CACHE` | `10000` |
    /// | `PALISADE_RATE_LIMIT_REDIS_HASH_TAG` | `limits` |
    /// | `PALISADE_RATE_LIMIT_REDIS_TLS_CA_FILE` | `/etc/redis/ca.pem` |
    pub fn from_env(env: &mut Env) -> Self {
        let d = Self::default();
        let var = |field: &str| env_var(PREFIX, field);
        let url = env.secret_with(&var("redis.url"), "redis://10.0.0.5:6379/", |s| {
            Ok(s.trim().to_owned())
        });
        let cluster_nodes = env.optional_with(
            &var("redis.cluster_nodes"),
            Vec::new(),
            "redis://10.0.0.1:7000/,redis://10.0.0.2:7000/",
            |s| {
                Ok(s.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_owned)
                    .collect())
            },
        );
        let prefix = env.optional(&var("redis.prefix"), d.prefix, "myapp:rl");
        let timeout = env.duration(&var("redis.timeout"), d.timeout, "50ms");
        let fail_mode =
            env.optional_with(&var("redis.fail_mode"), d.fail_mode, "local", |s| {
                match s.trim().to_ascii_lowercase().as_str() {
                    "closed" => Ok(RedisFailMode::Closed),
                    "open" => Ok(RedisFailMode::Open),
                    "local" => Ok(RedisFailMode::Local),
                    _ => Err("expected `closed`, `open` or `local`".to_owned()),
                }
            });
        let clock = env.optional_with(&var("redis.clock"), d.clock, "server", |s| {
            match s.trim().to_ascii_lowercase().as_str() {
                "server" => Ok(RedisClock::Server),
                "client" => Ok(RedisClock::Client),
                _ => Err("expected `server` or `client`".to_owned()),
            }
        });
        let blocked_cache = env.optional(&var("redis.blocked_cache"), d.blocked_cache, "10000");
        let hash_tag = env.optional_with(&var("redis.hash_tag"), None, "limits", |s| {
            Ok(Some(s.trim().to_owned()))
        });
        let tls_ca_file =
            env.optional_with(&var("redis.tls_ca_file"), None, "/etc/redis/ca.pem", |s| {
                Ok(Some(PathBuf::from(s.trim())))
            });
        Self {
            url,
            cluster_nodes,
            prefix,
            timeout,
            fail_mode,
            clock,
            blocked_cache,
            hash_tag,
            tls_ca_file,
        }
    }
}

impl RedisStore {
    /// A store from its settings (see [`RedisStoreBuilder::build`](super::RedisStoreBuilder::build));
    /// `tls_ca_file` is read here.
    pub async fn from_config(config: RedisStoreConfig) -> Result<Self, RedisConfigError> {
        let mut builder = Self::builder()
            .prefix(config.prefix)
            .timeout(config.timeout)
            .on_failure(config.fail_mode)
            .clock(config.clock)
            .blocked_cache(config.blocked_cache)
            .hash_tag(config.hash_tag.map_or(HashTag::Key, HashTag::Fixed));
        if let Some(url) = config.url {
            builder = builder.url(url);
        }
        if !config.cluster_nodes.is_empty() {
            builder = builder.cluster(config.cluster_nodes);
        }
        if let Some(path) = config.tls_ca_file {
            let pem = std::fs::read(&path).map_err(|e| RedisConfigError::InvalidTlsCa {
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            builder = builder.tls_ca_pem(pem);
        }
        builder.build().await
    }
}
