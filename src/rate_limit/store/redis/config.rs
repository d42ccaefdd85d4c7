//! The Redis store's configuration, from files (serde) or the environment.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::lease::{DEFAULT_LEASE_ENTRIES, DEFAULT_LEASE_MAX_AGE, DEFAULT_LEASE_SHARE};
use super::{
    DEFAULT_BLOCKED_CACHE, DEFAULT_PREFIX, DEFAULT_TIMEOUT, HashTag, Lease, RedisClock,
    RedisConfigError, RedisFailMode, RedisStore,
};
use crate::config::{Env, env_var};
use crate::rate_limit::store::{DEFAULT_RESET_RETENTION, reset_retention_micros};

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
#[derive(Clone, PartialEq, Serialize, Deserialize)]
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
    /// How long a reset key keeps its generation at least (1 ms to 24 h; see
    /// [`RedisStoreBuilder::reset_retention`](super::RedisStoreBuilder::reset_retention)).
    #[serde(with = "crate::config::duration")]
    pub reset_retention: Duration,
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
    /// The most units one local [`Lease`] of a fixed- or sliding-window rule holds (GCRA
    /// rules are never leased); 0 (the default) leaves leases off, so every decision is one
    /// round trip.
    pub lease_units: u64,
    /// The largest fraction (0–1) of a rule's capacity one lease holds (default 0.01);
    /// only with `lease_units`.
    pub lease_share: Option<f64>,
    /// The longest a lease answers (default 1 s); only with `lease_units`.
    #[serde(with = "crate::config::duration::option")]
    pub lease_max_age: Option<Duration>,
    /// Rule and key pairs holding a lease at once (default 10,000); only with
    /// `lease_units`.
    pub lease_entries: Option<usize>,
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: None,
            cluster_nodes: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            reset_retention: DEFAULT_RESET_RETENTION,
            fail_mode: RedisFailMode::default(),
            clock: RedisClock::default(),
            blocked_cache: DEFAULT_BLOCKED_CACHE,
            hash_tag: None,
            tls_ca_file: None,
            lease_units: 0,
            lease_share: None,
            lease_max_age: None,
            lease_entries: None,
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
            .field("reset_retention", &self.reset_retention)
            .field("fail_mode", &self.fail_mode)
            .field("clock", &self.clock)
            .field("blocked_cache", &self.blocked_cache)
            .field("hash_tag", &self.hash_tag)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("lease_units", &self.lease_units)
            .field("lease_share", &self.lease_share)
            .field("lease_max_age", &self.lease_max_age)
            .field("lease_entries", &self.lease_entries)
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
    /// | `PALISADE_RATE_LIMIT_REDIS_RESET_RETENTION` | `1h` |
    /// | `PALISADE_RATE_LIMIT_REDIS_FAIL_MODE` | `closed`, `open` or `local` |
    /// | `PALISADE_RATE_LIMIT_REDIS_CLOCK` | `server` or `client` |
    /// | `PALISADE_RATE_LIMIT_REDIS_BLOCKED_CACHE` | `10000` |
    /// | `PALISADE_RATE_LIMIT_REDIS_HASH_TAG` | `limits` |
    /// | `PALISADE_RATE_LIMIT_REDIS_TLS_CA_FILE` | `/etc/redis/ca.pem` |
    /// | `PALISADE_RATE_LIMIT_REDIS_LEASE_UNITS` | `100` (at least 2; 0, the default: no leases) |
    /// | `PALISADE_RATE_LIMIT_REDIS_LEASE_SHARE` | `0.01` |
    /// | `PALISADE_RATE_LIMIT_REDIS_LEASE_MAX_AGE` | `1s` |
    /// | `PALISADE_RATE_LIMIT_REDIS_LEASE_ENTRIES` | `10000` |
    ///
    /// A lease setting other than the units while the units are 0 is a problem (it would
    /// do nothing), and so is one out of range (see [`Lease`]).
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
        let retention_var = var("redis.reset_retention");
        let reset_retention = env.duration(&retention_var, d.reset_retention, "1h");
        if reset_retention_micros(reset_retention).is_none() {
            let value = env.raw(&retention_var).unwrap_or_default().to_owned();
            env.problem(
                &retention_var,
                crate::config::ProblemKind::Invalid {
                    value,
                    reason: RedisConfigError::InvalidResetRetention.to_string(),
                },
                "1h",
            );
        }
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
        let lease_units = env.optional(&var("redis.lease_units"), 0, "100");
        let lease_share = env.optional_with(&var("redis.lease_share"), None, "0.01", |s| {
            match s.trim().parse::<f64>() {
                Ok(f) if f.is_finite() && f > 0.0 && f <= 1.0 => Ok(Some(f)),
                _ => Err("expected a fraction above 0 and at most 1 (0.01 = 1 %)".to_owned()),
            }
        });
        let lease_max_age = env.optional_with(&var("redis.lease_max_age"), None, "1s", |s| {
            match crate::config::duration::parse(s)? {
                d if d < Duration::from_millis(1) => Err("expected at least 1ms".to_owned()),
                d => Ok(Some(d)),
            }
        });
        let lease_entries = env.optional_with(&var("redis.lease_entries"), None, "10000", |s| {
            match s.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Some(n)),
                _ => Err("expected a whole number of entries, at least 1".to_owned()),
            }
        });
        if lease_units == 1 {
            env.problem(
                &var("redis.lease_units"),
                crate::config::ProblemKind::Invalid {
                    value: "1".to_owned(),
                    reason:
                        "a lease below 2 units is never taken: set at least 2, or 0 for no leases"
                            .to_owned(),
                },
                "100",
            );
        }
        // Units that do not parse are a problem of their own: the others are not off then.
        let units_unparsed = env
            .raw(&var("redis.lease_units"))
            .is_some_and(|v| v.trim().parse::<u64>().is_err());
        if lease_units == 0 && !units_unparsed {
            for (field, set, example) in [
                ("redis.lease_share", lease_share.is_some(), "0.01"),
                ("redis.lease_max_age", lease_max_age.is_some(), "1s"),
                ("redis.lease_entries", lease_entries.is_some(), "10000"),
            ] {
                if set {
                    let value = env.raw(&var(field)).unwrap_or_default().to_owned();
                    env.problem(
                        &var(field),
                        crate::config::ProblemKind::Invalid {
                            value,
                            reason: format!(
                                "leases are off: set {} (the most units a lease holds, e.g. 100) too, or unset this",
                                var("redis.lease_units")
                            ),
                        },
                        example,
                    );
                }
            }
        }
        Self {
            url,
            cluster_nodes,
            prefix,
            timeout,
            reset_retention,
            fail_mode,
            clock,
            blocked_cache,
            hash_tag,
            tls_ca_file,
            lease_units,
            lease_share,
            lease_max_age,
            lease_entries,
        }
    }

    /// The [`Lease`] these settings ask for: `None` when `lease_units` is 0 (an error when
    /// another lease setting is set then: it would do nothing).
    pub fn lease(&self) -> Result<Option<Lease>, RedisConfigError> {
        if self.lease_units == 0 {
            if self.lease_share.is_some()
                || self.lease_max_age.is_some()
                || self.lease_entries.is_some()
            {
                return Err(RedisConfigError::InvalidLease {
                    reason: "a share, max age or entries is set but lease_units is 0 (leases off); set lease_units (e.g. 100) or remove them".to_owned(),
                });
            }
            return Ok(None);
        }
        let lease = Lease::units(self.lease_units)
            .share(self.lease_share.unwrap_or(DEFAULT_LEASE_SHARE))
            .max_age(self.lease_max_age.unwrap_or(DEFAULT_LEASE_MAX_AGE))
            .entries(self.lease_entries.unwrap_or(DEFAULT_LEASE_ENTRIES));
        lease.validate()?;
        Ok(Some(lease))
    }
}

impl RedisStore {
    /// A store from its settings (see [`RedisStoreBuilder::build`](super::RedisStoreBuilder::build));
    /// `tls_ca_file` is read here.
    pub async fn from_config(config: RedisStoreConfig) -> Result<Self, RedisConfigError> {
        let lease = config.lease()?;
        let mut builder = Self::builder()
            .prefix(config.prefix)
            .timeout(config.timeout)
            .reset_retention(config.reset_retention)
            .on_failure(config.fail_mode)
            .clock(config.clock)
            .blocked_cache(config.blocked_cache)
            .hash_tag(config.hash_tag.map_or(HashTag::Key, HashTag::Fixed));
        if let Some(lease) = lease {
            builder = builder.lease(lease);
        }
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
