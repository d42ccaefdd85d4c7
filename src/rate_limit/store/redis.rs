//! The Redis and Redis Cluster store: limits shared by every instance of a service.
//!
//! See [`RedisStore`] for how decisions, keys, Cluster, faults and the blocked-key cache
//! work.

mod batch;
mod blocked;
mod config;
mod health;
mod lease;

use std::fmt::{self, Write as _};
use std::future::{Future, ready};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use smallvec::SmallVec;
use tokio::time::Instant;

use self::blocked::{Blocked, BlockedCache};
pub use self::config::RedisStoreConfig;
use self::health::Health;
pub use self::health::RedisHealth;
pub use self::lease::Lease;
use self::lease::{Leases, TopUps, When};
use super::super::Algorithm;
use super::super::algorithm::{Params, Verdict};
use super::super::error::StoreError;
use super::super::key::RateKey;
use super::memory::MemoryStore;
use super::{
    BoxFuture, CheckItem, DEFAULT_RESET_RETENTION, Decision, RuleDecision, Settlement, Store,
    reset_retention_micros,
};

/// The default time a decision may wait for Redis.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "palisade:rl";
/// The default number of entries in the local cache of blocked keys.
pub const DEFAULT_BLOCKED_CACHE: usize = 10_000;

/// Expiry grace (ms) with the server's clock: none is needed.
const GRACE_SERVER_MS: u64 = 0;
/// Expiry grace (ms) with the client's clock, whose time may run apart from Redis's.
const GRACE_CLIENT_MS: u64 = 1_000;

/// How long a blocked-cache entry answers without a round trip: an admin reset or a refund
/// through another instance reaches this one within it.
const BLOCKED_FRESH: Duration = Duration::from_secs(1);

/// How long a decision that missed the timeout is still awaited, so that what it debited in
/// Redis, if it ran, is given back.
const LATE_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// Marks the `window_start` of a decision the local fallback store made, so that its
/// settlement goes to that store and never to Redis, where nothing was debited (Redis's
/// window starts stay below 2^53).
const LOCAL_DECISION: u64 = 1 << 63;

/// The script counts in doubles: limits, bursts and windows (µs) must stay below this
/// (2^52); costs and settlement deltas at or above it are sent as 2^52 - 1, which is past
/// every capacity the store accepts and so decides the same.
const LUA_EXACT: u64 = 1 << 52;
/// Times (µs) must stay below 2^53.
const LUA_TIME: u64 = 1 << 53;

static SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(include_str!("redis/decide.lua")));

/// What the store does when Redis fails or does not answer within the timeout.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RedisFailMode {
    /// Return a [`StoreError`]: the layer refuses with 503 (its default
    /// [`FailMode::Closed`](super::super::FailMode::Closed)). No request passes unmetered.
    #[default]
    Closed,
    /// Admit every request that the blocked-key cache does not refuse, unmetered (the
    /// rate-limit headers then report each rule's full capacity).
    Open,
    /// Decide in a local memory store (limits per instance, not shared) until Redis is back;
    /// a settlement Redis does not take is charged there too when it takes more units, and
    /// dropped when it gives units back (the local store never counted them), and is
    /// reported as done. [`Store::reset`] resets the key there too. A
    /// reservation decided locally is settled locally alone, even once Redis is back (its
    /// [`RuleDecision::window_start`] carries the top bit, 2^63, to say so).
    Local,
}

impl RedisFailMode {
    /// The name used in configuration (`"closed"`, `"open"` or `"local"`).
    pub const fn as_str(self) -> &'static str {
        match self {
            RedisFailMode::Closed => "closed",
            RedisFailMode::Open => "open",
            RedisFailMode::Local => "local",
        }
    }
}

/// Whose clock decides windows.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RedisClock {
    /// Redis's `TIME`, read inside the script: every instance agrees, whatever its clock.
    #[default]
    Server,
    /// This machine's system clock (µs since the Unix epoch), sent with each call. Only
    /// for instances whose clocks are kept in step; keys then live one second longer than
    /// their state needs, so a clock ahead of Redis's never loses state early.
    Client,
}

/// How keys are placed on Redis Cluster slots.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum HashTag {
    /// Each key's hash tag is its rate key: rules counting the same key share a slot.
    #[default]
    Key,
    /// One tag for every key of the store: any group of rules is one slot (and one node).
    Fixed(String),
}

/// A mistake in the Redis store's configuration, or a first connection that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisConfigError {
    /// Neither a URL nor a list of Cluster nodes.
    #[error(
        "the Redis rate-limit store needs a server: set a URL (redis://host:6379/) or a list of Cluster node URLs"
    )]
    NoServer,
    /// Both a URL and Cluster nodes.
    #[error("the Redis rate-limit store takes a URL or a list of Cluster nodes, not both")]
    BothServers,
    /// A URL that does not parse (the URL is not repeated: it may hold a password).
    #[error(
        "a Redis URL is invalid: {reason}; use redis://[:password@]host:port/[db], or rediss:// for TLS"
    )]
    InvalidUrl {
        /// Why.
        reason: String,
    },
    /// An empty prefix, or one with a `{` or `}`.
    #[error("the Redis key prefix must be non-empty and free of `{{` and `}}`")]
    InvalidPrefix,
    /// A fixed hash tag that is empty or holds a `{` or `}`.
    #[error("the Redis hash tag must be non-empty and free of `{{` and `}}`")]
    InvalidHashTag,
    /// A zero timeout.
    #[error("the Redis rate-limit store's timeout must be at least 1ms")]
    ZeroTimeout,
    /// A TLS certificate authority that holds no PEM certificate or cannot be read.
    #[error(
        "the Redis TLS CA certificate is invalid: {reason}; give one or more PEM certificates (-----BEGIN CERTIFICATE-----)"
    )]
    InvalidTlsCa {
        /// Why.
        reason: String,
    },
    /// A TLS certificate authority for a server that is not reached over TLS.
    #[error(
        "a TLS CA certificate is set but a Redis URL is not rediss://; use rediss:// URLs to connect over TLS"
    )]
    TlsCaWithoutTls,
    /// A reset retention shorter than a millisecond or longer than a day.
    #[error(
        "the Redis rate-limit store's reset retention must be from 1ms to 24h; set it to the longest a request may run (default 1h)"
    )]
    InvalidResetRetention,
    /// A [`Lease`] with a setting out of range.
    #[error("the Redis rate-limit store's lease is invalid: {reason}")]
    InvalidLease {
        /// Why, and what to set instead.
        reason: String,
    },
    /// The first connection to a Cluster failed (a single server that cannot be reached
    /// when the store is built is connected to on the first call instead).
    #[error("could not connect to the Redis Cluster: {reason}")]
    Connect {
        /// Why.
        reason: String,
    },
}

/// Builds a [`RedisStore`].
#[must_use]
pub struct RedisStoreBuilder {
    url: Option<String>,
    nodes: Vec<String>,
    prefix: String,
    timeout: Duration,
    fail_mode: RedisFailMode,
    clock: RedisClock,
    blocked_cache: usize,
    hash_tag: HashTag,
    fallback: Option<MemoryStore>,
    tls_ca: Option<Vec<u8>>,
    lease: Option<Lease>,
    reset_retention: Duration,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may hold passwords: not shown.
        f.debug_struct("RedisStoreBuilder")
            .field("cluster_nodes", &self.nodes.len())
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("fail_mode", &self.fail_mode)
            .field("clock", &self.clock)
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "<set>"))
            .field("lease", &self.lease)
            .field("reset_retention", &self.reset_retention)
            .finish_non_exhaustive()
    }
}

impl RedisStoreBuilder {
    /// One Redis server (`redis://[:password@]host:port/[db]`), through a connection that
    /// reconnects by itself.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// A Redis Cluster, from seed node URLs.
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// The key prefix (default `palisade:rl`), so several applications share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long a decision may wait for Redis (default 50 ms).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// What to do when Redis fails (default [`RedisFailMode::Closed`]).
    pub fn on_failure(mut self, mode: RedisFailMode) -> Self {
        self.fail_mode = mode;
        self
    }

    /// Whose clock decides windows (default [`RedisClock::Server`]).
    pub fn clock(mut self, clock: RedisClock) -> Self {
        self.clock = clock;
        self
    }

    /// Entries in the local cache of blocked keys (default 10,000; 0 turns it off). A full
    /// cache makes room by dropping expired entries, then those that unblock soonest.
    pub fn blocked_cache(mut self, entries: usize) -> Self {
        self.blocked_cache = entries;
        self
    }

    /// How keys are placed on Cluster slots (default [`HashTag::Key`]).
    pub fn hash_tag(mut self, tag: HashTag) -> Self {
        self.hash_tag = tag;
        self
    }

    /// The memory store that [`RedisFailMode::Local`] decides in (default: a new one, with
    /// this store's [reset retention](RedisStoreBuilder::reset_retention)).
    pub fn fallback(mut self, store: MemoryStore) -> Self {
        self.fallback = Some(store);
        self
    }

    /// Trusts this certificate authority (one or more PEM certificates) for `rediss://`
    /// servers instead of the system's roots: for deployments with their own CA or a
    /// self-signed certificate. Every URL must then be `rediss://`.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(pem.into());
        self
    }

    /// Takes local leases of each fixed- or sliding-window rule's quota (default: none, every
    /// decision is one round trip; GCRA rules are always decided in Redis): see [`Lease`]
    /// for what they save and what they cost in exactness.
    pub fn lease(mut self, lease: Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// How long a key reset by [`Store::reset`] keeps its
    /// [generation](RuleDecision::generation) at least, after the reset (default 1 hour,
    /// from 1 ms to 24 hours; [`RedisConfigError::InvalidResetRetention`] otherwise): set
    /// it to the longest a request may run, so that every reservation made before a reset
    /// is settled while the key still knows it was reset. A reset key lives this long in
    /// Redis, or as long as its state from before the reset would have if that is longer.
    pub fn reset_retention(mut self, retention: Duration) -> Self {
        self.reset_retention = retention;
        self
    }

    /// Checks the settings and connects: to a single server at once when it answers
    /// within the connection timeout (the larger of the timeout and 250 ms), loading the
    /// script, so the first decision is one round trip; else on the first call (building
    /// succeeds while it is down, and a wrong password or TLS setting shows as that call's
    /// error); at once to a Cluster (to learn its slots), whose failure is
    /// [`RedisConfigError::Connect`].
    pub async fn build(self) -> Result<RedisStore, RedisConfigError> {
        let bad_braces = |s: &str| s.is_empty() || s.contains(['{', '}']);
        if bad_braces(&self.prefix) {
            return Err(RedisConfigError::InvalidPrefix);
        }
        if let HashTag::Fixed(tag) = &self.hash_tag {
            if bad_braces(tag) {
                return Err(RedisConfigError::InvalidHashTag);
            }
        }
        if self.timeout.is_zero() {
            return Err(RedisConfigError::ZeroTimeout);
        }
        let reset_retention = reset_retention_micros(self.reset_retention)
            .ok_or(RedisConfigError::InvalidResetRetention)?;
        if let Some(lease) = &self.lease {
            lease.validate()?;
        }
        let invalid = |e: redis::RedisError| RedisConfigError::InvalidUrl {
            reason: e.to_string(),
        };
        let urls: Vec<&str> = self
            .url
            .iter()
            .chain(&self.nodes)
            .map(String::as_str)
            .collect();
        if let Some(pem) = &self.tls_ca {
            check_ca(pem)?;
            if !urls.iter().all(|u| is_tls(u)) {
                return Err(RedisConfigError::TlsCaWithoutTls);
            }
        }
        if urls.iter().any(|u| is_tls(u)) {
            install_crypto_provider();
        }
        let certs = self.tls_ca.map(|pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
        let conn =
            match (self.url, self.nodes.is_empty()) {
                (None, true) => return Err(RedisConfigError::NoServer),
                (Some(_), false) => return Err(RedisConfigError::BothServers),
                (Some(url), true) => {
                    let client = match certs {
                        None => redis::Client::open(url.as_str()),
                        Some(certs) => redis::Client::build_with_tls(url.as_str(), certs),
                    }
                    .map_err(invalid)?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(250))))
                        .set_response_timeout(None)
                        .set_min_delay(Duration::from_millis(10))
                        .set_max_delay(Duration::from_millis(200))
                        .set_number_of_retries(3);
                    Conn::Single(
                        ConnectionManager::new_lazy_with_config(client, config).map_err(invalid)?,
                    )
                }
                (None, false) => {
                    let mut client = redis::cluster::ClusterClientBuilder::new(self.nodes)
                        .connection_timeout(self.timeout.max(Duration::from_millis(250)))
                        // The store's own timeout answers the caller; the connection waits as
                        // long as a late decision is awaited, so that its answer (and its
                        // debit, given back) is not lost, nor the script sent again.
                        .response_timeout(LATE_ANSWER_WAIT)
                        .retries(2);
                    if let Some(certs) = certs {
                        client = client.certs(certs);
                    }
                    let client = client.build().map_err(invalid)?;
                    let conn = client.get_async_connection().await.map_err(|e| {
                        RedisConfigError::Connect {
                            reason: e.to_string(),
                        }
                    })?;
                    Conn::Cluster(conn)
                }
            };
        if let Conn::Single(manager) = &conn {
            // Connect and load the script now, while the server is up: else the first
            // decision would do both within its own timeout (50 ms by default), which a
            // busy machine or a distant server misses, failing the first request. A
            // server that is down or slower than the connection timeout leaves it to the
            // first decision, as before: building still succeeds.
            let mut manager = manager.clone();
            let connect_timeout = self.timeout.max(Duration::from_millis(250));
            let _ = tokio::time::timeout(connect_timeout, SCRIPT.load_async(&mut manager)).await;
        }
        let cluster = matches!(conn, Conn::Cluster(_));
        Ok(RedisStore {
            inner: Arc::new(Inner {
                conn,
                cluster,
                prefix: self.prefix,
                timeout: self.timeout,
                fail_mode: self.fail_mode,
                clock: self.clock,
                hash_tag: self.hash_tag,
                blocked: BlockedCache::new(self.blocked_cache),
                leases: Leases::new(self.lease, self.timeout),
                // The local store of the failure mode, unless one was given, keeps reset
                // keys as long as Redis does.
                fallback: self.fallback.unwrap_or_else(|| {
                    MemoryStore::builder()
                        .reset_retention(self.reset_retention)
                        .build()
                        .unwrap_or_default()
                }),
                health: Health::default(),
                batcher: batch::Batchers::new(cluster),
                reset_retention,
            }),
        })
    }
}

/// Whether a URL asks for TLS.
fn is_tls(url: &str) -> bool {
    url.trim_start()
        .get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
}

/// Checks that a CA holds at least one PEM certificate, all of them readable.
fn check_ca(pem: &[u8]) -> Result<(), RedisConfigError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| RedisConfigError::InvalidTlsCa {
            reason: e.to_string(),
        })?;
        count += 1;
    }
    if count == 0 {
        return Err(RedisConfigError::InvalidTlsCa {
            reason: "no certificate found".to_owned(),
        });
    }
    Ok(())
}

/// redis-rs's rustls needs a process-wide crypto provider: ring's, unless the application
/// installed one. (rustls marks ring's provider deprecated for its lack of post-quantum key
/// exchange; an application that wants it installs aws-lc-rs's before building the store.)
#[allow(deprecated)]
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one first: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Rate-limit state in Redis or Redis Cluster, shared by clones and by every instance of a
/// service.
///
/// ```no_run
/// use std::time::Duration;
/// use palisade::rate_limit::{Quota, RateLimitLayer, RedisFailMode, RedisStore, Rule};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = RedisStore::builder()
///     .url("redis://127.0.0.1:6379/")
///     .prefix("myapp:rl")
///     .timeout(Duration::from_millis(50))
///     .on_failure(RedisFailMode::Local)
///     .build()
///     .await?;
/// let layer = RateLimitLayer::builder()
///     .store(store)
///     .rule(Rule::new("chat", Quota::per_minute(20)))
///     .build()?;
/// # let _ = layer;
/// # Ok(())
/// # }
/// ```
///
/// **One round trip per decision.** One Lua script decides every rule of a request at once
/// (all admitted rules are debited, or none; refusals never count), sent with `EVALSHA`
/// and loaded again by itself after a Redis restart (`NOSCRIPT`); a store on one server
/// loads it when built ([`RedisStoreBuilder::build`]). The script needs Redis 6.0 or later
/// (`SET ... KEEPTTL`) and Lua's `struct` library (built into Redis and Valkey; it reads a
/// call's numbers and packs the answer as 8-byte integers): a server without them fails
/// every decision, which the [`RedisFailMode`] answers. It needs a 64-bit build of Redis
/// too (Lua writes a state's integers through a C `long`). It reads Redis's own
/// clock (`TIME`) by default, so instances whose clocks disagree still agree on windows
/// ([`RedisClock`]). The script's arithmetic is the one of
/// [`algorithm`](crate::rate_limit::algorithm), integer for integer, so a Redis store answers
/// exactly as a [`MemoryStore`](crate::rate_limit::MemoryStore) would (a property test holds them to
/// it). Lua counts in doubles: limits, bursts and windows (in µs, about 142 years) must
/// stay below 2^52, so must a GCRA rule's burst span (`burst × window / limit` µs), and
/// times below 2^53 µs (the year 2255), which any real quota does; a
/// rule past them gets a [`StoreError`] naming it, never a silently inexact count. A cost
/// past 2^52 is past every such capacity and is refused as [`Verdict::Never`], as the
/// memory store refuses it.
///
/// **Batching.** A call made while the connection has room (fewer than two calls in
/// flight) is sent at once; calls made while it has none wait for a call to end, then go
/// together as one script call
/// (at most 64) that runs each of them in order, each atomic and answered exactly as it
/// would be alone (one `TIME` serves the batch). Under load one round trip, and one script
/// call's fixed cost in Redis, then serve many decisions; idle, nothing waits. Each call
/// keeps its own timeout and failure mode; a batch that fails fails each of its calls. At
/// most 8,192 decisions and peeks wait for room (on a Cluster, in all slots together):
/// while Redis stalls, one past them fails at
/// once (its failure mode answers), and one whose caller went away while it waited (a
/// decision that timed out is awaited in the background as said below) is not sent;
/// settlements are always sent. On
/// a Cluster, the two calls in flight and those waiting are counted per slot, so a master
/// held up (paused, failing over) holds up no key of another; a batch holds only calls
/// whose keys share a hash tag (one call per tag, sent side by side), so it never crosses
/// slots. [`RedisHealth::batched_calls`] counts the
/// calls that went in a batch.
///
/// **Keys.** One key per rule and rate key, `PREFIX:RULE:{RATE_KEY}` (a `:`, `{`, `}` or
/// `%` in the rule's name is written `%3A`, `%7B`, `%7D`, `%25`), holding two or
/// three integers as a short string (four once the key has been reset: its generation) and
/// expiring on its own (`PX`) once its state is back to fresh (a window's key that already
/// expires later keeps its expiry; a reset key lives at least the reset retention). A header's value is stored as its SHA-256 digest, never as it is. Memory per key
/// (`MEMORY USAGE` on Redis 7.0, 64-bit, with the default prefix): 120 bytes for a
/// principal key such as `palisade:rl:chat:{principal:user-1234567}`, 136 bytes for an API
/// key (its 32-digit hash), the same for every algorithm and after a reset (16 bytes more
/// for a GCRA key whose bucket has had units given back since it was last full, or that
/// has been reset and whose bucket has been emptying for over 16 minutes; up to 32 for
/// both); a million active keys take about 130 MB.
///
/// **Reset and settle.** [`Store::reset`] is one script call on the exact key (never
/// `SCAN` or `KEYS`), in order behind the calls made before it (it waits and is batched
/// as a settlement is): it leaves a fresh state with the key's next
/// [generation](RuleDecision::generation), which lives as long as the old state would have
/// and at least the reset retention ([`RedisStoreBuilder::reset_retention`], an hour by
/// default; no later decision or settlement of the key shortens it). A
/// settlement carries the generation and window of its reservation and applies only while
/// the key still holds both, so a reservation made before a reset and settled after it
/// gives back (or takes) nothing from the requests admitted since. GCRA, which has no
/// windows, keeps an epoch instead: the time its bucket was last found full, reported as
/// the reservation's [`RuleDecision::window_start`]; once the bucket is full again (the
/// key expired on its own, or not yet), the next request starts a new epoch, and a
/// give-back of a reservation from an earlier one is dropped, as the memory store drops
/// it; a charge (more used than reserved) applies in any epoch, since the units were
/// used (on a bucket full again, or a key expired, from now, as a request's units would
/// be, whether Redis still holds the idle key or not). A charge from after a reset
/// applies even when the key has since gone and been started again at generation 0 (its
/// generation is newer than the key's, counted modulo 2^32); a charge from before a reset
/// counts as a new one only if the reset key is gone before the reset retention ends
/// (deleted, or evicted by a `maxmemory` policy; a key deleted, started again and reset
/// again holds the generation it held before, so a settlement from that earlier generation
/// in the same window then applies, a give-back included).
/// A give-back never makes the bucket fuller than full, and refunds at most what of its
/// reservation is still outstanding ([`RuleDecision::reservation_end`]): neither the
/// units that have drained since (they came back with time) nor those of later requests.
///
/// **Cluster.** Every key carries its rate key as hash tag, so rules counting the same
/// key (a per-minute and a per-day rule for one API key) share a slot. Rules counting
/// different keys (per key and global) cannot be decided atomically across slots: give
/// the store one fixed tag ([`HashTag::Fixed`]), which puts every key of the store on
/// one slot, or keep such groups for a single server. A Cluster store refuses a group
/// whose keys would cross slots with a clear [`StoreError`], before any round trip and
/// whatever the failure mode (a configuration mistake, not an outage); as a reservation
/// is only made by a check that passed, its settlement never crosses slots either, and a
/// settlement that would is refused the same way.
///
/// **Faults.** Each decision waits at most [`RedisStoreBuilder::timeout`] (50 ms by
/// default). When Redis fails, the store follows its [`RedisFailMode`]: fail closed (an
/// error, which the layer answers with 503), fail open (admit), or decide in a local
/// [`MemoryStore`](crate::rate_limit::MemoryStore). The first failure of an episode is logged at
/// `warn`, the recovery at `info`; both are counted in [`RedisStore::health`]. Recovery is
/// automatic: the connection reconnects by itself.
///
/// **A decision that timed out.** The script may still run after the timeout answered
/// (Redis was busy, paused, or the network slow). Failing open, what it debits stands:
/// the request was admitted. Failing closed or to the local store, the store keeps
/// waiting for the late answer in the background (up to 10 s) and gives back in Redis
/// whatever it debited (a settlement, counted in
/// [`RedisHealth::late_debits_returned`]), so the refusal or the local decision is the only
/// one that counts. Between the late run and the give-back (one round trip), other
/// requests see those units as used. When the connection breaks instead, the answer never
/// comes and the debit, if the script ran, stays until its window passes.
///
/// **Peek and settle when Redis fails.** With [`RedisFailMode::Local`], a peek that Redis
/// does not answer reads the local store, and a settlement that takes more units is
/// charged there (a give-back of a reservation Redis made is dropped: the local store
/// never counted those units). Otherwise a peek or a settlement Redis does not answer
/// returns a [`StoreError`].
///
/// **Blocked-key cache.** When a decision leaves a rule with no room for even one unit,
/// the store remembers the key until the first instant one unit fits. Further requests
/// for that key are refused locally, with no round trip (a flood from one key costs Redis
/// almost nothing: one round trip per key and second), and keep being refused while Redis
/// is away. The cache forgets a key on [`Store::reset`] and on a settlement that gives
/// units back (when it is called and again once Redis has applied it, so a refusal decided
/// in between does not outlive it), and once the debit of a decision that ran after its
/// timeout has been given back; an entry is not used when the rule's parameters change (a
/// per-key override); [`RedisStore::clear_blocked_cache`] forgets everything. While Redis
/// answers, an entry answers alone for at most a second, so a reset or units given back
/// through another instance reach this one within a second; while it does not, every
/// entry answers until its key can pass again. A full cache drops its expired entries,
/// then those that unblock soonest, down to 7/8 of its capacity
/// ([`RedisStoreBuilder::blocked_cache`]), and keeps the newcomer: under a flood of
/// distinct blocked keys it stays within its capacity at O(1) amortized per insert.
///
/// **Local leases (opt-in).** With [`RedisStoreBuilder::lease`], a decision of a fixed- or
/// sliding-window rule that finds no usable lease for its key also asks Redis, in the same
/// script call, for a few units beyond its cost (a [`Lease`]); once they are granted, the
/// next requests for that rule and key are decided here from them, with no round trip
/// (also while Redis is away: they were granted), all of a request's rules or none, each
/// unit spent once. GCRA rules are never leased: Redis decides them on every request, so a
/// request with a GCRA rule makes a round trip. Decisions made from a lease report the
/// grant's window and generation, so their settlements apply where their units were
/// counted. A refusal of a call that asked for extra units says nothing about the request
/// alone: it is neither cached nor returned, and the request is asked again without them.
/// [`Store::reset`] drops this instance's lease of the key (also one granted while the reset
/// was on its way); another instance's lease answers until it ends (at most its maximum
/// age, 1 s by default). Decisions of the local fallback store never create a lease.
/// [`RedisHealth::lease_answers`] counts the decisions leases answered.
///
/// **TLS.** `rediss://` URLs connect over TLS (rustls), for one server or every Cluster
/// node, checking the server's certificate against the system's roots, or against your
/// own CA with [`RedisStoreBuilder::tls_ca_pem`]. A certificate that does not verify is a
/// failed round trip, as when Redis is down: the failure mode answers and
/// [`RedisHealth::last_error`] says why. If the application installs no rustls crypto
/// provider of its own, the store installs ring's.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    cluster: bool,
    prefix: String,
    timeout: Duration,
    fail_mode: RedisFailMode,
    clock: RedisClock,
    hash_tag: HashTag,
    blocked: BlockedCache,
    leases: Leases,
    fallback: MemoryStore,
    health: Health,
    batcher: batch::Batchers,
    /// µs a reset key keeps its generation after the reset, at least.
    reset_retention: u64,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.inner.cluster)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("fail_mode", &self.inner.fail_mode)
            .field("clock", &self.inner.clock)
            .finish_non_exhaustive()
    }
}

/// What the script is asked to do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Check,
    Peek,
    Settle,
}

/// A check's items, owned, for the failure modes and the blocked cache.
#[derive(Clone)]
struct OwnedItem {
    rule_index: u32,
    rule: Box<str>,
    key: RateKey,
    params: Params,
    cost: u64,
    shadow: bool,
}

impl OwnedItem {
    fn of(i: &CheckItem<'_>) -> Self {
        Self {
            rule_index: i.rule_index,
            rule: i.rule.into(),
            key: i.key.clone(),
            params: i.params,
            cost: i.cost,
            shadow: i.shadow,
        }
    }

    fn item(&self) -> CheckItem<'_> {
        CheckItem {
            rule_index: self.rule_index,
            rule: &self.rule,
            key: &self.key,
            params: self.params,
            cost: self.cost,
            shadow: self.shadow,
        }
    }
}

/// What a settlement carries besides its rule and key, owned, for the local fallback.
#[derive(Clone, Copy)]
struct Settled {
    window_start: u64,
    generation: u32,
    reservation_end: u64,
    delta: i64,
}

impl Settled {
    fn of(s: &Settlement<'_>) -> Self {
        Self {
            window_start: s.window_start,
            generation: s.generation,
            reservation_end: s.reservation_end,
            delta: s.delta,
        }
    }
}

impl RedisStore {
    /// A builder (a server URL or Cluster nodes are required).
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: None,
            nodes: Vec::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: DEFAULT_TIMEOUT,
            fail_mode: RedisFailMode::default(),
            clock: RedisClock::default(),
            blocked_cache: DEFAULT_BLOCKED_CACHE,
            hash_tag: HashTag::default(),
            fallback: None,
            tls_ca: None,
            lease: None,
            reset_retention: DEFAULT_RESET_RETENTION,
        }
    }

    /// A store on one server with the defaults.
    pub async fn connect(url: impl Into<String>) -> Result<Self, RedisConfigError> {
        Self::builder().url(url).build().await
    }

    /// What the store has seen of Redis.
    pub fn health(&self) -> RedisHealth {
        self.inner.health.snapshot(
            self.inner.fail_mode,
            self.inner.blocked.len(),
            self.inner.leases.answered(),
            self.inner.leases.len(),
        )
    }

    /// Forgets every key of the local blocked-key cache.
    pub fn clear_blocked_cache(&self) {
        self.inner.blocked.clear();
    }

    /// The Redis key holding one rule's state for one rate key.
    pub fn key_name(&self, rule: &str, key: &RateKey) -> String {
        let mut out = String::new();
        self.write_key_name(&mut out, rule, key);
        out
    }

    /// Writes [`RedisStore::key_name`] into `out`.
    fn write_key_name(&self, out: &mut String, rule: &str, key: &RateKey) {
        // `push_str` rather than `write!`: this runs for every rule of every decision.
        let rule = encode_rule(rule);
        out.push_str(&self.inner.prefix);
        match &self.inner.hash_tag {
            HashTag::Key => {
                out.push(':');
                out.push_str(&rule);
                out.push_str(":{");
                write_key(out, key);
                out.push('}');
            }
            HashTag::Fixed(tag) => {
                out.push_str(":{");
                out.push_str(tag);
                out.push_str("}:");
                out.push_str(&rule);
                out.push(':');
                write_key(out, key);
            }
        }
    }

    /// Decides a group at an explicit time (µs), instead of the store's clock: for tests
    /// and replays that drive a [`MemoryStore`](super::MemoryStore) with the same instants.
    pub fn check_at(
        &self,
        items: &[CheckItem<'_>],
        now: u64,
    ) -> BoxFuture<Result<Decision, StoreError>> {
        self.check_with(items, Some(now))
    }

    /// Settles at an explicit time (µs; it only sets expiries).
    pub fn settle_at(
        &self,
        settlements: &[Settlement<'_>],
        now: u64,
    ) -> BoxFuture<Result<(), StoreError>> {
        self.settle_with(settlements, Some(now))
    }

    /// Peeks at an explicit time (µs).
    pub fn peek_at(
        &self,
        item: &CheckItem<'_>,
        now: u64,
    ) -> BoxFuture<Result<RuleDecision, StoreError>> {
        self.peek_with(item, Some(now))
    }

    /// Resets at an explicit time (µs; it only sets the reset key's expiry), as
    /// [`Store::reset`] does: for tests and replays that drive a
    /// [`MemoryStore`](super::MemoryStore) with the same instants.
    pub fn reset_at(
        &self,
        rule_index: u32,
        rule: &str,
        key: &RateKey,
        now: u64,
    ) -> BoxFuture<Result<(), StoreError>> {
        self.reset_with(rule_index, rule, key, Some(now))
    }

    fn reset_with(
        &self,
        rule_index: u32,
        rule: &str,
        key: &RateKey,
        now: Option<u64>,
    ) -> BoxFuture<Result<(), StoreError>> {
        if now.is_some_and(|t| t >= LUA_TIME) {
            return Box::pin(ready(Err(StoreError::new(
                "the Redis store's time must stay below 2^53 µs (the year 2255)",
            ))));
        }
        // Redis keys, and so the blocked cache, go by the rule's name; the local fallback
        // by its index. The fallback forgets the key too: what it counted while Redis was
        // away would otherwise refuse the reset key at the next outage.
        self.inner.fallback.reset_now(rule_index, key);
        self.inner.blocked.remove(rule, key);
        // This instance's lease of the key is dropped; another's answers until it ends.
        self.inner.leases.remove(rule, key);
        let name = self.key_name(rule, key);
        let inner = self.inner.clone();
        // Not a DEL: the key keeps a fresh state with the next generation until its old
        // state would have expired, and at least the reset retention, so reservations made
        // before the reset settle nothing.
        let time = self
            .now_arg(now)
            .map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        let grace = match (now, self.inner.clock) {
            (None, RedisClock::Server) => GRACE_SERVER_MS,
            _ => GRACE_CLIENT_MS,
        };
        let retention = i64::try_from(self.inner.reset_retention).unwrap_or(i64::MAX);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(SCRIPT.get_hash())
            .arg(1)
            .arg(&name)
            .arg("r")
            .arg(&reset_numbers(time, i64::try_from(grace).unwrap_or(0), retention)[..]);
        let (rule, key): (Box<str>, RateKey) = (rule.into(), key.clone());
        Box::pin(async move {
            // In order with the calls made before it, as a settlement: always sent.
            let call = batch::submit(inner.clone(), cmd, batch::Kind::Settlement);
            match tokio::time::timeout(inner.timeout, call).await {
                Ok(Ok(_)) => {
                    // A refusal decided in Redis before the reset but answered after the
                    // removal above may have blocked the key here again.
                    inner.blocked.remove(&rule, &key);
                    // So may a lease of the state before the reset have been granted.
                    inner.leases.remove(&rule, &key);
                    Ok(())
                }
                Ok(Err(e)) => Err(StoreError::new(format!("resetting in Redis failed: {e}"))),
                Err(_) => Err(StoreError::new(
                    "resetting in Redis: no answer within the timeout",
                )),
            }
        })
    }

    /// The time sent to the script: µs, or `None` for the server's own clock.
    fn now_arg(&self, now: Option<u64>) -> Option<u64> {
        match (now, self.inner.clock) {
            (Some(now), _) => Some(now),
            (None, RedisClock::Server) => None,
            (None, RedisClock::Client) => {
                let since = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                Some(u64::try_from(since.as_micros()).unwrap_or(u64::MAX))
            }
        }
    }

    /// The script call (`EVALSHA`) for these rules, or an error when Cluster could not run
    /// it. The command is written straight into one buffer: numbers are formatted in
    /// place, and the keys share one scratch string.
    fn invocation<'k, I>(
        &self,
        mode: Mode,
        now: Option<u64>,
        rules: I,
    ) -> Result<redis::Cmd, StoreError>
    where
        I: Iterator<Item = (&'k str, &'k RateKey, Params, u64, i64, u32, u64)> + Clone,
    {
        if now.is_some_and(|t| t >= LUA_TIME) {
            return Err(StoreError::new(
                "the Redis store's time must stay below 2^53 µs (the year 2255)",
            ));
        }
        let count = rules.clone().count();
        let mut cmd = redis::Cmd::with_capacity(6 + count, 128 + 128 * count);
        cmd.arg("EVALSHA").arg(SCRIPT.get_hash()).arg(count);
        let mut first: Option<&RateKey> = None;
        let mut name = String::with_capacity(self.inner.prefix.len() + 48);
        for (rule, key, ..) in rules.clone() {
            if self.inner.cluster && self.inner.hash_tag == HashTag::Key {
                // Equal rate keys, and only they, encode to the same hash tag.
                match first {
                    None => first = Some(key),
                    Some(k) if k != key => {
                        return Err(StoreError::new(
                            "rules counting different keys cannot be decided atomically across Redis Cluster slots; use HashTag::Fixed for such groups",
                        ));
                    }
                    Some(_) => {}
                }
            }
            name.clear();
            self.write_key_name(&mut name, rule, key);
            cmd.arg(name.as_bytes());
        }
        let grace = match (now, self.inner.clock) {
            (None, RedisClock::Server) => GRACE_SERVER_MS,
            _ => GRACE_CLIENT_MS,
        };
        cmd.arg(match mode {
            Mode::Check => "c",
            Mode::Peek => "p",
            Mode::Settle => "s",
        });
        // The numbers, 8 bytes each (the script's `struct.unpack` reads them): the time
        // (-1: the server's clock), the grace, then each rule's.
        let per_rule = if mode == Mode::Settle { 9 } else { 7 };
        let mut nums = Vec::with_capacity(8 * (2 + per_rule * count));
        let time = self
            .now_arg(now)
            .map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        let mut push = |n: i64| nums.extend_from_slice(&n.to_le_bytes());
        push(time);
        push(i64::try_from(grace).unwrap_or(i64::MAX));
        for (rule, _key, params, a, b, generation, reservation_end) in rules {
            if params.limit >= LUA_EXACT || params.window >= LUA_EXACT || params.burst >= LUA_EXACT
            {
                return Err(StoreError::new(format!(
                    "rule `{rule}`: the Redis store counts exactly only below 2^52: a quota's limit, burst and window (in µs, about 142 years) must be smaller"
                )));
            }
            // GCRA's tolerance, ceil(burst × window / limit) µs, is added to the time: past
            // 2^52 the script's doubles no longer hold the sums exactly.
            if params.algorithm == Algorithm::Gcra
                && (u128::from(params.burst) * u128::from(params.window))
                    .div_ceil(u128::from(params.limit.max(1)))
                    >= u128::from(LUA_EXACT)
            {
                return Err(StoreError::new(format!(
                    "rule `{rule}`: the Redis store counts exactly only below 2^52: a GCRA quota's burst times its window over its limit (in µs, about 142 years) must be smaller"
                )));
            }
            // A cost past every capacity is refused (`Never`) whatever its size (2^52 is
            // above every limit and burst allowed); a delta past every count saturates.
            let (a, b) = match mode {
                Mode::Check | Mode::Peek => (a.min(LUA_EXACT), b),
                Mode::Settle => (
                    a.min(LUA_TIME - 1),
                    b.clamp(1 - LUA_EXACT as i64, LUA_EXACT as i64 - 1),
                ),
            };
            // Every number below is under 2^53 (checked or clamped above), so none wraps.
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            push(match params.algorithm {
                Algorithm::SlidingWindow => 0,
                Algorithm::FixedWindow => 1,
                Algorithm::Gcra => 2,
            });
            push(n(params.limit));
            push(n(params.window));
            push(n(params.burst));
            push(i64::from(params.strict));
            push(n(a));
            push(b);
            if mode == Mode::Settle {
                // An end past the script's exact range is only ever later than the truth;
                // lowering it gives back less, never more.
                push(i64::from(generation));
                push(n(reservation_end.min(LUA_TIME - 1)));
            }
        }
        cmd.arg(&nums[..]);
        Ok(cmd)
    }

    fn check_with(
        &self,
        items: &[CheckItem<'_>],
        now: Option<u64>,
    ) -> BoxFuture<Result<Decision, StoreError>> {
        let leases = &self.inner.leases;
        // Before the call's time is read (`RedisClock::Client`): a lease's life, measured
        // from here, never ends past the window its time falls in.
        let sent = Instant::now();
        let when = match now {
            Some(t) => When::At(t),
            None => When::Local(sent),
        };
        if leases.enabled() {
            if let Some(leased) = leases.answer(items, when) {
                return Box::pin(ready(Ok(leased)));
            }
        }
        if let Some(refusal) = self
            .inner
            .cached_refusal(items, self.inner.health.unhealthy())
        {
            return Box::pin(ready(Ok(refusal)));
        }
        let top_ups = if leases.enabled() {
            leases.plan(items, when)
        } else {
            None
        };
        let top_up = |i: usize| top_ups.as_ref().map_or(0, |t| t[i]);
        let inv = self.invocation(
            Mode::Check,
            now,
            items.iter().enumerate().map(|(n, i)| {
                (
                    i.rule,
                    i.key,
                    i.params,
                    i.cost + top_up(n),
                    i64::from(i.shadow),
                    0,
                    0,
                )
            }),
        );
        let owned: SmallVec<[OwnedItem; 2]> = items.iter().map(OwnedItem::of).collect();
        let cmd = match inv {
            Ok(cmd) => cmd,
            Err(e) => {
                if top_ups.is_some() {
                    for i in &owned {
                        leases.settled(&i.rule, &i.key);
                    }
                }
                return Box::pin(ready(Err(e)));
            }
        };
        let inner = self.inner.clone();
        let generations: SmallVec<[u64; 2]> = owned
            .iter()
            .map(|i| inner.blocked.generation(&i.rule, &i.key))
            .collect();
        let Some(top_ups) = top_ups else {
            return Box::pin(async move {
                let answer = inner.call_check(cmd, &owned, &[]).await;
                inner.finish_check(answer, &owned, &generations)
            });
        };
        let store = self.clone();
        let removals = leases.removals();
        Box::pin(async move {
            let answer = inner.call_check(cmd, &owned, &top_ups).await;
            store
                .finish_leased(answer, &owned, &top_ups, &generations, sent, removals, now)
                .await
        })
    }

    /// The end of a check that asked for top-ups: keeps the leases granted and describes
    /// the request alone; a refusal that a top-up may have caused is asked again without
    /// top-ups.
    #[allow(clippy::too_many_arguments)]
    async fn finish_leased(
        &self,
        answer: Result<Vec<i64>, String>,
        owned: &[OwnedItem],
        top_ups: &TopUps,
        generations: &[u64],
        sent: Instant,
        removals: u64,
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let inner = &self.inner;
        let leases = &inner.leases;
        let asked = || owned.iter().zip(top_ups).filter(|(_, t)| **t > 0);
        let values = match answer {
            Ok(values) => values,
            Err(e) => {
                for (i, _) in asked() {
                    leases.settled(&i.rule, &i.key);
                }
                return inner.finish_check(Err(e), owned, generations);
            }
        };
        let at = values.get(1).map_or(0, |&t| u64::try_from(t).unwrap_or(0));
        let (mut decision, blocked) = match parse_check(&values, owned) {
            Ok(parsed) => parsed,
            Err(e) => {
                for (i, _) in asked() {
                    leases.settled(&i.rule, &i.key);
                }
                return Err(e);
            }
        };
        // The items whose top-up Redis refused: what it says of them is not about the
        // request alone. Leasing stays off for them for a while.
        let mut refused: SmallVec<[usize; 2]> = SmallVec::new();
        for (n, (item, &top)) in owned.iter().zip(top_ups).enumerate() {
            if top == 0 {
                continue;
            }
            let rule = &decision.rules[n];
            if rule.verdict.is_allowed() {
                if rule.debited {
                    let held = leases.grant(
                        &item.rule,
                        &item.key,
                        item.params,
                        top,
                        rule,
                        sent,
                        at,
                        removals,
                    );
                    // What remains for the caller includes the units the lease holds.
                    if let Some(held) = held {
                        let rule = &mut decision.rules[n];
                        rule.remaining = rule.remaining.saturating_add(held);
                    }
                } else {
                    leases.settled(&item.rule, &item.key);
                }
            } else {
                leases.turn_off(&item.rule, &item.key, item.params, rule, sent, at);
                refused.push(n);
            }
        }
        if refused.is_empty() {
            inner.remember_blocked(owned, &decision, &blocked, generations);
            return Ok(decision);
        }
        if !decision.admitted {
            // Nothing was debited: the whole group again, without top-ups.
            return self.check_plain(owned, now).await;
        }
        // Admitted: only shadow items can have refused. The others were debited (their
        // leases kept above); the shadow ones are asked again alone, without top-ups.
        inner.remember_blocked(owned, &decision, &blocked, generations);
        let shadows: SmallVec<[OwnedItem; 2]> = refused.iter().map(|&n| owned[n].clone()).collect();
        if let Ok(again) = self.check_plain(&shadows, now).await {
            for (&n, rule) in refused.iter().zip(again.rules) {
                decision.rules[n] = rule;
            }
        }
        Ok(decision)
    }

    /// One check without top-ups, as the store makes it without leases.
    async fn check_plain(
        &self,
        owned: &[OwnedItem],
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let cmd = self.invocation(
            Mode::Check,
            now,
            owned.iter().map(|i| {
                (
                    &*i.rule,
                    &i.key,
                    i.params,
                    i.cost,
                    i64::from(i.shadow),
                    0,
                    0,
                )
            }),
        )?;
        let generations: SmallVec<[u64; 2]> = owned
            .iter()
            .map(|i| self.inner.blocked.generation(&i.rule, &i.key))
            .collect();
        let answer = self.inner.call_check(cmd, owned, &[]).await;
        self.inner.finish_check(answer, owned, &generations)
    }

    fn settle_with(
        &self,
        settlements: &[Settlement<'_>],
        now: Option<u64>,
    ) -> BoxFuture<Result<(), StoreError>> {
        for s in settlements {
            if s.delta < 0 {
                self.inner.blocked.remove(s.rule, s.key);
            }
        }
        // A reservation the local fallback made is settled there alone: Redis never
        // counted it, and a refund there would give back units other requests spent.
        let (local, settlements): (SmallVec<[Settlement<'_>; 2]>, SmallVec<[Settlement<'_>; 2]>) =
            settlements
                .iter()
                .copied()
                .partition(|s| s.window_start & LOCAL_DECISION != 0);
        if !local.is_empty() {
            let local: SmallVec<[Settlement<'_>; 2]> = local
                .into_iter()
                .map(|s| Settlement {
                    window_start: s.window_start & !LOCAL_DECISION,
                    ..s
                })
                .collect();
            self.inner.fallback.settle_now(&local);
            if settlements.is_empty() {
                return Box::pin(ready(Ok(())));
            }
        }
        let inv = self.invocation(
            Mode::Settle,
            now,
            settlements.iter().map(|s| {
                (
                    s.rule,
                    s.key,
                    s.params,
                    s.window_start,
                    s.delta,
                    s.generation,
                    s.reservation_end,
                )
            }),
        );
        let cmd = match inv {
            Ok(cmd) => cmd,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let inner = self.inner.clone();
        // With the local fallback, a settlement of a reservation Redis made is charged
        // locally when Redis does not answer; a give-back is not (the local store never
        // counted those units: giving them back there refunds requests it admitted).
        let local: SmallVec<[(OwnedItem, Settled); 2]> = if inner.fail_mode == RedisFailMode::Local
        {
            settlements
                .iter()
                .filter(|s| s.delta > 0)
                .map(|s| {
                    let item = CheckItem {
                        rule_index: s.rule_index,
                        rule: s.rule,
                        key: s.key,
                        params: s.params,
                        cost: 0,
                        shadow: false,
                    };
                    (OwnedItem::of(&item), Settled::of(s))
                })
                .collect()
        } else {
            SmallVec::new()
        };
        // The keys given units back: a refusal decided in Redis before the give-back but
        // answered after the removal above may have blocked one of them here again.
        let give_backs: SmallVec<[(Box<str>, RateKey); 2]> = if inner.blocked.enabled() {
            settlements
                .iter()
                .filter(|s| s.delta < 0)
                .map(|s| (s.rule.into(), s.key.clone()))
                .collect()
        } else {
            SmallVec::new()
        };
        Box::pin(async move {
            match inner.call(cmd, batch::Kind::Settlement).await {
                Ok(_) => {
                    for (rule, key) in &give_backs {
                        inner.blocked.remove(rule, key);
                    }
                    Ok(())
                }
                Err(_) if inner.fail_mode == RedisFailMode::Local => {
                    inner.health.degraded();
                    let refs: SmallVec<[Settlement<'_>; 2]> = local
                        .iter()
                        .map(|(i, s)| Settlement {
                            rule_index: i.rule_index,
                            rule: &i.rule,
                            key: &i.key,
                            params: i.params,
                            window_start: s.window_start,
                            generation: s.generation,
                            reservation_end: s.reservation_end,
                            delta: s.delta,
                        })
                        .collect();
                    inner.fallback.settle_now(&refs);
                    Ok(())
                }
                Err(e) => Err(StoreError::new(format!("settling in Redis failed: {e}"))),
            }
        })
    }

    fn peek_with(
        &self,
        item: &CheckItem<'_>,
        now: Option<u64>,
    ) -> BoxFuture<Result<RuleDecision, StoreError>> {
        let inv = self.invocation(
            Mode::Peek,
            now,
            std::iter::once((item.rule, item.key, item.params, 0, 0, 0, 0)),
        );
        let cmd = match inv {
            Ok(cmd) => cmd,
            Err(e) => return Box::pin(ready(Err(e))),
        };
        let inner = self.inner.clone();
        let local = (inner.fail_mode == RedisFailMode::Local).then(|| OwnedItem::of(item));
        Box::pin(async move {
            let values = match (inner.call(cmd, batch::Kind::Decision).await, &local) {
                (Ok(values), _) => values,
                (Err(_), Some(item)) => {
                    inner.health.degraded();
                    return Ok(inner.fallback.peek_now(&item.item()));
                }
                (Err(e), None) => {
                    return Err(StoreError::new(format!("peeking in Redis failed: {e}")));
                }
            };
            rule_at(&values, 0)
                .ok_or_else(|| StoreError::new("the Redis script answered in an unexpected shape"))
        })
    }
}

impl Inner {
    /// One script call within the timeout; counts the round trip or the failure.
    async fn call(
        self: &Arc<Self>,
        cmd: redis::Cmd,
        kind: batch::Kind,
    ) -> Result<Vec<i64>, String> {
        self.count(
            self.within_timeout(batch::submit(self.clone(), cmd, kind))
                .await,
        )
    }

    /// Waits for a call within the timeout.
    async fn within_timeout(
        &self,
        call: impl Future<Output = batch::Answer>,
    ) -> Result<Vec<i64>, String> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Counts a round trip or a failure.
    fn count(&self, result: Result<Vec<i64>, String>) -> Result<Vec<i64>, String> {
        match &result {
            Ok(_) => self.health.success(),
            Err(e) => self.health.failure(e, self.fail_mode),
        }
        result
    }

    /// One decision within the timeout; counts the round trip or the failure. A decision the
    /// timeout gave up on may still run in Redis: unless the store fails open, its answer is
    /// awaited in the background and what it debited is given back.
    async fn call_check(
        self: &Arc<Self>,
        cmd: redis::Cmd,
        items: &[OwnedItem],
        top_ups: &[u64],
    ) -> Result<Vec<i64>, String> {
        let mut call = Box::pin(batch::submit(self.clone(), cmd, batch::Kind::Decision));
        let result = match tokio::time::timeout(self.timeout, &mut call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                if self.fail_mode != RedisFailMode::Open {
                    // What the call asked for: the costs and their top-ups.
                    let debits: SmallVec<[OwnedItem; 2]> = items
                        .iter()
                        .enumerate()
                        .map(|(n, i)| OwnedItem {
                            cost: i.cost + top_ups.get(n).copied().unwrap_or(0),
                            ..i.clone()
                        })
                        .collect();
                    tokio::spawn(self.clone().return_late_debits(call, debits));
                }
                Err(format!("no answer within {:?}", self.timeout))
            }
        };
        match &result {
            Ok(_) => self.health.success(),
            Err(e) => self.health.failure(e, self.fail_mode),
        }
        result
    }

    /// Awaits a decision that missed the timeout and gives back in Redis what it debited.
    async fn return_late_debits<F>(self: Arc<Self>, call: F, debits: SmallVec<[OwnedItem; 2]>)
    where
        F: Future<Output = batch::Answer>,
    {
        let Ok(Ok(values)) = tokio::time::timeout(LATE_ANSWER_WAIT, call).await else {
            return;
        };
        if values.first() != Some(&1) || values.len() != 2 + debits.len() * FIELDS {
            // Refused (nothing was debited) or not a decision.
            return;
        }
        let returns: SmallVec<[(usize, RuleDecision); 2]> = (0..debits.len())
            .filter_map(|i| {
                let rule = rule_at(&values, i)?;
                (rule.debited && debits[i].cost > 0).then_some((i, rule))
            })
            .collect();
        if returns.is_empty() {
            return;
        }
        let store = RedisStore {
            inner: self.clone(),
        };
        let inv = store.invocation(
            Mode::Settle,
            None,
            returns.iter().map(|(i, rule)| {
                let item = &debits[*i];
                (
                    &*item.rule,
                    &item.key,
                    item.params,
                    rule.window_start,
                    -i64::try_from(item.cost).unwrap_or(i64::MAX),
                    rule.generation,
                    rule.reservation_end,
                )
            }),
        );
        let Ok(cmd) = inv else { return };
        // In order behind what was sent before it, and awaited as long as a late answer:
        // the late answers of a stall arrive together, and their give-backs queue behind
        // the decisions made meanwhile.
        let call = batch::submit(self.clone(), cmd, batch::Kind::Settlement);
        let answer = match tokio::time::timeout(LATE_ANSWER_WAIT, call).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {LATE_ANSWER_WAIT:?}")),
        };
        match self.count(answer) {
            Ok(_) => {
                self.health.late_debit_returned();
                // A refusal decided between the late debit and its return may have
                // blocked the key here: Redis now has room again.
                for &(i, ..) in &returns {
                    self.blocked.remove(&debits[i].rule, &debits[i].key);
                }
            }
            Err(e) => tracing::debug!(
                error = e,
                "rate-limit Redis store: a late decision's debit could not be given back"
            ),
        }
    }

    /// A refusal from the blocked-key cache, when one of the group's rules is blocked (by
    /// a fresh entry, or with `stale_ok` by any entry still blocking).
    fn cached_refusal(&self, items: &[CheckItem<'_>], stale_ok: bool) -> Option<Decision> {
        let cache = &self.blocked;
        if !cache.enabled() {
            return None;
        }
        let now = Instant::now();
        let hits: SmallVec<[Option<Blocked>; 2]> = items
            .iter()
            .map(|i| {
                if i.shadow || i.cost == 0 {
                    None
                } else {
                    cache.get(i.rule, i.key, &i.params, now, stale_ok)
                }
            })
            .collect();
        if hits.iter().all(Option::is_none) {
            return None;
        }
        self.health.hit();
        let micros = |at: Instant| {
            u64::try_from(at.saturating_duration_since(now).as_micros()).unwrap_or(u64::MAX)
        };
        let rules = items
            .iter()
            .zip(&hits)
            .map(|(item, hit)| match hit {
                Some(b) => RuleDecision {
                    verdict: if item.cost > item.params.capacity() {
                        Verdict::Never
                    } else {
                        Verdict::Denied {
                            retry_after: micros(b.until).max(1),
                        }
                    },
                    remaining: 0,
                    reset_micros: micros(b.reset_at),
                    window_start: b.window_start,
                    generation: 0,
                    reservation_end: 0,
                    debited: false,
                },
                // Not known without a round trip: the rule allowed at its last decision.
                None => RuleDecision {
                    verdict: if item.cost > item.params.capacity() {
                        Verdict::Never
                    } else {
                        Verdict::Allowed
                    },
                    remaining: item.params.capacity(),
                    reset_micros: 0,
                    window_start: 0,
                    generation: 0,
                    reservation_end: 0,
                    debited: false,
                },
            })
            .collect();
        Some(Decision {
            admitted: false,
            rules,
        })
    }

    /// The end of a check without top-ups: the decision Redis answered (remembering the
    /// keys it found blocked), or one by the blocked cache or the failure mode.
    fn finish_check(
        &self,
        answer: Result<Vec<i64>, String>,
        owned: &[OwnedItem],
        generations: &[u64],
    ) -> Result<Decision, StoreError> {
        match answer {
            Ok(values) => parse_check(&values, owned)
                .inspect(|(d, blocked)| {
                    self.remember_blocked(owned, d, blocked, generations);
                })
                .map(|(d, _)| d),
            Err(e) => {
                // Redis is away: every entry still blocking refuses, fresh or not.
                let refs: SmallVec<[CheckItem<'_>; 2]> =
                    owned.iter().map(OwnedItem::item).collect();
                match self.cached_refusal(&refs, true) {
                    Some(refusal) => Ok(refusal),
                    None => self.degrade(e, owned),
                }
            }
        }
    }

    /// A decision by the failure mode.
    fn degrade(&self, error: String, items: &[OwnedItem]) -> Result<Decision, StoreError> {
        let refs: SmallVec<[CheckItem<'_>; 2]> = items.iter().map(OwnedItem::item).collect();
        match self.fail_mode {
            RedisFailMode::Closed => Err(StoreError::new(format!("Redis did not decide: {error}"))),
            RedisFailMode::Open => {
                self.health.degraded();
                let rules = refs
                    .iter()
                    .map(|i| RuleDecision {
                        verdict: Verdict::Allowed,
                        remaining: i.params.capacity(),
                        reset_micros: 0,
                        window_start: 0,
                        generation: 0,
                        reservation_end: 0,
                        debited: false,
                    })
                    .collect();
                Ok(Decision {
                    admitted: true,
                    rules,
                })
            }
            RedisFailMode::Local => {
                self.health.degraded();
                let store = &self.fallback;
                let mut decision = store.check_at(&refs, store.now_micros());
                for rule in &mut decision.rules {
                    rule.window_start |= LOCAL_DECISION;
                }
                Ok(decision)
            }
        }
    }

    fn remember_blocked(
        &self,
        items: &[OwnedItem],
        decision: &Decision,
        blocked: &[u64],
        generations: &[u64],
    ) {
        if !self.blocked.enabled() {
            return;
        }
        let now = Instant::now();
        for (((item, rule), &blocked_for), &generation) in items
            .iter()
            .zip(&decision.rules)
            .zip(blocked)
            .zip(generations)
        {
            if blocked_for > 0 && !item.shadow {
                self.blocked.insert(
                    &item.rule,
                    &item.key,
                    Blocked {
                        params: item.params,
                        until: now + Duration::from_micros(blocked_for),
                        fresh_until: now + Duration::from_micros(blocked_for).min(BLOCKED_FRESH),
                        reset_at: now + Duration::from_micros(rule.reset_micros),
                        window_start: rule.window_start,
                    },
                    now,
                    generation,
                );
            }
        }
    }
}

/// A reset's numbers as the script reads them (8 bytes each, little-endian): the time (-1:
/// the server's clock), the grace, and the reset retention (µs).
fn reset_numbers(time: i64, grace: i64, retention: i64) -> [u8; 24] {
    let mut out = [0; 24];
    out[..8].copy_from_slice(&time.to_le_bytes());
    out[8..16].copy_from_slice(&grace.to_le_bytes());
    out[16..].copy_from_slice(&retention.to_le_bytes());
    out
}

/// Runs the script (`EVALSHA`), loading it first when Redis does not know it (`NOSCRIPT`,
/// after a restart or `SCRIPT FLUSH`), and decodes its answer.
async fn eval(conn: Conn, cmd: &redis::Cmd) -> redis::RedisResult<Vec<i64>> {
    use crate::redis_batch::eval_loading;
    let answer: redis::Value = match conn {
        Conn::Single(mut c) => eval_loading(&mut c, &SCRIPT, cmd).await?,
        Conn::Cluster(mut c) => eval_loading(&mut c, &SCRIPT, cmd).await?,
    };
    match answer {
        redis::Value::BulkString(text) => decode_answer(&text),
        _ => None,
    }
    .ok_or_else(|| {
        redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "the Redis script answered in an unexpected shape",
        ))
    })
}

/// The integers of the script's answer: 8 bytes each, little-endian two's complement, as
/// the script's `struct.pack('<i8...')` writes them. A length that is not a multiple of 8
/// is `None`; every other text is exactly one sequence of integers.
fn decode_answer(text: &[u8]) -> Option<Vec<i64>> {
    let words = text.chunks_exact(8);
    if !words.remainder().is_empty() {
        return None;
    }
    Some(
        words
            .map(|w| i64::from_le_bytes(w.try_into().unwrap_or_default()))
            .collect(),
    )
}

/// Fields per rule in the script's answer.
const FIELDS: usize = 9;

fn rule_at(values: &[i64], i: usize) -> Option<RuleDecision> {
    let f = values.get(2 + i * FIELDS..2 + (i + 1) * FIELDS)?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    let verdict = match f[0] {
        0 => Verdict::Allowed,
        1 => Verdict::Denied {
            retry_after: n(f[1]),
        },
        _ => Verdict::Never,
    };
    Some(RuleDecision {
        verdict,
        remaining: n(f[2]),
        reset_micros: n(f[3]),
        window_start: n(f[4]),
        debited: f[5] == 1,
        generation: u32::try_from(f[7]).unwrap_or(0),
        reservation_end: n(f[8]),
    })
}

fn parse_check(
    values: &[i64],
    items: &[OwnedItem],
) -> Result<(Decision, SmallVec<[u64; 2]>), StoreError> {
    let shape = || StoreError::new("the Redis script answered in an unexpected shape");
    if values.len() != 2 + items.len() * FIELDS {
        return Err(shape());
    }
    let mut rules = SmallVec::new();
    let mut blocked = SmallVec::new();
    for i in 0..items.len() {
        rules.push(rule_at(values, i).ok_or_else(shape)?);
        blocked.push(u64::try_from(values[2 + i * FIELDS + 6]).unwrap_or(0));
    }
    Ok((
        Decision {
            admitted: values[0] == 1,
            rules,
        },
        blocked,
    ))
}

/// The rule's name as it appears in a Redis key: without `:` (so no rule and key pair can
/// spell another's key), `{` or `}` (so the hash tag stays the rate key's).
fn encode_rule(rule: &str) -> std::borrow::Cow<'_, str> {
    if !rule.contains(['%', ':', '{', '}']) {
        return std::borrow::Cow::Borrowed(rule);
    }
    std::borrow::Cow::Owned(
        rule.replace('%', "%25")
            .replace(':', "%3A")
            .replace('{', "%7B")
            .replace('}', "%7D"),
    )
}

/// Writes the rate key as it appears in a Redis key: readable, without braces (so it can
/// be a hash tag), and a header's value only as a digest.
fn write_key(out: &mut String, key: &RateKey) {
    match key {
        RateKey::Global => out.push_str("global"),
        RateKey::Ip(ip) => {
            let _ = write!(out, "ip:{ip}");
        }
        RateKey::ApiKey(id) => {
            let _ = write!(out, "key:{id}");
        }
        RateKey::Principal(p) => {
            out.push_str("principal:");
            for c in p.chars() {
                match c {
                    '%' => out.push_str("%25"),
                    '{' => out.push_str("%7B"),
                    '}' => out.push_str("%7D"),
                    c => out.push(c),
                }
            }
        }
        RateKey::Header(h) => {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(h.as_bytes());
            out.push_str("header:");
            for b in &digest[..16] {
                let _ = write!(out, "{b:02x}");
            }
        }
        RateKey::Anonymous => out.push_str("anonymous"),
    }
}

impl Store for RedisStore {
    type CheckFuture = BoxFuture<Result<Decision, StoreError>>;

    fn check(&self, items: &[CheckItem<'_>]) -> Self::CheckFuture {
        self.check_with(items, None)
    }

    fn check_now(&self, items: &[CheckItem<'_>]) -> Option<Result<Decision, StoreError>> {
        let leases = &self.inner.leases;
        if leases.enabled() {
            if let Some(leased) = leases.answer(items, When::Local(Instant::now())) {
                return Some(Ok(leased));
            }
        }
        self.inner
            .cached_refusal(items, self.inner.health.unhealthy())
            .map(Ok)
    }

    fn check_one_now(&self, item: &CheckItem<'_>) -> Option<Result<RuleDecision, StoreError>> {
        // Only an answer from a lease: a refusal goes through `check_now`, as before.
        let leases = &self.inner.leases;
        if !leases.enabled() {
            return None;
        }
        let leased = leases.answer(std::slice::from_ref(item), When::Local(Instant::now()))?;
        leased.rules.first().copied().map(Ok)
    }

    fn settle(&self, settlements: &[Settlement<'_>]) -> BoxFuture<Result<(), StoreError>> {
        self.settle_with(settlements, None)
    }

    fn peek(&self, item: &CheckItem<'_>) -> BoxFuture<Result<RuleDecision, StoreError>> {
        self.peek_with(item, None)
    }

    fn reset(
        &self,
        rule_index: u32,
        rule: &str,
        key: &RateKey,
    ) -> BoxFuture<Result<(), StoreError>> {
        self.reset_with(rule_index, rule, key, None)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::decode_answer;

    /// What the script's `struct.pack('<' .. rep('i8', n), ...)` writes for these integers.
    fn encode(values: &[i64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn the_answer_decodes_the_extremes_and_the_batch_marker() {
        let values = [
            0,
            -1,
            1,
            i64::MIN,
            i64::MAX,
            (1 << 53) - 1,
            1 << 53,
            -(1 << 53),
            4_294_967_295,
        ];
        assert_eq!(decode_answer(&encode(&values)), Some(values.to_vec()));
        assert_eq!(decode_answer(b""), Some(Vec::new()));
    }

    #[test]
    fn an_answer_of_a_length_not_a_multiple_of_8_is_refused() {
        for len in [1, 7, 9, 15, 17] {
            assert_eq!(decode_answer(&vec![0; len]), None, "{len} bytes");
        }
    }

    #[tokio::test]
    async fn key_names_keep_their_shape_for_both_hash_tags() {
        use super::{HashTag, RateKey, RedisStore};
        // nothing listens here: building tries to connect, is refused and still succeeds
        let store = |tag| {
            RedisStore::builder()
                .url("redis://127.0.0.1:1/")
                .prefix("p")
                .hash_tag(tag)
                .build()
        };
        let by_key = store(HashTag::Key).await.unwrap();
        let fixed = store(HashTag::Fixed("t".into())).await.unwrap();
        let principal = RateKey::principal("a}b");
        assert_eq!(
            by_key.key_name("r:1", &principal),
            "p:r%3A1:{principal:a%7Db}"
        );
        assert_eq!(
            fixed.key_name("r:1", &principal),
            "p:{t}:r%3A1:principal:a%7Db"
        );
        assert_eq!(by_key.key_name("r", &RateKey::Global), "p:r:{global}");
    }

    proptest! {
        #[test]
        fn any_integers_round_trip(values in prop::collection::vec(any::<i64>(), 0..300)) {
            prop_assert_eq!(decode_answer(&encode(&values)), Some(values));
        }

        /// A batch's answer: each call's part after its length, or -1 for a call that
        /// failed, every integer as exact as alone.
        #[test]
        fn a_batch_answer_round_trips(
            calls in prop::collection::vec(
                prop::option::of(prop::collection::vec(-(1i64 << 53)..=(1i64 << 53), 0..40)),
                1..64,
            ),
        ) {
            let mut flat = Vec::new();
            for call in &calls {
                match call {
                    Some(part) => {
                        flat.push(i64::try_from(part.len()).unwrap_or(i64::MAX));
                        flat.extend_from_slice(part);
                    }
                    None => flat.push(-1),
                }
            }
            prop_assert_eq!(decode_answer(&encode(&flat)), Some(flat));
        }

        #[test]
        fn any_bytes_are_refused_or_read_exactly(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            // never a panic, and the bytes read are the ones their integers write
            match decode_answer(&bytes) {
                Some(values) => prop_assert_eq!(encode(&values), bytes),
                None => prop_assert_ne!(bytes.len() % 8, 0),
            }
        }
    }
}
