//! [`PostgresSink`]: the usage and audit ledger in PostgreSQL (feature `postgres`).
//!
//! Tables (created by [`PostgresSink::migrate`], versioned in
//! `palisade_schema_migrations`, each applied once under an advisory lock, so running the
//! migrations again or from several instances at once is a no-op):
//!
//! - `usage_logs`: one row per [`UsageRecord`] — user, hashed API key, bot, conversation,
//!   route, model, every token class, cost in pico-dollars, status, stream, completion,
//!   durations, request id, time and the fallback the response came from, if any
//!   (`fallback`, NULL otherwise) — with the record's server-made id
//!   ([`RecordId`](crate::cost::RecordId), column `record_id`, `UNIQUE`) as the
//!   idempotency key. The request id is kept as data: a client may choose it, so it is
//!   never a key. Indexed by user and time, and by request id.
//! - `audit_logs`: security events ([`AuditEvent`]): actor, action, target, outcome.
//! - `usage_dead_letters`: records the server refused for a lasting reason (a constraint
//!   or a value it cannot store), each with its id, the record as JSON and the error.
//! - `usage_batches`: the id of each batch the sink stored, with how many of its records
//!   were new, kept a day (the sink deletes older rows now and then).
//! - `user_usage_stats`: a materialized view per user and UTC day, refreshed by
//!   `SELECT refresh_user_usage_stats()` ([`PostgresSink::refresh_stats`]).
//! - Row-level security: a session in the role `palisade_user` that sets `app.user_id`
//!   sees only that user's `usage_logs` rows (the sink's own role, the tables' owner, sees
//!   all). `app.user_id` is not a credential: any session in `palisade_user` may set it
//!   to any user, by design, so it isolates users only when your application opens the
//!   session and sets it (`SET LOCAL app.user_id` in each transaction); never give an end
//!   user a SQL session in that role. Only `usage_logs` is granted to it: `audit_logs`,
//!   `usage_dead_letters` (every user's refused records), `usage_batches` and
//!   `user_usage_stats` (a materialized view has no row-level security) are not.
//!
//! Writes are batched: each batch is one statement, `INSERT … SELECT FROM UNNEST(…) ON
//! CONFLICT (record_id) DO NOTHING` that also notes the batch's id and how many of its
//! records were new in `usage_batches`, in the same transaction. A record already stored
//! adds no row and counts in [`SinkHealth::duplicates`]; a batch whose commit landed but
//! whose answer was lost (the connection dropped) is sent again under the same id and
//! answers the count of its first store, so the sink's own retry counts no duplicate.
//! While the server is away (no connection, a timeout, a server
//! shutting down or read-only, a missing table until the migrations run), records wait in
//! a bounded buffer and are retried with backoff; a record that does not fit is dropped
//! and counted. A batch the server refuses for a lasting reason (a data exception, SQLSTATE
//! class 22; a constraint, class 23; a program limit, class 54) is split until the records
//! at fault are found, and a record with a cost or token count past its `bigint` column
//! (a cost past about $9.2 million) is refused before it is sent: those go to
//! `usage_dead_letters`, counted in [`SinkHealth::dead_lettered`] and logged, and the
//! rest are stored.
//! [`PostgresSink::health`] shows the backlog, the counters and the last error:
//! `accepted = delivered + dead_lettered + dropped + backlog` at all times.
//!
//! ```no_run
//! use palisade::cost::sink::{PostgresConfig, PostgresSink};
//! use palisade::cost::{RecorderConfig, UsageRecorder};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sink = PostgresSink::connect(PostgresConfig::new("postgres://palisade@127.0.0.1/ledger")).unwrap();
//! sink.migrate().await.unwrap();
//! let (recorder, shutdown) = UsageRecorder::spawn(sink.clone(), RecorderConfig::default());
//! # drop(recorder);
//! shutdown.shutdown().await;
//! println!("{:?}", sink.health());
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use serde::Serialize;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::backlog::{Backlog, Failure, Limits, SinkHealth, Store};
use super::{SinkError, UsageSink};
use crate::cost::pricing::Money;
use crate::cost::record::{Completion, RecordId, UsageRecord};
use crate::cost::summary::{Day, Subject, Summary, Totals};
use crate::cost::usage::Usage;
use crate::key::ApiKeyId;

/// The migrations shipped with the crate, applied in order by [`PostgresSink::migrate`].
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "usage_logs",
        include_str!("postgres/0001_usage_logs.sql"),
    ),
    (
        2,
        "audit_logs",
        include_str!("postgres/0002_audit_logs.sql"),
    ),
    (
        3,
        "user_usage_stats",
        include_str!("postgres/0003_user_usage_stats.sql"),
    ),
    (
        4,
        "row_level_security",
        include_str!("postgres/0004_row_level_security.sql"),
    ),
    (5, "record_id", include_str!("postgres/0005_record_id.sql")),
    (6, "fallback", include_str!("postgres/0006_fallback.sql")),
    (
        7,
        "usage_dead_letters",
        include_str!("postgres/0007_usage_dead_letters.sql"),
    ),
    (
        8,
        "usage_batches",
        include_str!("postgres/0008_usage_batches.sql"),
    ),
];

/// An arbitrary constant: the advisory lock that serializes migrations across instances.
const MIGRATION_LOCK: i64 = 0x7061_6c69_7361_6465; // "palisade"

/// How to reach PostgreSQL and how much to buffer.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db` (or a `key=value` connection string).
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Records per `INSERT`.
    pub max_batch: usize,
    /// Records kept while the server is away; more are dropped and counted.
    pub max_buffer: usize,
    /// Waiting for, and making, a connection gives up after this.
    pub connect_timeout: Duration,
    /// The longest wait between retries while the server is away.
    pub max_backoff: Duration,
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("max_batch", &self.max_batch)
            .field("max_buffer", &self.max_buffer)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// The URL without its password (in the user info or the query, see
/// [`crate::key::redact_url`]); a `key=value` connection string that holds a password is
/// not shown at all.
fn redact_url(url: &str) -> String {
    if url.contains("://") {
        crate::key::redact_url(url)
    } else if url.to_ascii_lowercase().contains("password") {
        "<connection string with a password>".to_owned()
    } else {
        url.to_owned()
    }
}

impl PostgresConfig {
    /// Defaults for `url`: 4 connections, batches of 1000, 100 000 records buffered,
    /// 5 s connect timeout, backoff up to 30 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: 4,
            max_batch: 1000,
            max_buffer: 100_000,
            connect_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// A security event for `audit_logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AuditEvent {
    /// When it happened.
    pub time: SystemTime,
    /// Who acted (a user id, a hashed key, an admin), if known.
    pub actor: Option<String>,
    /// What was done: `auth_failure`, `rate_limited`, `budget_refused`, `bot_deleted`, ….
    pub action: String,
    /// What it was done to.
    pub target: Option<String>,
    /// `allowed`, `refused`, `failed`, ….
    pub outcome: String,
    /// Free text (never a secret).
    pub detail: Option<String>,
    /// The request id.
    pub request_id: Option<String>,
}

impl AuditEvent {
    /// An event now with `action` and `outcome`.
    pub fn new(action: impl Into<String>, outcome: impl Into<String>) -> Self {
        Self {
            time: SystemTime::now(),
            actor: None,
            action: action.into(),
            target: None,
            outcome: outcome.into(),
            detail: None,
            request_id: None,
        }
    }

    /// Sets the actor.
    #[must_use]
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// Sets the target.
    #[must_use]
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Sets the detail.
    #[must_use]
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// A snapshot of the sink's state (the shared [`SinkHealth`]; this name is kept so code
/// written against it still builds).
pub type PostgresHealth = SinkHealth;

pub(crate) struct Inner {
    pool: Pool,
    config: PostgresConfig,
    backlog: Backlog,
    /// When the sink last deleted old batch ids.
    pruned: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The PostgreSQL ledger. Cheap to clone. See the [`sink`](super) module.
#[derive(Clone)]
pub struct PostgresSink {
    inner: Arc<Inner>,
}

impl fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresSink")
            .field("config", &self.inner.config)
            .field("health", &self.health())
            .finish()
    }
}

fn unavailable(e: impl fmt::Display) -> SinkError {
    SinkError::Unavailable(e.to_string())
}

/// A driver error with the server's message, which `Display` alone leaves out.
fn pg(e: tokio_postgres::Error) -> SinkError {
    match e.as_db_error() {
        Some(db) => SinkError::Unavailable(format!("{}: {}", db.code().code(), db.message())),
        None => unavailable(e),
    }
}

/// A write's error: lasting ([`SinkError::Rejected`]) when the server refused the rows
/// themselves (SQLSTATE class 22, data exception; 23, integrity constraint; 54, program
/// limit), passing otherwise (the connection, the server's state, the schema).
fn pg_write(e: tokio_postgres::Error) -> SinkError {
    let lasting = e
        .as_db_error()
        .is_some_and(|db| matches!(&db.code().code()[..2], "22" | "23" | "54"));
    match pg(e) {
        SinkError::Unavailable(m) if lasting => SinkError::Rejected(m),
        other => other,
    }
}

/// The token counts a row stores, in the order of its token columns.
fn token_counts(u: &Usage) -> [u64; 6] {
    [
        u.input_tokens,
        u.output_tokens,
        u.cache_write_5m_tokens,
        u.cache_write_1h_tokens,
        u.cache_read_tokens,
        u.web_search_requests,
    ]
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The record's idempotency key: its server-made [`id`](UsageRecord::id) as text.
pub fn record_key(r: &UsageRecord) -> String {
    r.id.to_string()
}

/// Stores a batch and notes its id, in one statement (so in one transaction): the
/// records new to `usage_logs` are counted, the count is added to the batch's row in
/// `usage_batches` (made on its first store), and the statement answers the batch's total.
/// A batch stored again under its id (its first answer was lost) answers the count of
/// its first store.
const INSERT: &str = "WITH stored AS (INSERT INTO usage_logs (record_id, request_id, time, user_id, api_key_hash, bot_id, \
    conversation_id, route, model, input_tokens, output_tokens, cache_write_5m_tokens, \
    cache_write_1h_tokens, cache_read_tokens, web_search_requests, cost_picos, status, stream, \
    completion, upstream_error, duration_ms, time_to_headers_ms, fallback) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::int8[], $12::int8[], \
    $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int2[], $18::bool[], $19::text[], \
    $20::text[], $21::int8[], $22::int8[], $23::text[]) \
    ON CONFLICT (record_id) DO NOTHING RETURNING 1), \
    batch AS (INSERT INTO usage_batches (batch_id, fresh) SELECT $24, count(*) FROM stored \
    ON CONFLICT (batch_id) DO UPDATE SET fresh = usage_batches.fresh + EXCLUDED.fresh \
    RETURNING fresh) \
    SELECT fresh FROM batch";

/// How often, at most, the sink runs [`PRUNE`].
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Deletes the batch ids noted more than a day ago (a retry comes within the sink's
/// backoff of the server answering again, far sooner). Rows another instance is deleting
/// at the same moment are left to it, so two sinks never wait on each other.
const PRUNE: &str = "DELETE FROM usage_batches WHERE batch_id IN (SELECT batch_id FROM \
    usage_batches WHERE applied_at < now() - interval '1 day' FOR UPDATE SKIP LOCKED)";

fn completion_name(c: Completion) -> &'static str {
    match c {
        Completion::Complete => "complete",
        Completion::Partial => "partial",
        Completion::UpstreamError => "upstream_error",
        Completion::Failed => "failed",
        Completion::Cancelled => "cancelled",
    }
}

impl PostgresSink {
    /// A sink with a pool for `config` (no connection is made until first use; call
    /// inside a tokio runtime).
    pub fn connect(config: PostgresConfig) -> Result<Self, SinkError> {
        let pg = tokio_postgres::Config::from_str(&config.url)
            .map_err(|e| SinkError::Rejected(format!("invalid PostgreSQL url: {e}")))?;
        let mut pg = pg;
        pg.connect_timeout(config.connect_timeout);
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| SinkError::Rejected(e.to_string()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                backlog: Backlog::new(
                    "PostgreSQL sink",
                    Limits {
                        max_batch: config.max_batch,
                        max_buffer: config.max_buffer,
                        max_backoff: config.max_backoff,
                    },
                ),
                config,
                pruned: std::sync::Mutex::new(None),
            }),
        })
    }

    /// The backlog, the counters and the last error.
    pub fn health(&self) -> SinkHealth {
        self.inner.backlog.health()
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.inner.pool.get().await.map_err(unavailable)
    }

    /// Applies the migrations not yet applied, in one transaction under an advisory lock;
    /// returns the versions applied now (empty when the schema is current).
    pub async fn migrate(&self) -> Result<Vec<i32>, SinkError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(pg)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS palisade_schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg)?;
        let done: Vec<i32> = tx
            .query("SELECT version FROM palisade_schema_migrations", &[])
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut applied = Vec::new();
        for &(version, name, sql) in MIGRATIONS {
            if done.contains(&version) {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| {
                SinkError::Rejected(format!("migration {version} {name}: {}", pg(e)))
            })?;
            tx.execute(
                "INSERT INTO palisade_schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await
            .map_err(pg)?;
            applied.push(version);
        }
        tx.commit().await.map_err(pg)?;
        if !applied.is_empty() {
            tracing::info!(target: "palisade::cost", ?applied, "PostgreSQL migrations applied");
        }
        Ok(applied)
    }

    /// Inserts `batch` as batch `batch_id`; returns how many of its rows were new, over
    /// every store of that batch id.
    async fn insert(&self, batch: &[UsageRecord], batch_id: RecordId) -> Result<u64, SinkError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(INSERT).await.map_err(pg)?;
        let n = batch.len();
        let mut record_id = Vec::with_capacity(n);
        let mut request_id = Vec::with_capacity(n);
        let mut time = Vec::with_capacity(n);
        let mut user = Vec::with_capacity(n);
        let mut key = Vec::with_capacity(n);
        let mut bot = Vec::with_capacity(n);
        let mut conversation = Vec::with_capacity(n);
        let mut route = Vec::with_capacity(n);
        let mut model = Vec::with_capacity(n);
        let mut tokens: [Vec<i64>; 6] = Default::default();
        let mut cost = Vec::with_capacity(n);
        let mut status = Vec::with_capacity(n);
        let mut stream = Vec::with_capacity(n);
        let mut completion = Vec::with_capacity(n);
        let mut upstream_error = Vec::with_capacity(n);
        let mut duration = Vec::with_capacity(n);
        let mut ttfb = Vec::with_capacity(n);
        let mut fallback = Vec::with_capacity(n);
        for r in batch {
            let a = &r.attribution;
            record_id.push(record_key(r));
            request_id.push(r.request_id.clone());
            time.push(r.time);
            user.push(a.user.clone());
            key.push(a.api_key.map(|k| k.to_string()));
            bot.push(a.bot.clone());
            conversation.push(a.conversation.clone());
            route.push(r.route.clone());
            model.push(r.model.clone());
            for (v, t) in tokens.iter_mut().zip(token_counts(&r.usage)) {
                v.push(to_i64(t));
            }
            cost.push(r.cost.map(|c| i64::try_from(c.picos()).unwrap_or(i64::MAX)));
            status.push(i16::try_from(r.status).unwrap_or(i16::MAX));
            stream.push(r.stream);
            completion.push(completion_name(r.completion));
            upstream_error.push(r.upstream_error.clone());
            duration.push(millis(r.duration));
            ttfb.push(millis(r.time_to_headers));
            fallback.push(r.fallback.as_deref());
        }
        let batch_id = batch_id.to_string();
        let params: [&(dyn ToSql + Sync); 24] = [
            &record_id,
            &request_id,
            &time,
            &user,
            &key,
            &bot,
            &conversation,
            &route,
            &model,
            &tokens[0],
            &tokens[1],
            &tokens[2],
            &tokens[3],
            &tokens[4],
            &tokens[5],
            &cost,
            &status,
            &stream,
            &completion,
            &upstream_error,
            &duration,
            &ttfb,
            &fallback,
            &batch_id,
        ];
        let fresh: i64 = client
            .query_one(&stmt, &params)
            .await
            .map_err(pg_write)?
            .get(0);
        drop(client);
        self.prune_now_and_then().await;
        Ok(u64::try_from(fresh).unwrap_or(0))
    }

    /// Deletes old batch ids, at most once per [`PRUNE_EVERY`]. A failure is logged and
    /// left for the next time: the ids only make `duplicates` exact.
    async fn prune_now_and_then(&self) {
        {
            let now = tokio::time::Instant::now();
            let mut pruned = self
                .inner
                .pruned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pruned.is_some_and(|at| now < at + PRUNE_EVERY) {
                return;
            }
            *pruned = Some(now);
        }
        let result = match self.client().await {
            Ok(client) => client.execute(PRUNE, &[]).await.map_err(pg),
            Err(e) => Err(e),
        };
        match result {
            Ok(n) => {
                tracing::debug!(target: "palisade::cost", deleted = n, "PostgreSQL sink: old batch ids deleted");
            }
            Err(e) => {
                tracing::warn!(target: "palisade::cost", error = %e, "PostgreSQL sink: old batch ids not deleted");
            }
        }
    }

    /// Sets `record` aside in `usage_dead_letters`, once per record id.
    async fn set_aside(&self, record: &UsageRecord, error: &str) -> Result<bool, SinkError> {
        let json = serde_json::to_string(record)
            .map_err(|e| SinkError::Rejected(format!("record not serializable: {e}")))?;
        // text cannot hold NUL: the error may quote a value that had one
        let error = error.replace('\0', "\\0");
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO usage_dead_letters (record_id, record, error) \
                 VALUES ($1, $2::text::json, $3) ON CONFLICT (record_id) DO NOTHING",
                &[&record_key(record), &json, &error],
            )
            .await
            .map_err(pg_write)?;
        Ok(n == 1)
    }

    /// Recomputes `user_usage_stats`.
    pub async fn refresh_stats(&self) -> Result<(), SinkError> {
        let client = self.client().await?;
        client
            .execute("SELECT refresh_user_usage_stats()", &[])
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Writes audit events now (one round trip).
    pub async fn audit(&self, events: &[AuditEvent]) -> Result<(), SinkError> {
        if events.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        let col = |f: fn(&AuditEvent) -> Option<String>| events.iter().map(f).collect::<Vec<_>>();
        let time: Vec<SystemTime> = events.iter().map(|e| e.time).collect();
        let action = col(|e| Some(e.action.clone()));
        let outcome = col(|e| Some(e.outcome.clone()));
        client
            .execute(
                "INSERT INTO audit_logs (time, actor, action, target, outcome, detail, request_id) \
                 SELECT * FROM UNNEST($1::timestamptz[], $2::text[], $3::text[], $4::text[], \
                 $5::text[], $6::text[], $7::text[])",
                &[
                    &time,
                    &col(|e| e.actor.clone()),
                    &action,
                    &col(|e| e.target.clone()),
                    &outcome,
                    &col(|e| e.detail.clone()),
                    &col(|e| e.request_id.clone()),
                ],
            )
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Totals of `subject`'s records with `from <= time < to`, computed by SQL; equal to
    /// [`summarize`](crate::cost::summary::summarize) over the same records.
    pub async fn summary(
        &self,
        subject: &Subject,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Summary, SinkError> {
        let (filter, value): (&str, Option<String>) = match subject {
            Subject::All => ("TRUE", None),
            Subject::User(u) => ("user_id = $3", Some(u.clone())),
            Subject::ApiKey(k) => ("api_key_hash = $3", Some(k.to_string())),
            Subject::Bot(b) => ("bot_id = $3", Some(b.clone())),
            Subject::Conversation(c) => ("conversation_id = $3", Some(c.clone())),
            Subject::Anonymous => ("user_id IS NULL AND api_key_hash IS NULL", None),
        };
        let sql = format!(
            "SELECT model, ((time AT TIME ZONE 'UTC')::date - DATE '1970-01-01')::int8 AS day, {TOTALS} \
             FROM usage_logs WHERE time >= $1 AND time < $2 AND {filter} GROUP BY 1, 2"
        );
        let client = self.client().await?;
        let rows = match &value {
            Some(v) => client.query(&sql, &[&from, &to, v]).await,
            None => client.query(&sql, &[&from, &to]).await,
        }
        .map_err(pg)?;
        let mut s = Summary {
            subject: subject.clone(),
            total: Totals::default(),
            by_model: BTreeMap::new(),
            by_day: BTreeMap::new(),
        };
        for row in rows {
            let model: Option<String> = row.get(0);
            let day: i64 = row.get(1);
            let t = totals(&row, 2)?;
            add_totals(&mut s.total, &t);
            add_totals(
                s.by_model
                    .entry(model.unwrap_or_else(|| "unknown".to_owned()))
                    .or_default(),
                &t,
            );
            add_totals(s.by_day.entry(Day::from_days(day)).or_default(), &t);
        }
        Ok(s)
    }

    /// The `n` users (else API keys) with the highest cost with `from <= time < to`,
    /// highest first, ties by subject; equal to [`top`](crate::cost::summary::top).
    pub async fn top(
        &self,
        n: usize,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<(Subject, Totals)>, SinkError> {
        let sql = format!(
            "SELECT user_id, CASE WHEN user_id IS NULL THEN api_key_hash END AS key, {TOTALS} \
             FROM usage_logs WHERE time >= $1 AND time < $2 GROUP BY 1, 2 \
             ORDER BY coalesce(sum(cost_picos), 0) DESC, (user_id IS NULL), user_id COLLATE \"C\", \
             (CASE WHEN user_id IS NULL THEN api_key_hash END IS NULL), \
             (CASE WHEN user_id IS NULL THEN api_key_hash END) COLLATE \"C\" LIMIT $3"
        );
        let client = self.client().await?;
        let limit = i64::try_from(n).unwrap_or(i64::MAX);
        let rows = client
            .query(&sql, &[&from, &to, &limit])
            .await
            .map_err(pg)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let user: Option<String> = row.get(0);
            let key: Option<String> = row.get(1);
            let subject = match (user, key) {
                (Some(u), _) => Subject::User(u),
                (None, Some(k)) => Subject::ApiKey(parse_key(&k)?),
                (None, None) => Subject::Anonymous,
            };
            out.push((subject, totals(&row, 2)?));
        }
        Ok(out)
    }
}

/// The aggregate columns every summary query selects, in the order [`totals`] reads.
const TOTALS: &str = "count(*)::int8, sum(input_tokens)::int8, sum(output_tokens)::int8, \
    sum(cache_write_5m_tokens)::int8, sum(cache_write_1h_tokens)::int8, \
    sum(cache_read_tokens)::int8, sum(web_search_requests)::int8, \
    coalesce(sum(cost_picos), 0)::text, \
    count(*) FILTER (WHERE cost_picos IS NULL AND (model IS NOT NULL OR input_tokens > 0 \
        OR output_tokens > 0 OR cache_write_5m_tokens > 0 OR cache_write_1h_tokens > 0 \
        OR cache_read_tokens > 0 OR web_search_requests > 0))::int8, \
    count(*) FILTER (WHERE completion IN ('partial', 'cancelled'))::int8, \
    count(*) FILTER (WHERE completion IN ('upstream_error', 'failed'))::int8";

fn totals(row: &tokio_postgres::Row, at: usize) -> Result<Totals, SinkError> {
    let u = |i: usize| u64::try_from(row.get::<_, i64>(at + i)).unwrap_or(0);
    let cost: String = row.get(at + 7);
    let cost: u128 = cost
        .parse()
        .map_err(|_| SinkError::Rejected(format!("cost sum `{cost}` is not an integer")))?;
    Ok(Totals {
        requests: u(0),
        usage: Usage {
            input_tokens: u(1),
            output_tokens: u(2),
            cache_write_5m_tokens: u(3),
            cache_write_1h_tokens: u(4),
            cache_read_tokens: u(5),
            web_search_requests: u(6),
        },
        cost: Money::from_picos(cost),
        unpriced: u(8),
        incomplete: u(9),
        errors: u(10),
    })
}

fn add_totals(into: &mut Totals, t: &Totals) {
    into.requests += t.requests;
    into.usage.add(&t.usage);
    into.cost = into.cost.saturating_add(t.cost);
    into.unpriced += t.unpriced;
    into.incomplete += t.incomplete;
    into.errors += t.errors;
}

fn parse_key(hex: &str) -> Result<ApiKeyId, SinkError> {
    let bad = || SinkError::Rejected(format!("`{hex}` is not a hashed API key"));
    if hex.len() != 32 {
        return Err(bad());
    }
    let mut bytes = [0u8; 16];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(ApiKeyId::from_bytes(bytes))
}

impl UsageSink for PostgresSink {
    /// Buffers `batch` (dropping and counting what does not fit) and writes the buffer.
    /// A server that is away is not an error here: the records wait and are retried with
    /// backoff (by a timer of their own while the sink lives, on the next batch, or at
    /// [`flush`](UsageSink::flush)).
    async fn record_batch(&self, batch: &[UsageRecord]) -> Result<(), SinkError> {
        self.inner.backlog.record_batch(self, batch).await
    }

    /// Writes everything buffered now (no backoff); `Err` when the server is still away
    /// (the backlog stays in [`health`](PostgresSink::health)).
    async fn flush(&self) -> Result<(), SinkError> {
        self.inner.backlog.flush(self).await
    }
}

impl Store for PostgresSink {
    type Weak = std::sync::Weak<Inner>;

    fn backlog(&self) -> &Backlog {
        &self.inner.backlog
    }

    fn downgrade(&self) -> Self::Weak {
        Arc::downgrade(&self.inner)
    }

    fn upgrade(weak: &Self::Weak) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    async fn store(&self, batch: &[UsageRecord], batch_id: RecordId) -> Result<u64, Failure> {
        // A value past its bigint column would be stored clamped, a wrong amount: the
        // records before it are stored, and it is refused for good.
        if let Some((at, why)) = batch.iter().enumerate().find_map(|(i, r)| {
            let cost = r.cost.map_or(0, |c| c.picos());
            let tokens = token_counts(&r.usage);
            if cost > i64::MAX as u128 {
                Some((i, format!("cost of {cost} pico-dollars")))
            } else if tokens.iter().any(|&t| t > i64::MAX as u64) {
                Some((i, "a token count".to_owned()))
            } else {
                None
            }
        }) {
            let fresh = if at > 0 {
                self.insert(&batch[..at], batch_id).await?
            } else {
                0
            };
            return Err(Failure {
                error: SinkError::Rejected(format!(
                    "usage record {} not stored: its {why} does not fit a bigint column",
                    batch[at].id
                )),
                stored: at,
                fresh,
                pinpointed: true,
            });
        }
        // one statement: all of the batch is stored, or none of it
        Ok(self.insert(batch, batch_id).await?)
    }

    fn dead_letter(
        &self,
        record: &UsageRecord,
        error: &str,
    ) -> impl Future<Output = Result<bool, SinkError>> + Send {
        self.set_aside(record, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_in_debug() {
        let c = PostgresConfig::new("postgres://ledger:s3cret@db:5432/palisade");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(
            dbg.contains("postgres://ledger:***@db:5432/palisade")
                || dbg.contains("postgres://***@db:5432/palisade"),
            "{dbg}"
        );
    }

    /// The sink's own redaction hid only the user info's password: one given as a query
    /// parameter (which libpq and tokio-postgres accept) was printed.
    #[test]
    fn a_password_in_the_query_is_redacted_in_debug() {
        for url in [
            "postgres://ledger@db:5432/palisade?sslmode=require&password=hunter2",
            "postgresql://ledger:hunter2@db/palisade?password=hunter2",
            "host=db user=ledger PASSWORD=hunter2",
        ] {
            let dbg = format!("{:?}", PostgresConfig::new(url));
            assert!(!dbg.contains("hunter2"), "{dbg}");
        }
    }

    #[test]
    fn passwords_in_the_query_or_in_key_value_form_are_redacted() {
        for url in [
            "postgres://ledger@db/palisade?password=s3cret",
            "postgres://db/palisade?application_name=a@b&password=s3cret",
            "postgresql://ledger:s3cret@db/palisade?sslmode=require&sslpassword=s3cret",
            "host=db user=ledger password=s3cret dbname=palisade",
            "host=db password = 's3cret word'",
        ] {
            let dbg = format!("{:?}", PostgresConfig::new(url));
            assert!(!dbg.contains("s3cret"), "{dbg}");
        }
    }
}
