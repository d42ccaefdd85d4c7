//! [`RedisSink`]: a capped stream of usage records and live daily aggregates in Redis.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::ConnectionLike;

use super::backlog::{Backlog, Failure, Limits, SinkHealth, Store};
use super::{SinkError, UsageSink};
use crate::cost::pricing::Money;
use crate::cost::record::UsageRecord;
use crate::cost::summary::{Day, Subject, Summary, Totals};
use crate::key::ApiKeyId;

/// How the sink names, caps, keeps and buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisSinkConfig {
    /// The hash tag every key carries (without braces; an empty one means `usage`, since
    /// Redis Cluster ignores an empty `{}`).
    pub hash_tag: String,
    /// The stream is trimmed to about this many entries.
    pub stream_max_len: u64,
    /// How long a record id is remembered, so a retried batch counts once.
    pub dedupe_ttl: Duration,
    /// How long a day's aggregates are kept after their last update.
    pub retention: Duration,
    /// Records per script call.
    pub max_batch: usize,
    /// Records kept while Redis is away; more are dropped and counted.
    pub max_buffer: usize,
    /// One call gives up after this (and is retried).
    pub timeout: Duration,
    /// The longest wait between retries while Redis is away.
    pub max_backoff: Duration,
    /// The dead-letter stream (records Redis refused, with the error) is trimmed to about
    /// this many entries.
    pub dead_letter_max_len: u64,
}

impl Default for RedisSinkConfig {
    /// Tag `usage`, a stream of about 1 000 000 records, ids remembered a day, aggregates
    /// kept 40 days, batches of 500, 100 000 records buffered, 5 s timeout, backoff up to
    /// 30 s, a dead-letter stream of about 10 000 records.
    fn default() -> Self {
        Self {
            hash_tag: "usage".to_owned(),
            stream_max_len: 1_000_000,
            dedupe_ttl: Duration::from_secs(86_400),
            retention: Duration::from_secs(40 * 86_400),
            max_batch: 500,
            max_buffer: 100_000,
            timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
            dead_letter_max_len: 10_000,
        }
    }
}

/// A snapshot of the sink's state (the shared [`SinkHealth`]; this name is kept so code
/// written against it still builds).
pub type RedisSinkHealth = SinkHealth;

pub(crate) struct Inner<C> {
    conn: C,
    config: RedisSinkConfig,
    prefix: String,
    script: Script,
    dead_letter: Script,
    backlog: Backlog,
}

/// Usage records in Redis (feature `redis`): a capped stream plus daily aggregates. Cheap
/// to clone.
///
/// Each batch is one script call, one round trip. For every record not seen before it
///
/// - appends the record (as JSON, with its [`RecordId`](crate::cost::RecordId)) to the
///   stream `palisade:usage:{<tag>}:stream`, capped near `stream_max_len` entries
///   (`XADD MAXLEN ~`);
/// - adds its requests, every token class, its cost (whole dollars and the pico-dollars
///   below one in two counters, carried in the script, so sums stay exact past 64 bits of
///   pico-dollars) and its unpriced,
///   incomplete and error counts, per model, to the daily hashes of everything
///   (`…:day:<n>:all`), its user (`…:user:<id>`), its hashed API key (`…:key:<hex>`), its
///   bot (`…:bot:<id>`), or `…:anon` when it has neither user nor key (`<n>` counts UTC
///   days since 1970-01-01); a record with a key and no user also counts in
///   `…:keyonly:<hex>`, what the key ranks with in [`top`](RedisSink::top);
/// - notes the subject it ranks under in the day's set (`…:day:<n>:subjects`).
///
/// A record counts once: the script sets a dedupe key per record id (`…:seen:<id>`, kept
/// for `dedupe_ttl`) in the same call, so a batch sent again after a lost answer changes
/// nothing. A record is stored whole or not at all: it is marked seen only once all its
/// writes have succeeded, and a write that fails (a key of another type, a counter that
/// would overflow) undoes the record's earlier writes. Such a record can never be stored
/// as it is, so it is set aside in the dead-letter stream
/// ([`dead_letter_key`](RedisSink::dead_letter_key), capped near `dead_letter_max_len`
/// entries: the record's id, its JSON and the error), counted in
/// [`SinkHealth::dead_lettered`] and logged, and the records behind it flow on. Every key
/// carries the same hash tag (`usage` unless [`hash_tag`] says otherwise), so on a Redis
/// Cluster a call touches one slot.
///
/// While Redis is away (no answer, a lost connection, a timeout, or an answer that says
/// wait: `LOADING`, `BUSY`, `READONLY`, `MASTERDOWN`, `TRYAGAIN`, `CLUSTERDOWN`, `OOM`,
/// `MISCONF`, `NOPERM`, `ERR max number of clients reached`, …), records wait in a
/// bounded buffer and are retried with backoff; a record that does not fit is dropped
/// and counted. [`RedisSink::health`] shows the backlog, the
/// counters and the last error:
/// `accepted = delivered + dead_lettered + dropped + backlog`.
///
/// [`summary`](RedisSink::summary) and [`top`](RedisSink::top) read the aggregates back,
/// by whole UTC days; they equal [`summarize`](crate::cost::summary::summarize) and
/// [`top`](crate::cost::summary::top) over the same records for windows that start and end
/// at midnight UTC.
///
/// [`hash_tag`]: RedisSinkConfig::hash_tag
///
/// ```no_run
/// use palisade::cost::sink::{RedisSink, RedisSinkConfig};
/// use palisade::cost::{RecorderConfig, UsageRecorder};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let client = redis::Client::open("redis://127.0.0.1:6379/").unwrap();
/// let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
/// let sink = RedisSink::new(conn, RedisSinkConfig::default());
/// let (recorder, shutdown) = UsageRecorder::spawn(sink.clone(), RecorderConfig::default());
/// # drop(recorder);
/// shutdown.shutdown().await;
/// println!("{:?}", sink.health());
/// # }
/// ```
pub struct RedisSink<C> {
    inner: Arc<Inner<C>>,
}

impl<C> Clone for RedisSink<C> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C> fmt::Debug for RedisSink<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSink")
            .field("config", &self.inner.config)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

/// Error codes with which Redis says "not now" rather than "never": the records wait.
const PASSING: &[&str] = &[
    "LOADING",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "OOM",
    "NOREPLICAS",
    "NOPERM",
    "NOAUTH",
    "WRONGPASS",
    "NOSCRIPT",
    "UNBLOCKED",
    // a failed snapshot stops writes until the disk is back
    "MISCONF",
];

/// Whether an error answer with `code` and `message` says "not now": its code is in
/// [`PASSING`], or it is the generic `ERR` of a server at its client limit.
fn passing(code: &str, message: &str) -> bool {
    PASSING.contains(&code) || (code == "ERR" && message.contains("max number of clients"))
}

/// An error from Redis: lasting ([`SinkError::Rejected`]) when the server answered with an
/// error that is not [`passing`], else passing.
fn redis_error(e: redis::RedisError) -> SinkError {
    let message = e.to_string();
    match e.code() {
        Some(code) if !passing(code, &message) => SinkError::Rejected(message),
        _ => SinkError::Unavailable(message),
    }
}

/// An error a script met on one of its own writes (`WRONGTYPE Operation against …`),
/// classified by its code as [`redis_error`] does.
fn script_error(err: &str) -> SinkError {
    let code = err.split_whitespace().next().unwrap_or("");
    if passing(code, err) {
        SinkError::Unavailable(err.to_owned())
    } else {
        SinkError::Rejected(err.to_owned())
    }
}

/// UTC days since 1970-01-01.
fn day_number(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs() / 86_400).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs().div_ceil(86_400)).unwrap_or(i64::MAX),
    }
}

/// The subject a record ranks under in [`RedisSink::top`], as a set member.
fn rank_member(r: &UsageRecord) -> String {
    let a = &r.attribution;
    match (&a.user, a.api_key) {
        (Some(u), _) => format!("user:{u}"),
        (None, Some(k)) => format!("key:{k}"),
        (None, None) => "anon".to_owned(),
    }
}

fn subject_suffix(subject: &Subject) -> Result<String, SinkError> {
    Ok(match subject {
        Subject::All => "all".to_owned(),
        Subject::User(u) => format!("user:{u}"),
        Subject::ApiKey(k) => format!("key:{k}"),
        Subject::Bot(b) => format!("bot:{b}"),
        Subject::Anonymous => "anon".to_owned(),
        _ => {
            return Err(SinkError::Rejected(format!(
                "the Redis sink keeps no aggregates for {subject:?}"
            )));
        }
    })
}

fn parse_member(member: &str) -> Result<Subject, SinkError> {
    if let Some(u) = member.strip_prefix("user:") {
        return Ok(Subject::User(u.to_owned()));
    }
    if member == "anon" {
        return Ok(Subject::Anonymous);
    }
    let bad = || SinkError::Rejected(format!("`{member}` is not a usage subject"));
    let hex = member.strip_prefix("key:").ok_or_else(bad)?;
    if hex.len() != 32 || !hex.is_ascii() {
        return Err(bad());
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(Subject::ApiKey(ApiKeyId::from_bytes(bytes)))
}

/// Pico-dollars in a dollar: costs are kept in Redis as whole dollars plus the pico-dollars
/// below one, so no 64-bit hash counter overflows (i64::MAX pico-dollars is only about
/// $9.2 million).
const PICOS_PER_DOLLAR: u128 = 1_000_000_000_000;

/// The 12 counters the script adds, in its order (the cost as pico-dollars below a dollar
/// at 7, whole dollars at 11). A count past `i64::MAX` (what a Redis counter holds) is
/// refused, so the record is set aside whole rather than counted short.
fn counters(r: &UsageRecord) -> Result<[i64; 12], SinkError> {
    let mut t = Totals::default();
    t.add(r);
    let u = &t.usage;
    let counts: [u128; 12] = [
        t.requests.into(),
        u.input_tokens.into(),
        u.output_tokens.into(),
        u.cache_write_5m_tokens.into(),
        u.cache_write_1h_tokens.into(),
        u.cache_read_tokens.into(),
        u.web_search_requests.into(),
        t.cost.picos() % PICOS_PER_DOLLAR,
        t.unpriced.into(),
        t.incomplete.into(),
        t.errors.into(),
        t.cost.picos() / PICOS_PER_DOLLAR,
    ];
    let mut out = [0; 12];
    for (o, n) in out.iter_mut().zip(counts) {
        *o = i64::try_from(n).map_err(|_| {
            SinkError::Rejected(format!(
                "usage record {}: the count {n} is past what a Redis counter holds ({})",
                r.id,
                i64::MAX
            ))
        })?;
    }
    Ok(out)
}

/// Adds one aggregate hash (`<counter>:<model>` → value) into per-model totals.
fn read_hash(hash: HashMap<String, i64>, by_model: &mut BTreeMap<String, Totals>) {
    for (field, value) in hash {
        let Some((c, model)) = field.split_once(':') else {
            continue;
        };
        let v = u64::try_from(value).unwrap_or(0);
        let t = by_model.entry(model.to_owned()).or_default();
        match c {
            "0" => t.requests += v,
            "1" => t.usage.input_tokens += v,
            "2" => t.usage.output_tokens += v,
            "3" => t.usage.cache_write_5m_tokens += v,
            "4" => t.usage.cache_write_1h_tokens += v,
            "5" => t.usage.cache_read_tokens += v,
            "6" => t.usage.web_search_requests += v,
            "7" => t.cost = t.cost.saturating_add(Money::from_picos(u128::from(v))),
            "8" => t.unpriced += v,
            "9" => t.incomplete += v,
            "10" => t.errors += v,
            "11" => {
                let picos = u128::from(v).saturating_mul(PICOS_PER_DOLLAR);
                t.cost = t.cost.saturating_add(Money::from_picos(picos));
            }
            _ => {}
        }
    }
}

fn add_totals(into: &mut Totals, t: &Totals) {
    into.requests += t.requests;
    into.usage.add(&t.usage);
    into.cost = into.cost.saturating_add(t.cost);
    into.unpriced += t.unpriced;
    into.incomplete += t.incomplete;
    into.errors += t.errors;
}

impl<C> RedisSink<C> {
    /// A sink over `conn` (a `ConnectionManager`, or a cluster connection).
    pub fn new(conn: C, config: RedisSinkConfig) -> Self {
        let mut tag = config.hash_tag.replace(['{', '}'], "");
        if tag.is_empty() {
            // `{}` is no hash tag to Redis Cluster: the keys would spread over slots
            tag = RedisSinkConfig::default().hash_tag;
        }
        Self {
            inner: Arc::new(Inner {
                conn,
                prefix: format!("palisade:usage:{{{tag}}}"),
                script: Script::new(include_str!("redis_record.lua")),
                dead_letter: Script::new(include_str!("redis_dead_letter.lua")),
                backlog: Backlog::new(
                    "Redis sink",
                    Limits {
                        max_batch: config.max_batch,
                        max_buffer: config.max_buffer,
                        max_backoff: config.max_backoff,
                    },
                ),
                config,
            }),
        }
    }

    /// The backlog, the counters and the last error.
    pub fn health(&self) -> SinkHealth {
        self.inner.backlog.health()
    }

    /// The stream's key.
    pub fn stream_key(&self) -> String {
        format!("{}:stream", self.inner.prefix)
    }

    /// The dead-letter stream's key: records Redis refused for a lasting reason, each an
    /// entry with fields `id`, `record` (its JSON, as in the stream) and `error`.
    pub fn dead_letter_key(&self) -> String {
        format!("{}:dead", self.inner.prefix)
    }

    fn day_key(&self, day: i64, suffix: &str) -> String {
        format!("{}:day:{day}:{suffix}", self.inner.prefix)
    }
}

impl<C> RedisSink<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Runs the script over `batch`; returns how many records were new.
    async fn write(&self, batch: &[UsageRecord]) -> Result<u64, Failure> {
        let c = &self.inner.config;
        let mut inv = self.inner.script.prepare_invoke();
        inv.key(self.stream_key())
            .arg(c.stream_max_len)
            .arg(c.dedupe_ttl.as_secs().max(1))
            .arg(c.retention.as_secs().max(1))
            .arg(batch.len());
        for r in batch {
            let day = day_number(r.time);
            let a = &r.attribution;
            let mut aggregates = vec![self.day_key(day, "all")];
            if let Some(u) = &a.user {
                aggregates.push(self.day_key(day, &format!("user:{u}")));
            }
            if let Some(k) = a.api_key {
                aggregates.push(self.day_key(day, &format!("key:{k}")));
            }
            if let Some(b) = &a.bot {
                aggregates.push(self.day_key(day, &format!("bot:{b}")));
            }
            match (&a.user, a.api_key) {
                (None, None) => aggregates.push(self.day_key(day, "anon")),
                // what the key ranks with in `top`: its records without a user
                (None, Some(k)) => aggregates.push(self.day_key(day, &format!("keyonly:{k}"))),
                (Some(_), _) => {}
            }
            let json = serde_json::to_string(r)
                .map_err(|e| SinkError::Rejected(format!("record not serializable: {e}")))?;
            inv.key(format!("{}:seen:{}", self.inner.prefix, r.id))
                .key(self.day_key(day, "subjects"));
            for key in &aggregates {
                inv.key(key);
            }
            inv.arg(r.id.to_string())
                .arg(json)
                .arg(rank_member(r))
                .arg(aggregates.len())
                .arg(r.model.as_deref().unwrap_or("unknown"));
            for v in counters(r)? {
                inv.arg(v);
            }
        }
        let mut conn = self.inner.conn.clone();
        let call = inv.invoke_async::<redis::Value>(&mut conn);
        let answer = match tokio::time::timeout(c.timeout, call).await {
            Ok(result) => result.map_err(redis_error)?,
            Err(_) => {
                return Err(SinkError::Unavailable(format!(
                    "Redis did not answer within {:?}",
                    c.timeout
                ))
                .into());
            }
        };
        script_answer(answer, batch)
    }

    /// Sets `record` aside in the dead-letter stream, once per record id.
    async fn set_aside(&self, record: &UsageRecord, error: &str) -> Result<bool, SinkError> {
        let c = &self.inner.config;
        let json = serde_json::to_string(record)
            .map_err(|e| SinkError::Rejected(format!("record not serializable: {e}")))?;
        let mut inv = self.inner.dead_letter.prepare_invoke();
        inv.key(self.dead_letter_key())
            .key(format!("{}:dead:{}", self.inner.prefix, record.id))
            .arg(c.dead_letter_max_len)
            .arg(c.dedupe_ttl.as_secs().max(1))
            .arg(record.id.to_string())
            .arg(json)
            .arg(error);
        let mut conn = self.inner.conn.clone();
        let call = inv.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(c.timeout, call).await {
            Ok(result) => result.map(|n| n == 1).map_err(redis_error),
            Err(_) => Err(SinkError::Unavailable(format!(
                "Redis did not answer within {:?}",
                c.timeout
            ))),
        }
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> Result<T, SinkError> {
        let mut conn = self.inner.conn.clone();
        let timeout = self.inner.config.timeout;
        match tokio::time::timeout(timeout, pipe.query_async::<T>(&mut conn)).await {
            Ok(r) => r.map_err(redis_error),
            Err(_) => Err(SinkError::Unavailable(format!(
                "Redis did not answer within {timeout:?}"
            ))),
        }
    }

    /// Per-day, per-model totals of the aggregate `suffix` for days `from..to`.
    async fn days(
        &self,
        suffix: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<(i64, BTreeMap<String, Totals>)>, SinkError> {
        if from >= to {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for day in from..to {
            pipe.cmd("HGETALL").arg(self.day_key(day, suffix));
        }
        let hashes: Vec<HashMap<String, i64>> = self.query(&pipe).await?;
        Ok((from..to)
            .zip(hashes)
            .map(|(day, hash)| {
                let mut by_model = BTreeMap::new();
                read_hash(hash, &mut by_model);
                (day, by_model)
            })
            .collect())
    }

    /// Totals of `subject`'s records by whole UTC days: from the day of `from` up to, not
    /// including, the day of `to` (both rounded down to midnight UTC). Conversations have
    /// no aggregates (`Err`).
    pub async fn summary(
        &self,
        subject: &Subject,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Summary, SinkError> {
        let suffix = subject_suffix(subject)?;
        let mut s = Summary {
            subject: subject.clone(),
            total: Totals::default(),
            by_model: BTreeMap::new(),
            by_day: BTreeMap::new(),
        };
        for (day, by_model) in self.days(&suffix, day_number(from), day_number(to)).await? {
            for (model, t) in by_model {
                add_totals(&mut s.total, &t);
                add_totals(s.by_day.entry(Day::from_days(day)).or_default(), &t);
                add_totals(s.by_model.entry(model).or_default(), &t);
            }
        }
        Ok(s)
    }

    /// The `n` users (else API keys) that cost the most, by whole UTC days as in
    /// [`summary`](Self::summary), highest first, ties by subject. Reads the totals of
    /// every subject active in the window.
    pub async fn top(
        &self,
        n: usize,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<(Subject, Totals)>, SinkError> {
        let (from, to) = (day_number(from), day_number(to));
        if from >= to || n == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for day in from..to {
            pipe.cmd("SMEMBERS").arg(self.day_key(day, "subjects"));
        }
        let sets: Vec<Vec<String>> = self.query(&pipe).await?;
        let members: Vec<(i64, String)> = (from..to)
            .zip(sets)
            .flat_map(|(day, set)| set.into_iter().map(move |m| (day, m)))
            .collect();
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (day, member) in &members {
            let hash = match member.strip_prefix("key:") {
                Some(k) => self.day_key(*day, &format!("keyonly:{k}")),
                None => self.day_key(*day, member),
            };
            pipe.cmd("HGETALL").arg(hash);
        }
        let hashes: Vec<HashMap<String, i64>> = self.query(&pipe).await?;
        let mut by: BTreeMap<String, Totals> = BTreeMap::new();
        for ((_, member), hash) in members.into_iter().zip(hashes) {
            let mut by_model = BTreeMap::new();
            read_hash(hash, &mut by_model);
            let total = by.entry(member).or_default();
            for t in by_model.values() {
                add_totals(total, t);
            }
        }
        let mut v = by
            .into_iter()
            .map(|(m, t)| parse_member(&m).map(|s| (s, t)))
            .collect::<Result<Vec<_>, _>>()?;
        v.sort_by(|(sa, a), (sb, b)| b.cost.cmp(&a.cost).then_with(|| sa.cmp(sb)));
        v.truncate(n);
        Ok(v)
    }
}

impl<C> UsageSink for RedisSink<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Buffers `batch` (dropping and counting what does not fit) and writes the buffer.
    /// Redis being away is not an error here: the records wait and are retried with
    /// backoff (by a timer of their own while the sink lives, on the next batch, or at
    /// [`flush`](UsageSink::flush)).
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        self.inner.backlog.record_batch(self, batch).await
    }

    /// Writes everything buffered now (no backoff); `Err` when Redis is still away (the
    /// backlog stays in [`health`](RedisSink::health)).
    async fn flush(&self) -> Result<(), SinkError> {
        self.inner.backlog.flush(self).await
    }
}

impl<C> Store for RedisSink<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    type Weak = std::sync::Weak<Inner<C>>;

    fn backlog(&self) -> &Backlog {
        &self.inner.backlog
    }

    fn downgrade(&self) -> Self::Weak {
        Arc::downgrade(&self.inner)
    }

    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    fn store(&self, batch: &[UsageRecord]) -> impl Future<Output = Result<u64, Failure>> + Send {
        self.write(batch)
    }

    fn dead_letter(
        &self,
        record: &UsageRecord,
        error: &str,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send {
        self.set_aside(record, error)
    }
}

/// The record script's answer: how many records were new, or where it stopped and why.
fn script_answer(answer: redis::Value, batch: &[UsageRecord]) -> Result<u64, Failure> {
    use redis::Value;
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let unexpected = || {
        Failure::from(SinkError::Unavailable(format!(
            "unexpected answer from the usage script: {answer:?}"
        )))
    };
    match &answer {
        Value::Int(_) => int(&answer).ok_or_else(unexpected),
        Value::Array(parts) if parts.len() == 3 => {
            let (Some(fresh), Some(at), Some(err)) =
                (int(&parts[0]), int(&parts[1]), text(&parts[2]))
            else {
                return Err(unexpected());
            };
            let at = usize::try_from(at).unwrap_or(usize::MAX);
            let Some(record) = batch.get(at) else {
                return Err(unexpected());
            };
            let error = match script_error(&err) {
                SinkError::Rejected(e) => {
                    SinkError::Rejected(format!("usage record {} not stored: {e}", record.id))
                }
                other => other,
            };
            Err(Failure {
                error,
                stored: at,
                fresh,
                pinpointed: true,
            })
        }
        _ => Err(unexpected()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_counted_from_the_epoch_in_utc() {
        assert_eq!(day_number(UNIX_EPOCH), 0);
        assert_eq!(day_number(UNIX_EPOCH + Duration::from_secs(86_399)), 0);
        assert_eq!(day_number(UNIX_EPOCH + Duration::from_secs(86_400)), 1);
        assert_eq!(day_number(UNIX_EPOCH - Duration::from_secs(1)), -1);
        assert_eq!(
            Day::from_days(day_number(
                UNIX_EPOCH + Duration::from_secs(20_417 * 86_400 + 5)
            ))
            .to_string(),
            "2025-11-25"
        );
    }

    /// Redis Cluster hashes the whole key when its first `{…}` is empty, so an empty tag
    /// would scatter one script's keys over slots (CROSSSLOT).
    #[test]
    fn an_empty_hash_tag_falls_back_to_the_default() {
        for tag in ["", "{}", "}{"] {
            let config = RedisSinkConfig {
                hash_tag: tag.to_owned(),
                ..RedisSinkConfig::default()
            };
            let sink = RedisSink::new((), config);
            assert_eq!(
                sink.stream_key(),
                "palisade:usage:{usage}:stream",
                "{tag:?}"
            );
        }
    }

    /// Answers that say "not now" keep the records waiting; a refusal of the record
    /// itself sets it aside.
    #[test]
    fn passing_and_lasting_answers_are_told_apart() {
        for err in [
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable",
            "ERR max number of clients reached",
            "LOADING Redis is loading the dataset in memory",
            "READONLY You can't write against a read only replica.",
            "OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            assert!(script_error(err).is_retryable(), "{err}");
        }
        for err in [
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR increment or decrement would overflow",
            "ERR string exceeds maximum allowed size (proto-max-bulk-len)",
        ] {
            assert!(!script_error(err).is_retryable(), "{err}");
        }
    }

    #[test]
    fn rank_members_parse_back() {
        let key = ApiKeyId::from_key("sk-1");
        for s in [
            Subject::User("a:b c".into()),
            Subject::ApiKey(key),
            Subject::Anonymous,
        ] {
            assert_eq!(parse_member(&subject_suffix(&s).unwrap()).unwrap(), s);
        }
        assert!(parse_member("key:zz").is_err());
        assert!(subject_suffix(&Subject::Conversation("c".into())).is_err());
    }
}
